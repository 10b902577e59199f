"""Fault injection around whole rollouts (``dag.test()``) and single steps: a baseline that does not
serve, a rejected candidate, the warehouse gone in the middle of a rollout, a router that will not
roll back, a platform that reverts a promotion, a process killed between the router and its records.

The faults are real: a PostgreSQL connection cut by stopping the TCP proxy in front of it, HTTP 503s
from a traffic service, a SIGKILL. Each test asserts the final split, the lock, the registry and the
audit rows. The faults only ``airflow`` itself can inject (clear, mark failed or success, delete,
kill a task) are in ``test_faults_airflow.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import ROOT, Inbox, base_spec
from local_servers import Service, TcpProxy, serve, traffic_service
from mlcanary import registry
from mlcanary import rollout as steps
from mlcanary.lifecycle import Status
from mlcanary.routers.base import Split
from mlcanary.routers.webhook import WebhookRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, traffic_history
from rollout_runner import E2E_ANALYSIS, MODEL, load_dag, run_rollout

pytestmark = pytest.mark.faults
SECRET = "faults-hmac-secret"


def _rows(engine: sa.Engine, table: sa.Table, rollout_id: str) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.id)).all()


def _rollout(engine: sa.Engine) -> steps.Rollout:
    with engine.connect() as conn:
        (row,) = conn.execute(sa.text("select rollout_id from mlcanary_rollouts")).all()
        found = steps.get_rollout(conn, row.rollout_id)
    assert found is not None
    return found


# --- what serves is the baseline -----------------------------------------------------------------


def test_a_baseline_that_does_not_serve_is_refused_before_any_traffic(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_rollout(tmp_path, monkeypatch, run_conf={"candidate_version": "v3", "baseline_version": "v0"})
    assert out.state == "failed" and out.task_states["validate_and_lock"] == "failed"
    assert out.rollout is None  # no lock taken, nothing recorded as a rollout
    assert out.split == Split(MODEL, "v1", None, 0.0) and out.traffic == []
    assert out.task_states["stage_1.shift_traffic"] == "upstream_failed"


def test_a_leftover_canary_blocks_the_start(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def leftover(engine: sa.Engine) -> None:
        from mlcanary.routers.warehouse import WarehouseRouter

        WarehouseRouter(engine).set_split(Split(MODEL, "v1", "v5", 50.0), "rollout__unit_ranker/old-run")

    out = run_rollout(tmp_path, monkeypatch, before=leftover)
    assert out.task_states["validate_and_lock"] == "failed" and out.rollout is None
    assert out.split == Split(MODEL, "v1", "v5", 50.0)  # untouched: the start refuses, it never repairs


def test_a_rejected_candidate_is_refused_unless_forced_with_a_reason(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rejected(engine: sa.Engine) -> None:
        with engine.begin() as conn:
            registry.mark(
                conn, MODEL, "v2", "rejected", "rollout__unit_ranker/earlier", "analysis: ctr fell 0.24 → 0.17"
            )

    out = run_rollout(tmp_path, monkeypatch, before=rejected)
    assert out.task_states["validate_and_lock"] == "failed" and out.rollout is None and out.traffic == []
    (tmp_path / "again").mkdir()
    forced = run_rollout(
        tmp_path / "again",
        monkeypatch,
        before=rejected,
        run_conf={"candidate_version": "v2", "force_reason": "the CTR join was fixed in the logging pipeline"},
    )
    assert forced.rollout is not None and forced.state == "success"  # healthy now: promoted
    force = [d for d in forced.decisions if d.action == "force"]
    assert len(force) == 1 and force[0].reason.endswith(": the CTR join was fixed in the logging pipeline")


# --- the warehouse is gone in the middle of a rollout ----------------------------------------------


@pytest.fixture
def traffic() -> Iterator[Service]:
    with serve(traffic_service(SECRET)) as service:
        yield service


def _dag_test(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spec: dict[str, Any],
    sim_engine: sa.Engine,
    router: Any,  # what the simulated serving layer routes by (get_split)
    faults: tuple[str, ...] = (),
    beside: Callable[[threading.Event], None] | None = None,
) -> Any:
    """One rollout through ``dag.test()``, the simulator following the webhook router's split."""
    config = SimConfig(model=MODEL, seed=5, label_delay=timedelta(seconds=1), faults=[Fault.parse(f) for f in faults])
    sim = LiveSimulator(sim_engine, config, rate=600, tick=0.5, router=router)
    threads = [threading.Thread(target=sim.run, daemon=True)]
    done = threading.Event()
    if beside is not None:
        threads.append(threading.Thread(target=beside, args=(done,), daemon=True))
    threads[0].start()
    time.sleep(2)
    for t in threads[1:]:
        t.start()
    try:
        return load_dag(tmp_path, monkeypatch, spec).test(run_conf={"candidate_version": "v2"})
    finally:
        done.set()
        sim.stop_event.set()
        for t in threads:
            t.join(timeout=60)


