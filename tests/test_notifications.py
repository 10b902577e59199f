"""The notifier on its own: messages built from the audit tables, sent through Airflow's Slack-webhook
notifier to a local stand-in; a failed rollback is announced loudly; a dead channel fails nothing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from conftest import base_spec
from local_servers import serve
from mlcanary import rollout as lifecycle
from mlcanary.audit import record_decision
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.spec import parse_spec
from mlcanary_airflow.notifiers import RolloutNotifier

RUN_ID = "manual__2026-11-27T10:00:00+00:00"


def _context(spec_name: str) -> dict:
    return {"dag": SimpleNamespace(dag_id=f"rollout__{spec_name}"), "run_id": RUN_ID, "params": {}}


@pytest.fixture
def rolled_out(engine: sa.Engine, sqlite_url: str) -> tuple[dict, str]:
    """A rollout at stage 2 that the guardrails decided to roll back."""
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}, "events": ["promote"]})
    spec = parse_spec(data)
    router = WarehouseRouter(engine)
    r = lifecycle.begin_rollout(engine, router, spec, f"{spec.dag_id}/{RUN_ID}", "v2", "v1")
    lifecycle.shift_to_stage(engine, router, spec, r, 2)
    record_decision(
        engine,
        rollout_id=r.rollout_id,
        model=spec.model,
        stage=2,
        action="rollback",
        verdict=None,
        reason="guardrails stage 2 breach: p99_latency_ms 424.2 ms >= 250.0 ms (n=1,225)",
    )
    return data, sqlite_url


def test_a_failed_rollback_is_announced_even_when_not_subscribed(
    rolled_out: tuple[dict, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, url = rolled_out
    with serve(lambda service, request: (200, None)) as slack:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SLACK_TEST", json.dumps({"conn_type": "slackwebhook", "password": f"{slack.url}/hook"})
        )
        RolloutNotifier(spec=data, event="rollback", warehouse_url=url).notify(_context(data["name"]))
        assert slack.requests == []  # the spec subscribes to promotions only
        RolloutNotifier(spec=data, event="rollback_failed", warehouse_url=url).notify(_context(data["name"]))
    (sent,) = [q.json()["text"] for q in slack.requests]
    assert sent.startswith("mlcanary: ROLLBACK FAILED for unit-ranker v2 (baseline v1)")
    assert "may still receive traffic (30 % last recorded)" in sent and "Act now" in sent
    assert "Why it was rolled back: guardrails stage 2 breach: p99_latency_ms 424.2 ms" in sent
    assert f"/dags/rollout__unit_ranker/runs/{RUN_ID}" in sent


def test_a_dead_channel_is_logged_not_raised(
    rolled_out: tuple[dict, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data, url = rolled_out
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_TEST", json.dumps({"conn_type": "slackwebhook", "password": "http://127.0.0.1:9/hook"})
    )
    RolloutNotifier(spec=data, event="rollback_failed", warehouse_url=url).notify(_context(data["name"]))
    assert "the Slack notification about rollback_failed could not be sent" in caplog.text
