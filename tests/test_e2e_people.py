"""People and schedules around a rollout, end to end with ``dag.test()``:

- a person answers human-in-the-loop tasks through Airflow's REST endpoint (``PATCH .../hitlDetails``),
  or nobody answers and the scheduler's timeout sweep applies the safe default;
- notifications reach a local Slack-webhook stand-in and a local SMTP server;
- a scheduled run takes its candidate from the registry, or skips cleanly without one;
- promotion points an MLflow alias at the promoted version.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import Inbox
from local_servers import Service
from mlcanary import registry
from mlcanary.warehouse.schema import registry as registry_table
from mlcanary_airflow.links import report_url
from rollout_runner import E2E_ANALYSIS, run_rollout

pytestmark = pytest.mark.e2e
INCONCLUSIVE = {**E2E_ANALYSIS, "min_samples": 10_000_000}  # never enough samples: the final verdict is INCONCLUSIVE


@pytest.fixture(scope="session")
def api(airflow_db: None) -> Any:
    """Airflow's REST API, in process, on the tests' metadata DB. The test home makes every user an
    admin (``simple_auth_manager_all_admins``), whose token answers as the user "Anonymous"."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    client = TestClient(create_app())
    token = client.get("/auth/token").json()["access_token"]
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def _awaiting(dag_id: str) -> tuple[str, str] | None:
    """(run id, task id) of a task of ``dag_id`` waiting for a person, if any: its question has no
    answer yet (the task waits deferred, watched by the guardrails)."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.scalars(
            sa.select(TI)
            .join(HITLDetail, HITLDetail.ti_id == TI.id)
            .where(TI.dag_id == dag_id, HITLDetail.responded_at.is_(None))
        ).first()
        return None if ti is None else (ti.run_id, ti.task_id)


def answer(
    api: Any, answers: dict[str, str | None], seen: list[dict[str, Any]] | None = None
) -> Callable[[str, threading.Event], None]:
    """Answer each awaited task through the REST endpoint; ``None``: let its timeout pass, then run the
    scheduler's awaiting-input sweep (what the scheduler does every loop). ``seen`` gets each question
    as the REST API (and the UI's Required Actions) shows it."""

    def respond(dag_id: str, done: threading.Event) -> None:
        pending = dict(answers)
        while not done.is_set():
            found = _awaiting(dag_id)
            if found is None or found[1] not in pending:
                time.sleep(0.5)
                continue
            run_id, task_id = found
            option = pending.pop(task_id)
            if option is None:
                from airflow.jobs.job import Job
                from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

                time.sleep(6)  # the specs below time out after 5 s
                SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
                continue
            detail = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails")
            assert detail.status_code == 200, detail.text
            assert option in detail.json()["options"]
            if seen is not None:
                seen.append(detail.json())
            reply = api.patch(
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails",
                json={"chosen_options": [option], "params_input": {}},
            )
            assert reply.status_code == 200, reply.text

    return respond


NOTIFY = {
    "slack": {"conn_id": "slack_rollouts"},
    "email": {"conn_id": "smtp_rollouts", "to": ["ml-oncall@example.com"]},
}


def _slack_texts(slack: Service) -> list[str]:
    return [q.json()["text"] for q in slack.requests if q.method == "POST"]


def test_a_person_promotes_an_inconclusive_candidate(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels: tuple[Service, Inbox]
) -> None:
    slack, inbox = channels
    seen: list[dict[str, Any]] = []
    out = run_rollout(
        tmp_path,
        monkeypatch,
        analysis=INCONCLUSIVE,
        policies={"inconclusive": "ask", "ask_timeout": "5m"},
        notifications=NOTIFY,
        while_running=answer(api, {"decide": "Promote"}, seen),
    )
    assert out.state == "success", out.task_states
    assert out.rollout.status == "promoted" and out.split.baseline_version == "v2"
    assert out.task_states["decide"] == "success" and out.task_states["rollback"] == "skipped"
    chosen = [d for d in out.decisions if d.action == "promote_chosen"]
    assert len(chosen) == 1 and chosen[0].reason.startswith("Promote chosen by Anonymous")
    assert out.rollout.reason.startswith("Promote chosen by Anonymous")
    # a person's choice, recorded as one: not a PASS of the analysis
    (promote,) = [d for d in out.decisions if d.action == "promote"]
    assert promote.verdict is None and promote.reason.startswith("Promote chosen by Anonymous")
    assert chosen[0].verdict is None
    # the question names both versions, shows the checks that decided and links to the report
    (question,) = seen
    assert question["subject"] == "Promote unit-ranker v2? The final analysis is INCONCLUSIVE"
    body = question["body"]
    assert body.startswith("**Candidate `v2`** against **baseline `v1`**: the final analysis is **INCONCLUSIVE**.")
    evidence = [line for line in body.splitlines() if line.startswith("- ")]
    assert evidence and all(line.startswith(("- INCONCLUSIVE: ", "- PASS: ", "- ... and")) for line in evidence)
    assert "No answer within 5 min rolls back." in body
    run_id = out.rollout.rollout_id.split("/", 1)[1]
    assert f"[Rollout report]({report_url('rollout__unit_ranker', run_id)})" in body
    texts = _slack_texts(slack)
    asked = next(t for t in texts if "waits for a decision" in t)
    assert "INCONCLUSIVE" in asked and "/required_actions" in asked and "Respond: http" in asked
    promoted = next(t for t in texts if "promoted" in t)
    assert "unit-ranker v2 (baseline v1) promoted" in promoted and "/dags/rollout__unit_ranker/runs/" in promoted
    subjects = [m["Subject"] for m in inbox.messages]
    assert "mlcanary: unit-ranker v2 (baseline v1) promoted" in subjects
    assert all(m["To"] == "ml-oncall@example.com" for m in inbox.messages)


def test_no_answer_in_time_rolls_back(api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_rollout(
        tmp_path,
        monkeypatch,
        analysis=INCONCLUSIVE,
        policies={"inconclusive": "ask", "ask_timeout": "5s"},
        while_running=answer(api, {"decide": None}),
    )
    assert out.state == "failed"
    assert out.rollout.status == "rolled_back" and out.split.share("v2") == 0.0
    assert out.rollout.reason == "Roll back chosen by default: no answer within 5 s"
    assert out.task_states["promote"] == "skipped" and out.task_states["rollback"] == "success"


def test_extend_looks_again_then_decides(api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_rollout(
        tmp_path,
        monkeypatch,
        analysis=INCONCLUSIVE,
        policies={"inconclusive": "ask", "ask_timeout": "5m", "max_extension": "6s"},
        while_running=answer(api, {"decide": "Extend"}),
    )
    assert out.task_states["extend"] == "success"
    assert out.task_states["promote_after_extension"] == "skipped" and out.task_states["promote"] == "skipped"
    assert out.rollout.status == "rolled_back"
    assert out.rollout.reason.startswith("extended analysis still INCONCLUSIVE after 6 s")
    assert [d.action for d in out.decisions].count("extend") >= 2  # the choice, then the looks


@pytest.mark.parametrize(("option", "promoted"), [("Approve", True), ("Reject", False)])
def test_approval_before_the_final_stage(
    api: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    channels: tuple[Service, Inbox],
    option: str,
    promoted: bool,
) -> None:
    slack, _ = channels
    seen: list[dict[str, Any]] = []
    out = run_rollout(
        tmp_path,
        monkeypatch,
        approval={"before_final_stage": True, "timeout": "5m"},
        notifications={**NOTIFY, "events": ["approval", "rollback"]},
        while_running=answer(api, {"approve_final_stage": option}, seen),
    )
    asked = [t for t in _slack_texts(slack) if "waits for a decision" in t]
    assert len(asked) == 1 and "the final stage" in asked[0]
    run_id = out.rollout.rollout_id.split("/", 1)[1]
    report = report_url("rollout__unit_ranker", run_id)
    assert f"Report: {report}" in asked[0]
    (question,) = seen
    assert question["subject"] == "Roll unit-ranker v2 out to 60 % (the final stage)?"
    body = question["body"]
    assert body.startswith(
        "**Candidate `v2`** against **baseline `v1`**: it passed stages 1 to 2; the last analysis is "
    )
    assert re.search(r"^- (PASS|INCONCLUSIVE): ctr", body, re.M), body  # the checks that decided
    assert "Approve moves it to 60 % for 4 s; Reject rolls it back to 0 %. No answer within 5 min rejects." in body
    assert f"[Rollout report]({report})" in body
    if promoted:
        assert out.state == "success" and out.rollout.status == "promoted"
        assert out.traffic == [10.0, 30.0, 60.0, 100.0, 100.0]
        assert not any("rolled back" in t for t in _slack_texts(slack))  # not an event this spec notifies
    else:
        assert out.state == "failed" and out.rollout.status == "rolled_back"
        assert out.rollout.stage_reached == 2 and 60.0 not in out.traffic and out.split.share("v2") == 0.0
        assert out.rollout.reason == "final stage not approved: Reject by Anonymous"
        assert out.task_states["stage_3.shift_traffic"] == "skipped"
        rolled = next(t for t in _slack_texts(slack) if "rolled back" in t)
        assert "Why: final stage not approved: Reject by Anonymous" in rolled


def test_scheduled_run_takes_the_registry_candidate_and_updates_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    client.create_registered_model("unit-ranker")
    for n in (1, 2):
        client.create_model_version("unit-ranker", source=f"s3://models/unit-ranker/{n}")
    client.set_registered_model_alias("unit-ranker", "champion", "1")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "generic", "extra": {"tracking_uri": tracking}})
    )

    def register(engine: sa.Engine) -> None:
        registry.register(engine, "unit-ranker", "v2", note="nightly retrain")

    out = run_rollout(
        tmp_path,
        monkeypatch,
        schedule="@daily",
        registry={"mlflow": {"registered_model": "unit-ranker", "alias": "champion", "version": "v{version}"}},
        run_conf={},  # as the scheduler starts it: no candidate given
        before=register,
    )
    assert out.state == "success" and out.rollout.canary_version == "v2" and out.rollout.status == "promoted"
    assert str(client.get_model_version_by_alias("unit-ranker", "champion").version) == "2"
    engine = sa.create_engine(f"sqlite:///{tmp_path}/warehouse.db")
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(registry_table.c.version, registry_table.c.status)).all())
    assert statuses == {"v2": "baseline"}


