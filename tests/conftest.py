"""Test fixtures. Airflow runs from a throwaway home so tests never touch the demo's state."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="mlcanary-airflow-home-"))
# Set before anything imports Airflow: its configuration is read once, at import.
os.environ.update(
    AIRFLOW_HOME=str(_HOME),
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
    AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_HOME}/airflow.db",
    # The tests answer human-in-the-loop tasks through the REST API, as an admin of the test home.
    AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
    AIRFLOW__API_AUTH__JWT_SECRET=uuid.uuid4().hex * 2,  # a throwaway signing key of a safe length
)
os.environ.pop("MLCANARY_SPEC_DIR", None)
os.environ.pop("MLCANARY_SNAPSHOT_DIR", None)  # each test's spec folder keeps its own snapshots

import sqlalchemy as sa  # noqa: E402

from mlcanary.routers.base import Split  # noqa: E402
from mlcanary.simulator import Fault, SimConfig, simulate_batch  # noqa: E402
from mlcanary.spec import RolloutSpec, parse_spec  # noqa: E402
from mlcanary.warehouse.engine import make_engine, utcnow  # noqa: E402
from mlcanary.warehouse.schema import create_schema  # noqa: E402

PG_URL = os.environ.get("MLCANARY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def base_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec as a dict; tests change what they need."""
    spec: dict[str, Any] = {
        "name": "unit_ranker",
        "model": "unit-ranker",
        "stages": [{"percent": 10, "bake": "4s"}, {"percent": 30, "bake": "4s"}, {"percent": 60, "bake": "4s"}],
        "guardrails": {
            "interval": "1s",
            "window": "4s",
            "min_requests": 20,
            "success_rate_min": 0.98,
            "p99_latency_ms_max": 250,
            "cpu_max": 0.9,
            "memory_max": 0.95,
            "deadline_margin": "20s",
        },
        "analysis": {
            "interval": "2s",
            "window": "10m",
            "label_delay": "1s",
            "min_label_window": "1s",
            "min_samples": 300,
            "segments": ["user_cohort"],
            "metrics": [{"name": "ctr", "tolerance": 0.1}],
        },
        "policies": {"inconclusive": "extend", "max_extension": "20s"},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def spec() -> RolloutSpec:
    return parse_spec(base_spec())


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/warehouse.db"


@pytest.fixture
def engine(sqlite_url: str) -> sa.Engine:
    eng = make_engine(sqlite_url)
    create_schema(eng)
    return eng


@pytest.fixture
def duckdb_engine(tmp_path: Path) -> sa.Engine:
    """A DuckDB file with the whole schema."""
    eng = make_engine(f"duckdb:///{tmp_path}/warehouse.duckdb")
    create_schema(eng)
    return eng


def _pg_available() -> str | None:
    try:
        eng = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:  # any failure means: no server to test against
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """The PostgreSQL server; skipped with a message where there is none, but never under CI=true."""
    problem = _pg_available()
    if problem:
        message = f"PostgreSQL not reachable at {PG_URL} ({problem})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the PostgreSQL tests for real")
        pytest.skip(message)
    return PG_URL


@pytest.fixture
def pg_engine(pg_base_url: str) -> Iterator[sa.Engine]:
    """A fresh schema of its own in the test database, dropped afterwards."""
    schema = f"mlcanary_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_base_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{pg_base_url}?options=-csearch_path%3D{schema}"
    eng = make_engine(url)
    create_schema(eng)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


Writer = Callable[..., datetime]


@pytest.fixture
def write_batch() -> Writer:
    """Write ``minutes`` of simulated traffic ending now (labels observed by now); returns now."""

    def write(
        eng: sa.Engine,
        *,
        model: str = "unit-ranker",
        minutes: float = 10,
        rate: float = 50,
        canary_percent: float = 20,
        faults: tuple[str, ...] = (),
        seed: int = 1,
        base_ctr: float = 0.2,
        end: datetime | None = None,
    ) -> datetime:
        end = end or utcnow()
        config = SimConfig(
            model=model,
            seed=seed,
            base_ctr=base_ctr,
            faults=[Fault.parse(f) for f in faults],
            label_delay=timedelta(seconds=1),
        )
        simulate_batch(
            eng,
            config,
            end - timedelta(minutes=minutes),
            end,
            rate,
            Split(model, "v1", "v2", canary_percent),
            labels_asof=end,
        )
        return end

    return write


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The Airflow metadata DB of the throwaway home set up above."""
    import subprocess
    import sys

    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True)


class Inbox:
    """A local SMTP server that keeps the messages it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        from email import message_from_bytes

        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Inbox]]:
    """A Slack incoming-webhook stand-in and an SMTP server, wired to the Airflow connections
    ``slack_rollouts`` and ``smtp_rollouts``."""
    import json
    import socket

    from aiosmtpd.controller import Controller

    from local_servers import serve

    inbox = Inbox()
    with socket.socket() as probe:  # a free port: aiosmtpd checks its own with a connection
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    with serve(lambda service, request: (200, None)) as slack:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SLACK_ROLLOUTS",
            json.dumps({"conn_type": "slackwebhook", "password": f"{slack.url}/services/T000/B000/XXXX"}),
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_ROLLOUTS",
            json.dumps(
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": port,
                    "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "mlcanary@example.com"},
                }
            ),
        )
        try:
            yield slack, inbox
        finally:
            controller.stop()
