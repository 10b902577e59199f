"""Every warehouse engine has a connect and a statement timeout: a database that hangs is an error
the guardrails count, never a wait that outlives the stage."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import sqlalchemy as sa

from mlcanary.warehouse import engine as engines


def test_a_database_that_accepts_but_never_answers_is_an_error_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engines, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:  # listens, accepts into its backlog, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        eng = engines.make_engine(f"postgresql://nobody@127.0.0.1:{port}/x?application_name={uuid.uuid4().hex}")
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="timeout"), eng.connect():
            pass
        assert time.monotonic() - started < 3


def test_a_statement_longer_than_the_limit_is_cancelled(pg_base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "STATEMENT_TIMEOUT_S", 1)
    eng = engines.make_engine(f"{pg_base_url}?application_name={uuid.uuid4().hex}")
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError, match="statement timeout"), eng.connect() as conn:
        conn.execute(sa.text("select pg_sleep(10)"))
    assert time.monotonic() - started < 4
    eng.dispose()


def test_the_default_limits_keep_the_urls_own_options(pg_base_url: str) -> None:
    eng = engines.make_engine(f"{pg_base_url}?options=-csearch_path%3Dpg_catalog")
    with eng.connect() as conn:
        assert conn.execute(sa.text("show statement_timeout")).scalar() == "5min"
        assert conn.execute(sa.text("show search_path")).scalar() == "pg_catalog"
    eng.dispose()
    own = engines.make_engine(f"{pg_base_url}?options=-cstatement_timeout%3D2s")
    with own.connect() as conn:  # the URL's own limit wins
        assert conn.execute(sa.text("show statement_timeout")).scalar() == "2s"
    own.dispose()