def _webhook_spec(**overrides: Any) -> dict[str, Any]:
    return base_spec(
        router={"kind": "webhook", "conn_id": "faults_router", "retries": 1, "timeout": "3s"},
        analysis=E2E_ANALYSIS,
        policies={"inconclusive": "extend", "max_extension": "30s"},
        notifications={
            "slack": {"conn_id": "slack_rollouts"},
            "email": {"conn_id": "smtp_rollouts", "to": ["oncall@x.io"]},
        },
        retries={"traffic": 2, "rollback": 2, "delay": "1s"},
        **overrides,
    )


@pytest.mark.postgres
def test_a_rollback_reaches_the_router_and_is_announced_with_the_warehouse_down(
    airflow_db: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_engine: sa.Engine,
    traffic: Service,
    channels: tuple[Service, Inbox],
) -> None:
    """PostgreSQL goes away (the proxy in front of it stops) during stage 1: the guardrails cannot
    read it, fail closed and roll back. The webhook router is healthy, so the canary reaches 0 % and
    the message goes out while the warehouse is still down; the records follow when it is back."""
    slack, inbox = channels
    url = pg_engine.url
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    through_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE",
        json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": through_proxy}}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAULTS_ROUTER",
        json.dumps({"conn_type": "http", "extra": {"url": traffic.url, "allow_http": True}, "password": SECRET}),
    )
    router = WebhookRouter(traffic.url, SECRET)
    router.set_split(Split(MODEL, "v1", None, 0.0), None)
    seen: dict[str, float] = {}

    def outage(done: threading.Event) -> None:
        while not done.is_set() and (router.get_split(MODEL) or Split(MODEL, "v1", None, 0)).canary_percent == 0:
            time.sleep(0.2)  # until stage 1 moved traffic
        time.sleep(1.5)
        proxy.stop()
        seen["down"] = time.monotonic()
        while not done.is_set() and (router.get_split(MODEL).canary_percent > 0 or not slack.requests):  # type: ignore[union-attr]
            time.sleep(0.2)
        seen["zero_and_announced"] = time.monotonic()
        time.sleep(3)
        seen["back"] = time.monotonic()
        proxy.start()

    spec = _webhook_spec(
        guardrails={**base_spec()["guardrails"], "error_limit": 2},
        stages=[{"percent": 10, "bake": "12s"}, {"percent": 30, "bake": "4s"}],
    )
    dag_run = _dag_test(tmp_path, monkeypatch, spec, pg_engine, router, beside=outage)
    proxy.stop()
    assert "down" in seen and seen["zero_and_announced"] < seen["back"]  # both while the warehouse was down
    assert router.get_split(MODEL) == Split(MODEL, "v1", "v2", 0.0)
    texts = [q.json()["text"] for q in slack.requests]
    assert any(t.startswith("mlcanary: unit-ranker v2 (baseline v1) rolled back: the canary is at 0 %") for t in texts)
    assert [m["Subject"] for m in inbox.messages] == ["mlcanary: unit-ranker v2 (baseline v1) rolled back"]
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert states["stage_1.guardrails"] == "failed" and states["rollback"] == "success"
    rollout = _rollout(pg_engine)  # the records followed once the warehouse was back
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert rollout.reason.startswith("guardrails stage 1 error: metric source error 2 of 2 in a row")
    history = _rows(pg_engine, traffic_history, rollout.rollout_id)
    zero = [h for h in history if h.applied and h.to_percent == 0.0]
    assert len(zero) == 1 and zero[0].from_percent == 10.0  # recorded once, and not as "already in force"
    assert "(applied by an earlier attempt" in zero[0].note or "recorded late" in zero[0].note
    with pg_engine.connect() as conn:
        assert registry.get(conn, MODEL, "v2").status == "rejected"  # type: ignore[union-attr]


