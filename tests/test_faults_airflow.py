"""Fault injection against a real Airflow (scheduler, DAG processor, triggerer, API server, LocalExecutor):
what operators really do to a running or finished rollout, done through Airflow's REST API.

Each test has a spec (and a model) of its own, so the tests share one Airflow and still pass alone
and in any order. Each asserts the final split, the lock, the registry and the audit rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from airflow_stack import AirflowStack
from conftest import base_spec
from local_servers import Service, serve, traffic_service
from mlcanary import registry
from mlcanary import rollout as steps
from mlcanary.lifecycle import Status
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.routers.webhook import WebhookRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, traffic_history

pytestmark = [pytest.mark.faults, pytest.mark.airflow]

SECRET = "fault-webhook-secret"
# Enough evidence for a quick PASS: a loose tolerance, few samples, one fixed look.
QUICK_ANALYSIS = {
    "interval": "2s",
    "window": "10m",
    "label_delay": "1s",
    "min_label_window": "1s",
    "min_samples": 100,
    "sequential": False,
    "segments": [],
    "metrics": [{"name": "ctr", "tolerance": 0.5}],
}
GUARDRAILS = {**base_spec()["guardrails"], "min_requests": 10, "success_rate_min": 0.9}


# Bakes of 12 s at least: a trigger that fires within seconds of its deferral can meet Airflow 3.3's
# race between the deferral's executor event and the resumed task (apache/airflow#72716, #71580),
# in which the scheduler fails the resumed task; seen here under CI load with a 3 s bake.
BAKE = "12s"


def _spec(name: str, **overrides: Any) -> dict[str, Any]:
    data = base_spec(
        name=name,
        model=name.replace("_", "-"),
        stages=[{"percent": 20, "bake": BAKE}, {"percent": 50, "bake": BAKE}],
        guardrails=GUARDRAILS,
        analysis=QUICK_ANALYSIS,
        policies={"inconclusive": "rollback"},
        retries={"traffic": 2, "rollback": 2, "delay": "2s"},
    )
    data.update(overrides)
    return data


SPECS = {
    "f_clear": _spec("f_clear", stages=[{"percent": 50, "bake": BAKE}]),
    "f_mark_failed": _spec("f_mark_failed", stages=[{"percent": 20, "bake": "300s"}, {"percent": 50, "bake": BAKE}]),
    "f_mark_success": _spec("f_mark_success", approval={"before_final_stage": True, "timeout": "30m"}),
    "f_ask_breach": _spec("f_ask_breach", approval={"before_final_stage": True, "timeout": "30m"}),
    "f_delete": _spec("f_delete", stages=[{"percent": 20, "bake": "300s"}, {"percent": 50, "bake": BAKE}]),
    "f_stale": _spec("f_stale", stages=[{"percent": 20, "bake": "300s"}, {"percent": 50, "bake": BAKE}]),
    "f_kill": _spec(
        "f_kill",
        router={"kind": "webhook", "conn_id": "fault_router", "retries": 0, "timeout": "60s"},
        stages=[{"percent": 20, "bake": BAKE}, {"percent": 50, "bake": BAKE}],
        # no background look within the 12 s bake: the stage's gate look is the one that decides FAIL
        analysis={**QUICK_ANALYSIS, "interval": "30s"},
    ),
    "f_edit": _spec("f_edit", stages=[{"percent": 20, "bake": "20s"}, {"percent": 50, "bake": BAKE}]),
}


@pytest.fixture(scope="module")
def warehouse_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults-warehouse") / "warehouse.db"


@pytest.fixture(scope="module")
def hanging_router() -> Iterator[Service]:
    """The webhook router of ``f_kill``: a rollback POST hangs while ``hang`` is set, as a stuck platform."""
    honest = traffic_service(SECRET)

    def handle(service: Service, request: Any) -> tuple[int, dict | None]:
        if request.method == "POST" and request.json().get("canary_percent") == 0 and service.state.get("hang"):
            service.state["hung"] = service.state.get("hung", 0) + 1
            time.sleep(service.state["hang"])
        return honest(service, request)

    with serve(handle) as service:
        yield service


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, warehouse_db: Path, hanging_router: Service
) -> Iterator[AirflowStack]:
    if os.environ.get("CI") != "true" and os.environ.get("MLCANARY_SKIP_AIRFLOW_STACK"):
        pytest.skip("MLCANARY_SKIP_AIRFLOW_STACK is set")
    spec_dir = tmp_path_factory.mktemp("fault-specs")
    for name, data in SPECS.items():
        (spec_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
    engine = make_engine(f"sqlite:///{warehouse_db}")
    create_schema(engine)
    env = {
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)}),
        "AIRFLOW_CONN_FAULT_ROUTER": json.dumps(
            {"conn_type": "http", "extra": {"url": hanging_router.url, "allow_http": True}, "password": SECRET}
        ),
        "MLCANARY_WATCHDOG_SECONDS": "10",
    }
    airflow = AirflowStack(tmp_path_factory.mktemp("airflow-home"), spec_dir, env)
    try:
        airflow.start()
        for name in SPECS:
            airflow.wait_dag(f"rollout__{name}")
        yield airflow
    except Exception:
        print(airflow.logs())
        raise
    finally:
        airflow.stop()


class Traffic:
    """The live simulator for one model, following the split its router holds, in a thread."""

    def __init__(self, engine: sa.Engine, model: str, router: Any = None, faults: tuple[str, ...] = ()) -> None:
        config = SimConfig(
            model=model, seed=7, label_delay=timedelta(seconds=1), faults=[Fault.parse(f) for f in faults]
        )
        self.config = config  # faults appended here show from the next tick
        self.started_with = len(config.faults)
        self.sim = LiveSimulator(engine, config, rate=400, tick=0.5, router=router)
        self.thread = threading.Thread(target=self.sim.run, daemon=True)
        self.written: list[tuple[float, int]] = []  # (when a tick was committed, faults it was made with)
        step = self.sim.step

        def recorded(t0: datetime, t1: datetime, split: Split | None) -> None:
            faults = len(config.faults)
            step(t0, t1, split)
            self.written.append((time.time(), faults))

        self.sim.step = recorded  # type: ignore[method-assign]

    def first_written_with_faults(self) -> float:
        """When the first tick made with a fault appended after the start was committed."""
        return next(at for at, faults in self.written if faults > self.started_with)

    def __enter__(self) -> Traffic:
        self.thread.start()
        time.sleep(2)  # some baseline traffic before the rollout starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop_event.set()
        self.thread.join(timeout=30)


def _serving(engine: sa.Engine, model: str, version: str = "v1") -> WarehouseRouter:
    router = WarehouseRouter(engine)
    router.set_split(Split(model, version, None, 0.0), None)
    return router


def _rollout(engine: sa.Engine, rollout_id: str) -> steps.Rollout:
    with engine.connect() as conn:
        found = steps.get_rollout(conn, rollout_id)
    assert found is not None, rollout_id
    return found


def _applied(engine: sa.Engine, rollout_id: str) -> list[tuple[float | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(traffic_history.c.to_percent, traffic_history.c.note)
            .where(traffic_history.c.rollout_id == rollout_id, traffic_history.c.applied)
            .order_by(traffic_history.c.id)
        ).all()
    return [(r.to_percent, r.note) for r in rows]


def _decisions(engine: sa.Engine, rollout_id: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(decisions.c.action, decisions.c.reason)
            .where(decisions.c.rollout_id == rollout_id)
            .order_by(decisions.c.id)
        ).all()
    return [(r.action, r.reason) for r in rows]


def test_marking_a_run_failed_while_its_guardrails_wait_rolls_back(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_mark_failed", "f-mark-failed"
    router = _serving(engine, model)
    with Traffic(engine, model):
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",))
        assert router.get_split(model) == Split(model, "v1", "v2", 20.0)
        stack.call("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"})  # the UI's "Mark failed"
        assert stack.wait_run(dag_id, run_id) == "failed"
    states = stack.states(dag_id, run_id)
    assert states["stage_1.guardrails"] == "failed" and states["stage_2.shift_traffic"] == "skipped"
    assert states["rollback"] == "success" and states["report"] == "failed"  # the teardowns ran
    assert router.get_split(model) == Split(model, "v1", "v2", 0.0)
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert rollout.reason == "the run ended without promotion: stage_1.guardrails failed (or the run was stopped)"
    with engine.connect() as conn:
        assert registry.get(conn, model, "v2").status == "rejected"  # type: ignore[union-attr]
    assert [p for p, _ in _applied(engine, rollout.rollout_id)] == [20.0, 0.0]


def test_marking_a_run_success_while_a_person_is_asked_rolls_back(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_mark_success", "f-mark-success"
    router = _serving(engine, model)
    with Traffic(engine, model):
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_task(dag_id, run_id, "approve_final_stage", ("deferred",))  # asked, watched
        assert router.get_split(model) == Split(model, "v1", "v2", 20.0)
        stack.call("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "success"})  # "Mark success"
        final = stack.wait_run(dag_id, run_id)
    states = stack.states(dag_id, run_id)
    assert states["approve_final_stage"] == "success" and states["stage_2.shift_traffic"] == "skipped"
    assert states["promote"] == "skipped" and states["rollback"] == "success"
    assert final == "failed" and states["report"] == "failed"  # not promoted: the run fails, alerting fires
    assert router.get_split(model) == Split(model, "v1", "v2", 0.0)
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert rollout.reason.startswith("the run ended without promotion")
    assert [p for p, _ in _applied(engine, rollout.rollout_id)] == [20.0, 0.0]


def test_a_breach_while_a_person_is_asked_rolls_back_and_closes_the_question(
    stack: AirflowStack, warehouse_db: Path
) -> None:
    """The real triggerer: the approval waits, watched; the canary's latency jumps; the guardrails
    roll it back and answer the question (Reject, by nobody), so it leaves Required Actions."""
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_ask_breach", "f-ask-breach"
    router = _serving(engine, model)
    with Traffic(engine, model) as traffic:
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_task(dag_id, run_id, "approve_final_stage", ("deferred",))
        assert router.get_split(model) == Split(model, "v1", "v2", 20.0)
        traffic.config.faults.append(Fault.parse("v2:latency_ms=400"))
        injected = time.time()
        final = stack.wait_run(dag_id, run_id)
    assert final == "failed" and router.get_split(model) == Split(model, "v1", "v2", 0.0)
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert rollout.reason is not None and rollout.reason.startswith("guardrails stage 1 breach: p99_latency_ms")
    assert rollout.reason.endswith("(while waiting for approval of the final stage)")
    assert [p for p, _ in _applied(engine, rollout.rollout_id)] == [20.0, 0.0]
    with engine.connect() as conn:
        rolled_back_at = conn.execute(
            sa.select(sa.func.max(traffic_history.c.applied_at)).where(
                traffic_history.c.rollout_id == rollout.rollout_id, traffic_history.c.applied
            )
        ).scalar_one()
    # From the commit of the first slow rows: the next poll starts within an interval (1 s) and may take
    # up to its limit (5 s), then the rollback. The simulator's own lag under CI load (6.6 s from the
    # fault's injection to the rollback once) is not the watch's.
    visible = traffic.first_written_with_faults()
    delay = rolled_back_at.replace(tzinfo=UTC).timestamp() - visible
    assert visible - injected < 30 and delay < 1 + 5, f"rolled back {delay:.1f} s after the slow rows showed"
    body = stack.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve_final_stage/-1/hitlDetails")
    assert body["response_received"] and body["chosen_options"] == ["Reject"] and body["responded_by_user"] is None
    assert stack.states(dag_id, run_id)["stage_2.shift_traffic"] == "skipped"


def test_deleting_the_dag_while_its_guardrails_wait_is_finished_by_the_watchdog(
    stack: AirflowStack, warehouse_db: Path
) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_delete", "f-delete"
    router = _serving(engine, model)
    with Traffic(engine, model):
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",))
        deleted_at = time.monotonic()
        stack.call("DELETE", f"/dags/{dag_id}")  # the run and its deferred task are gone
        stack.wait_for("the watchdog to roll back", lambda: router.get_split(model).canary_percent == 0.0, 90)
        reaction = time.monotonic() - deleted_at
    print(f"\nwatchdog: canary at 0 % {reaction:.1f} s after the DAG was deleted (checks every 10 s)")
    assert stack.run_state(dag_id, run_id) is None
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert (
        "abort",
        "aborted by the mlcanary watchdog: its Airflow run was deleted before the rollout finished",
    ) in _decisions(engine, rollout.rollout_id)
    assert [p for p, _ in _applied(engine, rollout.rollout_id)] == [20.0, 0.0]
    with engine.connect() as conn:
        assert registry.get(conn, model, "v2").status == "rejected"  # type: ignore[union-attr]


def _mlcanary(stack: AirflowStack, warehouse_db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The mlcanary command as on-call runs it: where airflow runs, with its configuration."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "mlcanary"), *args, "--warehouse", f"sqlite:///{warehouse_db}"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_reports_a_stale_lock_and_abort_clears_it(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_stale", "f-stale"
    router = _serving(engine, model)
    stack.call("PATCH", "/dags/mlcanary_watchdog", json={"is_paused": True})  # so the lock stays stale
    try:
        with Traffic(engine, model):
            run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
            stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",))
            rollout_id = f"{dag_id}/{run_id}"
            healthy = _mlcanary(stack, warehouse_db, "status", "--model", model, "--json")
            assert healthy.returncode == 0, healthy.stderr
            (entry,) = json.loads(healthy.stdout)
            assert entry["airflow_run"] == "running" and entry["stale"] is None and entry["status"] == "running"
            assert entry["split"].startswith("v1 80 %, v2 20 %") and entry["stage"] == "1 of 2"
            stack.call("DELETE", f"/dags/{dag_id}")
            stale = _mlcanary(stack, warehouse_db, "status", "--model", model)
            assert stale.returncode == 1  # needs a person
            assert f"NEEDS ATTENTION {rollout_id}: its Airflow run was deleted" in stale.stdout
            assert f"mlcanary abort --rollout '{rollout_id}' --reason" in stale.stdout
            assert router.get_split(model) == Split(model, "v1", "v2", 20.0)  # reported, never taken over
            aborted = _mlcanary(
                stack, warehouse_db, "abort", "--rollout", rollout_id, "--reason", "stale", "--by", "oncall"
            )
            assert aborted.returncode == 0, aborted.stdout + aborted.stderr
            assert "lock released" in aborted.stdout and "Airflow run: none (deleted)" in aborted.stdout
    finally:
        stack.call("PATCH", "/dags/mlcanary_watchdog", json={"is_paused": False})
    assert router.get_split(model) == Split(model, "v1", "v2", 0.0)
    rollout = _rollout(engine, rollout_id)
    assert (
        rollout.status is Status.ROLLED_BACK and not rollout.holds_lock and rollout.reason == "aborted by oncall: stale"
    )
    assert _mlcanary(stack, warehouse_db, "status", "--model", model).stdout.startswith("no rollout holds a lock")


def test_abort_stops_a_running_rollout(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_stale", "f-stale"
    router = _serving(engine, model)
    with Traffic(engine, model):
        run_id = stack.trigger(dag_id, {"candidate_version": "v3"})
        stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",))
        aborted = _mlcanary(
            stack, warehouse_db, "abort", "--rollout", f"{dag_id}/{run_id}", "--reason", "bad CTR on the dashboard"
        )
        assert aborted.returncode == 0, aborted.stdout + aborted.stderr
        assert router.get_split(model) == Split(model, "v1", "v3", 0.0)  # at once, before the run ends
        assert "Airflow run: marked failed" in aborted.stdout
        assert stack.wait_run(dag_id, run_id) == "failed"
    states = stack.states(dag_id, run_id)
    assert states["rollback"] == "skipped" and states["report"] == "failed"  # nothing left to do
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert rollout.reason.startswith("aborted by ") and rollout.reason.endswith(": bad CTR on the dashboard")
    assert [p for p, _ in _applied(engine, rollout.rollout_id)] == [20.0, 0.0]


def test_clearing_tasks_of_an_ended_run_changes_no_traffic(stack: AirflowStack, warehouse_db: Path) -> None:
    """Run A promoted v2, run B promoted v3; then A's shift_traffic and rollback are cleared (the usual
    "Clear" after an incident). Nothing of A may touch B's split, the registry or the lock."""
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_clear", "f-clear"
    router = _serving(engine, model)
    with Traffic(engine, model):
        run_a = stack.trigger(dag_id, {"candidate_version": "v2"})
        assert stack.wait_run(dag_id, run_a) == "success", stack.states(dag_id, run_a)
        run_b = stack.trigger(dag_id, {"candidate_version": "v3"})
        assert stack.wait_run(dag_id, run_b) == "success", stack.states(dag_id, run_b)
        promoted = router.get_split(model)
        assert promoted == Split(model, "v3", None, 0.0) and promoted.owner == f"{dag_id}/{run_b}"
        before = _applied(engine, f"{dag_id}/{run_a}")
        stack.call(
            "POST",
            f"/dags/{dag_id}/clearTaskInstances",
            json={
                "dag_run_id": run_a,
                "task_ids": ["stage_1.shift_traffic", "rollback"],
                "only_failed": False,
                "reset_dag_runs": True,
                "dry_run": False,
            },
        )
        stack.wait_for("A to run again", lambda: stack.run_state(dag_id, run_a) in ("queued", "running"), 30)
        stack.wait_run(dag_id, run_a)
    assert router.get_split(model) == promoted and router.get_split(model).owner == f"{dag_id}/{run_b}"
    assert _applied(engine, f"{dag_id}/{run_a}") == before  # A changed nothing
    with engine.connect() as conn:
        assert registry.get(conn, model, "v3").status == "baseline"  # type: ignore[union-attr]
        assert registry.get(conn, model, "v2").status == "retired"  # type: ignore[union-attr]
        assert steps.lock_holder(conn, model) is None
    tis = stack.tasks(dag_id, run_a)
    ran = {t: ti for t, ti in tis.items() if ti["try_number"] > 1}
    assert ran, "nothing of run A ran again"
    logs = "".join(stack.task_log(dag_id, run_a, t, ti["try_number"]) for t, ti in ran.items())
    assert "this run's rollout already ended (promoted" in logs or "no longer holds its model's lock" in logs


