"""The notifier on its own: messages built from the task's context alone (XCom and the exception),
never from the warehouse, sent through Airflow's Slack-webhook notifier to a local stand-in; a
failed rollback is announced loudly; a dead channel fails nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import base_spec
from local_servers import Service, serve
from mlcanary.routers.base import TrafficShiftError
from mlcanary_airflow.links import report_url
from mlcanary_airflow.notifiers import RolloutNotifier

RUN_ID = "manual__2026-11-27T10:00:00+00:00"
ROLLOUT = f"rollout__unit_ranker/{RUN_ID}"
STARTED = {
    "rollout_id": ROLLOUT,
    "model": "unit-ranker",
    "baseline_version": "v1",
    "canary_version": "v2",
    "dry_run": False,
}


class FakeTI:
    """What a callback's ``ti`` answers: the XComs of the run."""

    def __init__(self, task_id: str, xcoms: dict[str, Any]) -> None:
        self.task_id, self.xcoms = task_id, xcoms

    def xcom_pull(self, task_ids: str) -> Any:
        return self.xcoms.get(task_ids)


def _context(task_id: str, exception: Exception | None = None, **xcoms: Any) -> dict[str, Any]:
    return {
        "dag": SimpleNamespace(dag_id="rollout__unit_ranker"),
        "run_id": RUN_ID,
        "params": {"candidate_version": "v2"},
        "ti": FakeTI(task_id, {"validate_and_lock": STARTED, **xcoms}),
        "exception": exception,
    }


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    # No warehouse connection exists at all: a message that read the warehouse would fail.
    monkeypatch.delenv("AIRFLOW_CONN_MLCANARY_WAREHOUSE", raising=False)
    with serve(lambda service, request: (200, None)) as service:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SLACK_TEST", json.dumps({"conn_type": "slackwebhook", "password": f"{service.url}/hook"})
        )
        yield service


def test_a_failed_rollback_is_announced_even_when_not_subscribed(slack: Service) -> None:
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}, "events": ["promote"]})
    RolloutNotifier(spec=data, event="rollback").notify(_context("rollback", rollback={"reason": "x", "split": "y"}))
    assert slack.requests == []  # the spec subscribes to promotions only
    error = TrafficShiftError("rollback: canary to 0 %: POST http://router failed after 4 attempts: HTTP 503")
    RolloutNotifier(spec=data, event="rollback_failed").notify(_context("rollback", error))
    (sent,) = [q.json()["text"] for q in slack.requests]
    assert sent.startswith("mlcanary: ROLLBACK FAILED for unit-ranker v2 (baseline v1)")
    assert "the canary may still receive traffic. Act now" in sent
    assert f"mlcanary abort --rollout {ROLLOUT} --reason" in sent
    assert "What failed: rollback: canary to 0 %: POST http://router failed after 4 attempts: HTTP 503" in sent
    assert f"/dags/rollout__unit_ranker/runs/{RUN_ID}" in sent


def test_a_rollback_is_announced_from_its_result(slack: Service) -> None:
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}})
    done = {"reason": "guardrails stage 2 breach: p99_latency_ms 424.2 ms >= 250.0 ms", "split": "v1 100 %, v2 0 %"}
    RolloutNotifier(spec=data, event="rollback").notify(_context("rollback", rollback=done))
    (sent,) = [q.json()["text"] for q in slack.requests]
    assert sent.startswith("mlcanary: unit-ranker v2 (baseline v1) rolled back: the canary is at 0 %")
    assert "(the router reports v1 100 %, v2 0 %)" in sent
    assert "Why: guardrails stage 2 breach: p99_latency_ms 424.2 ms &gt;= 250.0 ms" in sent  # Slack shows ">="


def test_a_dead_channel_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}})
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_TEST", json.dumps({"conn_type": "slackwebhook", "password": "http://127.0.0.1:9/hook"})
    )
    RolloutNotifier(spec=data, event="rollback_failed").notify(_context("rollback", RuntimeError("boom")))
    assert "the Slack notification about rollback_failed could not be sent" in caplog.text


HOSTILE = "ctr for region=<!channel> <https://evil.example|click here> & [x](https://evil.example) **now** fell"


def test_values_from_the_data_are_inert_in_slack(slack: Service) -> None:
    """A segment value (it comes from the data) must not ping the channel or add a link."""
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}})
    RolloutNotifier(spec=data, event="rollback").notify(
        _context("rollback", rollback={"reason": f"analysis: {HOSTILE}", "split": "v1 100 %, v2 0 %"})
    )
    (sent,) = [q.json()["text"] for q in slack.requests]
    assert "<!channel>" not in sent and "<https://" not in sent and "&lt;!channel&gt;" in sent
    assert "&lt;https://evil.example|click here&gt; &amp; [x]" in sent


def test_values_from_the_data_are_inert_in_markdown() -> None:
    """The question's body is Markdown: rendered by a CommonMark parser, the escaped text is the
    text as typed, with no link, no emphasis and no HTML."""
    from markdown_it import MarkdownIt

    from mlcanary.escape import markdown_text

    html = MarkdownIt("commonmark").render(markdown_text(HOSTILE))
    assert "<a " not in html and "<strong>" not in html and "<!channel>" not in html
    assert html == "<p>" + HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") + "</p>\n"


@pytest.mark.parametrize(
    ("event", "xcoms"),
    [
        ("rollback", {"rollback": {"reason": "guardrails stage 2 breach", "split": "v1 100 %, v2 0 %"}}),
        ("rollback_failed", {}),
        ("promote", {"promote": "all 3 stages healthy and final analysis PASS"}),
        ("promote_failed", {}),
    ],
)
def test_every_message_links_to_the_rollout_report(slack: Service, event: str, xcoms: dict[str, Any]) -> None:
    """The run's "Rollout report" tab, its id quoted (a run id has ``:`` and ``+``), in every message."""
    data = base_spec(notifications={"slack": {"conn_id": "slack_test"}})
    task = event.split("_")[0]
    RolloutNotifier(spec=data, event=event).notify(_context(task, RuntimeError("boom"), **xcoms))
    (sent,) = [q.json()["text"] for q in slack.requests]
    url = report_url("rollout__unit_ranker", RUN_ID)
    assert f"Report: {url}" in sent
    assert url.endswith(
        "/dags/rollout__unit_ranker/runs/manual__2026-11-27T10%3A00%3A00%2B00%3A00/plugin/rollout_report"
    )