# --- no false all-clear --------------------------------------------------------------------------


def _refusing_rollbacks(secret: str) -> Any:
    """A traffic service whose platform will not take the canary back to 0 % (HTTP 503, every time)."""
    honest = traffic_service(secret)

    def handle(service: Service, request: Any) -> tuple[int, dict | None]:
        body = request.json() if request.method == "POST" else {}
        if body.get("canary_version") and body.get("canary_percent") == 0:
            service.state["refused"] = service.state.get("refused", 0) + 1
            return 503, {"error": "the platform is degraded"}
        return honest(service, request)

    return handle


def test_a_rollback_that_fails_keeps_the_model_locked_and_alerts_every_channel(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels: tuple[Service, Inbox]
) -> None:
    slack, inbox = channels
    engine, _ = _sqlite_warehouse(tmp_path, monkeypatch)
    with serve(_refusing_rollbacks(SECRET)) as service:
        router = _webhook(monkeypatch, service)
        dag_run = _dag_test(tmp_path, monkeypatch, _webhook_spec(), engine, router, faults=("v2:latency_ms=300",))
        assert service.state["refused"] >= 3  # the sensor's attempt, then the teardown's two tries
        assert router.get_split(MODEL) == Split(MODEL, "v1", "v2", 10.0)  # still there: said, not hidden
        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
        assert states["rollback"] == "failed" and states["report"] == "failed" and str(dag_run.state) == "failed"
        rollout = _rollout(engine)
        assert rollout.status is Status.ROLLBACK_FAILED and rollout.holds_lock  # no false all-clear
        assert rollout.reason.startswith("the canary still has traffic: v1 90 %, v2 10 %")
        history = _rows(engine, traffic_history, rollout.rollout_id)
        assert history[-1].note.startswith("final split: v1 90 %, v2 10 %") and history[-1].to_percent == 10.0
        assert any(h.note.startswith("FAILED rollback: canary to 0 %") for h in history)
        actions = [d.action for d in _rows(engine, decisions, rollout.rollout_id)]
        assert actions.count("rollback") == 1 and "rollback_failed" in actions
        texts = [q.json()["text"] for q in slack.requests]
        subjects = [m["Subject"] for m in inbox.messages]
        for said in (texts, subjects):  # every channel, from the rollback task and from report
            assert any(s.startswith("mlcanary: ROLLBACK FAILED for unit-ranker v2") for s in said), said
            assert any(s.startswith("mlcanary: ROLLBACK FAILED for unit-ranker") and "v2 (" not in s for s in said)
        # The next rollout of the model is refused with the reason, and touches nothing.
        (tmp_path / "next").mkdir()
        again = load_dag(tmp_path / "next", monkeypatch, _webhook_spec()).test(run_conf={"candidate_version": "v3"})
        ti = {t.task_id: t for t in again.get_task_instances()}
        assert str(ti["validate_and_lock"].state) == "failed"
        assert router.get_split(MODEL) == Split(MODEL, "v1", "v2", 10.0)
    with engine.connect() as conn:
        assert steps.lock_holder(conn, MODEL).rollout_id == rollout.rollout_id  # type: ignore[union-attr]
        assert registry.get(conn, MODEL, "v3") is None


def _reverting_promotions(secret: str) -> Any:
    """A traffic service that takes a promotion, answers one read of it (the step's read-back), then
    goes back to v1: a platform that rolled back on its own."""
    honest = traffic_service(secret)

    def handle(service: Service, request: Any) -> tuple[int, dict | None]:
        answer = honest(service, request)
        if request.method == "POST" and request.json().get("baseline_version") == "v2":  # v2 promoted
            service.state["reads_left"] = 1
        elif request.method == "GET" and "reads_left" in service.state:
            service.state["reads_left"] -= 1
            if service.state["reads_left"] < 0:
                service.state["splits"][MODEL] = {
                    "model": MODEL,
                    "baseline_version": "v1",
                    "canary_version": None,
                    "canary_percent": 0.0,
                    "rollout_id": "platform-restore",
                }
                return 200, service.state["splits"][MODEL]
        return answer

    return handle