def test_scheduled_run_without_a_candidate_skips_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    out = run_rollout(tmp_path, monkeypatch, schedule="@daily", run_conf={})
    assert out.state == "success"  # nothing to do is not a failure
    assert out.rollout is None and out.traffic == []
    assert out.task_states["validate_and_lock"] == "skipped"
    assert all(state == "skipped" for state in out.task_states.values())
    said = capfd.readouterr()
    text = said.out + said.err
    assert text.count("no new candidate for unit-ranker in the registry: nothing to roll out") >= 1


def test_a_breach_while_waiting_for_approval_rolls_back_and_closes_the_question(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody answers the approval (timeout 5 min); meanwhile the canary's latency jumps. The
    guardrails, still watching stage 2, roll it back within about one interval and answer the
    question themselves (Reject, by nobody): it leaves Required Actions."""
    from airflow.models.hitl import HITLDetail
    from airflow.utils.session import create_session

    from test_e2e_dags import _when_decided

    injected: list[float] = []
    out = run_rollout(
        tmp_path,
        monkeypatch,
        approval={"before_final_stage": True, "timeout": "5m"},
        inject=_when_decided("ask", "v2:latency_ms=400", injected),
    )
    assert injected, "the approval was never asked"
    assert out.state == "failed" and out.rollout.status == "rolled_back"
    assert out.rollout.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert out.rollout.reason.endswith("(while waiting for approval of the final stage)")
    assert out.split.share("v2") == 0.0 and 60.0 not in out.traffic
    rollback = next(d for d in out.decisions if d.action == "rollback")
    assert rollback.decided_at.replace(tzinfo=UTC).timestamp() - injected[0] < 1 + 2 + 1
    with create_session() as session:
        detail = session.scalars(sa.select(HITLDetail)).all()[-1]
        assert detail.responded_at is not None and detail.chosen_options == ["Reject"]
        assert detail.responded_by is None  # answered by the guardrails, not a person