def test_an_analysis_killed_after_its_fail_decision_does_not_bring_the_rollout_back(
    stack: AirflowStack, warehouse_db: Path, hanging_router: Service
) -> None:
    """The analysis decides FAIL and calls the router, which hangs; its process is killed (SIGKILL).
    Airflow retries the task: the retry must not look again and let the rollout go on."""
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_kill", "f-kill"
    webhook = WebhookRouter(hanging_router.url, SECRET, timeout=60, retries=0)
    webhook.set_split(Split(model, "v1", None, 0.0), None)
    hanging_router.state.update(hang=15, hung=0)
    with Traffic(engine, model, router=webhook, faults=("v2:ctr_drop=0.9",)):
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_for("the rollback call to hang", lambda: hanging_router.state["hung"] >= 1, 180)
        analysis = stack.tasks(dag_id, run_id)["stage_1.analysis"]
        assert analysis["state"] == "running" and analysis["pid"], analysis
        os.kill(analysis["pid"], signal.SIGKILL)  # killed between the decision and the router's answer
        hanging_router.state["hang"] = 0
        assert stack.wait_run(dag_id, run_id) == "failed"
    rollout_id = f"{dag_id}/{run_id}"
    tis = stack.tasks(dag_id, run_id)
    assert tis["stage_1.analysis"]["state"] == "failed" and tis["stage_1.analysis"]["try_number"] == 2
    retry = stack.task_log(dag_id, run_id, "stage_1.analysis", 2)
    assert "this rollout is rolling_back: it may not keep watching" in retry
    assert tis["stage_2.shift_traffic"]["state"] == "upstream_failed"  # the rollout did not go on
    assert tis["rollback"]["state"] == "success"
    assert webhook.get_split(model) == Split(model, "v1", "v2", 0.0)
    rollout = _rollout(engine, rollout_id)
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    rollbacks = [r for a, r in _decisions(engine, rollout_id) if a == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0].startswith("analysis: ctr fell")
    assert not any(a == "advance" and "50 %" in r for a, r in _decisions(engine, rollout_id))


