"""The guardrail trigger on its own, run the way dag.test() runs it: the first event of run()."""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.spec import parse_spec
from mlcanary.warehouse.schema import measurements
from mlcanary_airflow.triggers import GuardrailTrigger


def _trigger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bake: float, limit: float, **guardrails: Any
) -> GuardrailTrigger:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")})
    )
    spec = parse_spec(base_spec(guardrails={**base_spec()["guardrails"], **guardrails}))
    return GuardrailTrigger(
        spec=spec.model_dump(mode="json", by_alias=True),
        rollout_id="r",
        stage=1,
        baseline_version="v1",
        canary_version="v2",
        bake_seconds=bake,
        deadline_epoch=time.time() + limit,
    )


def _first_event(trigger: GuardrailTrigger) -> dict:
    classpath, kwargs = trigger.serialize()  # rebuilt from its serialized form, as a triggerer does
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    return asyncio.run(anext(rebuilt.run())).payload


def _polls(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count(sa.distinct(measurements.c.measured_at)))).scalar()


def test_no_data_never_bakes_and_the_deadline_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    started = time.monotonic()
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=3))
    assert event["status"] == "timeout"
    assert "deadline passed with 0 s of 1 s baked healthy" in event["reason"]
    assert "no data" in event["reason"]
    assert 2 <= time.monotonic() - started < 6
    assert _polls(engine) == event["polls"] >= 3


def test_breach_ends_at_the_first_failing_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    started = time.monotonic()
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=30, limit=60))
    assert event["status"] == "breach" and event["polls"] == 1
    assert event["reason"].startswith("p99_latency_ms")
    assert time.monotonic() - started < 3


def test_healthy_after_a_full_bake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    from datetime import timedelta

    from mlcanary.warehouse.engine import utcnow

    # traffic up to 30 s ahead, so the sliding window keeps seeing requests while the stage bakes
    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=2, limit=20))
    assert event["status"] == "healthy"
    assert event["healthy_seconds"] >= 2 and event["polls"] >= 3
    with engine.connect() as conn:  # every poll is audited with its values, sample sizes and limits
        rows = conn.execute(sa.select(measurements)).all()
    assert len(rows) == 4 * event["polls"]
    for r in rows:
        assert (r.tier, r.stage, r.rollout_id, r.verdict) == ("guardrail", 1, "r", "PASS")
        assert r.canary_n > 0 and r.baseline_n > 0 and r.threshold is not None
        if r.check_name in ("success_rate", "p99_latency_ms"):
            assert r.baseline_n > r.canary_n  # requests: the baseline has 80 % of the traffic
        assert r.canary_value is not None and r.baseline_value is not None
        assert (r.window_end - r.window_start).total_seconds() == 4.0 and r.reason


def test_no_data_fails_after_the_limit_under_policy_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=30, no_data_limit=3, no_data_policy="fail"))
    assert event["status"] == "no_data" and event["polls"] == 3
    assert event["reason"].startswith("3 polls in a row without enough data (success_rate, p99_latency_ms")
    assert _polls(engine) == 3


def test_no_data_holds_until_the_deadline_under_policy_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=3, no_data_limit=1, no_data_policy="hold"))
    assert event["status"] == "timeout" and event["polls"] >= 3


def test_source_errors_are_retried_then_fail_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    """Prometheus unreachable: each error is recorded, retried, and the 4th in a row fails the stage."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9})
    )
    queries = {"requests": "sum(r)", "failures": "sum(f)", "p99_latency_ms": "p", "cpu": "c", "memory": "m"}
    started = time.monotonic()
    event = _first_event(
        _trigger(tmp_path, monkeypatch, bake=1, limit=60, source={"kind": "prometheus", "queries": queries})
    )
    assert event["status"] == "error" and event["polls"] == 4
    assert "metric source error 4 of 4 in a row" in event["reason"] and "unreachable" in event["reason"]
    assert time.monotonic() - started < 10  # retried after 1, 1, 1 s (the interval caps the backoff)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(measurements).order_by(measurements.c.id)).all()
    assert [(r.check_name, r.verdict) for r in rows] == [("metric_source", "INVALID")] * 4
    assert rows[0].reason.startswith("metric source error 1 of 4 in a row: MetricSourceError: Prometheus at")