class _Serving:
    """What the serving layer routes by: the traffic service's state, read without HTTP, so that every
    GET the service counts is the rollout's own."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def get_split(self, model: str) -> Split | None:
        found = self.service.state.get("splits", {}).get(model)
        return (
            None
            if found is None
            else Split(model, found["baseline_version"], found["canary_version"], float(found["canary_percent"]))
        )


def test_a_promotion_the_platform_reverted_fails_the_run_and_alerts(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels: tuple[Service, Inbox]
) -> None:
    slack, _ = channels
    engine, _ = _sqlite_warehouse(tmp_path, monkeypatch)
    with serve(_reverting_promotions(SECRET)) as service:
        _webhook(monkeypatch, service)
        dag_run = _dag_test(tmp_path, monkeypatch, _webhook_spec(), engine, _Serving(service))
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert states["promote"] == "success" and states["report"] == "failed" and str(dag_run.state) == "failed"
    rollout = _rollout(engine)
    assert rollout.status is Status.SPLIT_MISMATCH and rollout.holds_lock
    assert rollout.reason.startswith("v2 was promoted, but the platform reports v1 100 % (set by platform-restore)")
    alert = [q.json()["text"] for q in slack.requests if "SPLIT MISMATCH" in q.json()["text"]]
    assert len(alert) == 1 and "mlcanary abort --rollout" in alert[0]


def _sqlite_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[sa.Engine, Path]:
    db = tmp_path / "warehouse.db"
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    monkeypatch.setenv("AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return engine, db


def _webhook(monkeypatch: pytest.MonkeyPatch, service: Service) -> WebhookRouter:
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAULTS_ROUTER",
        json.dumps({"conn_type": "http", "extra": {"url": service.url, "allow_http": True}, "password": SECRET}),
    )
    router = WebhookRouter(service.url, SECRET)
    router.set_split(Split(MODEL, "v1", None, 0.0), None)
    return router


# --- records you can trust -----------------------------------------------------------------------

_STEP_IN_A_CHILD = """
import json, sys
from mlcanary import rollout as steps
from mlcanary.routers.webhook import WebhookRouter
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
url, service, secret, spec, ref = sys.argv[1:]
steps.shift_to_stage(make_engine(url), WebhookRouter(service, secret), parse_spec(json.loads(spec)),
                     steps.RolloutRef.from_dict(json.loads(ref)), 1)
"""


def test_a_step_killed_between_the_router_and_its_records_is_not_called_already_in_force(
    tmp_path: Path, traffic: Service
) -> None:
    """A process sets the split on the router, then waits for the warehouse (another writer holds it)
    and is killed (SIGKILL) before it records anything. The retry must say the split was set by that
    attempt, not that it was already in force, and record it once."""
    db = tmp_path / "warehouse.db"
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    router = WebhookRouter(traffic.url, SECRET)
    router.set_split(Split(MODEL, "v1", None, 0.0), None)
    data = base_spec()
    spec = parse_spec(data)
    started = steps.begin_rollout(engine, router, spec, "rollout__unit_ranker/run-1", "v2")
    blocker = sa.create_engine(f"sqlite:///{db}", connect_args={"timeout": 1}).raw_connection()
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the warehouse
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _STEP_IN_A_CHILD,
            f"sqlite:///{db}",
            traffic.url,
            SECRET,
            json.dumps(data),
            json.dumps(started.ref.to_dict()),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
    )
    try:
        deadline = time.monotonic() + 60
        while traffic.state.get("applied", 1) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert traffic.state.get("applied") == 2, "the child never reached the router"
        time.sleep(1)  # it read the split back and waits for the warehouse now
        assert child.poll() is None
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        blocker.rollback()
        blocker.close()
    assert router.get_split(MODEL) == Split(MODEL, "v1", "v2", 10.0)
    assert [h.note for h in _rows(engine, traffic_history, started.rollout_id)][1:] == []  # nothing recorded
    steps.shift_to_stage(engine, router, spec, started.ref, 1)  # the task's retry
    (step,) = _rows(engine, traffic_history, started.rollout_id)[1:]
    assert step.applied and (step.from_percent, step.to_percent) == (0.0, 10.0)
    assert step.note == "stage 1: canary to 10 % (applied by an earlier attempt, whose record was lost)"
    assert traffic.state["applied"] == 2  # the retry wrote nothing to the router
    advances = [d for d in _rows(engine, decisions, started.rollout_id) if d.action == "advance"]
    assert len(advances) == 1