def test_a_spec_broken_then_deleted_mid_rollout_does_not_strand_it(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    dag_id, model = "rollout__f_edit", "f-edit"
    router = _serving(engine, model)
    path = stack.spec_dir / "f_edit.yaml"
    with Traffic(engine, model):
        run_id = stack.trigger(dag_id, {"candidate_version": "v2"})
        stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",))
        path.write_text("name: f_edit\nstages: [{percent: 20, bake: 20s\n")  # a broken edit
        time.sleep(8)  # the DAG processor parses the folder again (every 3-5 s here)
        assert not stack.call("GET", f"/dags/{dag_id}")["is_stale"]  # still there: built from the snapshot
        stack.wait_task(dag_id, run_id, "stage_2.shift_traffic", ("success",), 120)
        path.unlink()  # and now deleted
        final = stack.wait_run(dag_id, run_id)
    states = stack.states(dag_id, run_id)
    assert final == "success", states  # every remaining task ran, on the spec the rollout started with
    assert states["stage_2.analysis"] == "success" and states["promote"] == "success"
    assert states["report"] == "success" and states["rollback"] == "skipped"
    assert router.get_split(model) == Split(model, "v2", None, 0.0)
    rollout = _rollout(engine, f"{dag_id}/{run_id}")
    assert rollout.status is Status.PROMOTED and not rollout.holds_lock
    assert rollout.spec is not None and rollout.spec["stages"][0]["bake"] == "20s"
    assert not (stack.spec_dir / ".running" / "f_edit.json").exists()  # the snapshot went with the lock
