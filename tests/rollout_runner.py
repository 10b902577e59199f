"""Running whole rollout DAGs in tests: ``dag.test()`` against live simulated traffic.

The simulator runs in a thread and follows the routing table the DAG writes, as a serving layer would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from airflow.dag_processing.dagbag import DagBag

from conftest import ROOT, base_spec
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, measurements, rollouts, traffic_history

MODEL = "unit-ranker"
# Tuned as a user would for this traffic: ~3,000 canary samples by the last stage.
E2E_ANALYSIS = {**base_spec()["analysis"], "sequential_n_star": 3000, "metrics": [{"name": "ctr", "tolerance": 0.15}]}
E2E_POLICIES = {"inconclusive": "extend", "max_extension": "30s"}


@dataclass
class Outcome:
    state: str
    task_states: dict[str, str]
    rollout: sa.Row | None  # None: the run never started a rollout
    split: Split | None
    traffic: list[float]  # the applied steps' canary shares
    notes: list[str]  # every traffic-history row's note, applied or not
    decisions: list[sa.Row]
    guardrail_polls: int


def _answer_hitl_requests_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dag.test()`` runs triggers in process, on a supervisor that lacks the triggerer's two
    human-in-the-loop handlers (Airflow 3.3: its own HITL tasks no longer use a trigger). Give it
    the triggerer's (``TriggerRunnerSupervisor._handle_request``), which our guarded questions use."""
    from airflow.jobs.triggerer_job_runner import HITLDetailResponseResult
    from airflow.sdk.execution_time.comms import GetHITLDetailResponse, UpdateHITLDetail
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor

    original = InProcessTestSupervisor._handle_request

    def handle(self: Any, msg: Any, log: Any, req_id: int) -> None:
        if isinstance(msg, UpdateHITLDetail):
            api = self.client.hitl.update_response(
                ti_id=msg.ti_id, chosen_options=msg.chosen_options, params_input=msg.params_input
            )
        elif isinstance(msg, GetHITLDetailResponse):
            api = self.client.hitl.get_detail_response(ti_id=msg.ti_id)
        else:
            return original(self, msg, log, req_id)
        self.send_msg(HITLDetailResponseResult.from_api_response(response=api), request_id=req_id, error=None)

    monkeypatch.setattr(InProcessTestSupervisor, "_handle_request", handle)


def load_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The DAG as Airflow sees it: the spec in a spec folder, built by the real factory file."""
    _answer_hitl_requests_in_process(monkeypatch)
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "unit_ranker.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MLCANARY_SPEC_DIR", str(spec_dir))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[f"rollout__{parse_spec(spec).name}"]


def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[sa.Engine, WarehouseRouter]:
    """A fresh SQLite warehouse, reachable from the DAG through the mlcanary_warehouse connection."""
    db = tmp_path / "warehouse.db"
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    monkeypatch.setenv("AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return engine, WarehouseRouter(engine)


def run_rollout(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    faults: tuple[str, ...] = (),
    run_conf: dict[str, Any] | None = None,
    while_running: Callable[[str, threading.Event], None] | None = None,
    before: Callable[[sa.Engine], None] | None = None,
    inject: Callable[[sa.Engine, SimConfig, threading.Event], None] | None = None,
    **spec_overrides: Any,
) -> Outcome:
    """One whole rollout through ``dag.test()`` against the live simulator.

    ``while_running(dag_id, done)`` runs beside the DAG (a person answering, say) until ``done`` is set;
    ``before(engine)`` prepares the warehouse (the registry, say) before the run starts;
    ``inject(engine, config, done)`` runs beside it too and may add faults to the running simulator.
    """
    engine, router = warehouse(tmp_path, monkeypatch)
    router.set_split(Split(MODEL, "v1", None, 0.0), None)
    if before is not None:
        before(engine)
    config = SimConfig(model=MODEL, seed=3, label_delay=timedelta(seconds=1), faults=[Fault.parse(f) for f in faults])
    sim = LiveSimulator(engine, config, rate=600, tick=0.5)
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    time.sleep(2)  # some baseline traffic before the rollout starts
    try:
        overrides = {"analysis": E2E_ANALYSIS, "policies": E2E_POLICIES, **spec_overrides}
        dag = load_dag(tmp_path, monkeypatch, base_spec(**overrides))
        done = threading.Event()
        helpers = []  # dag.test() needs the main thread (signal handlers): the helpers get others
        if while_running is not None:
            helpers.append(threading.Thread(target=while_running, args=(dag.dag_id, done), daemon=True))
        if inject is not None:
            helpers.append(threading.Thread(target=inject, args=(engine, config, done), daemon=True))
        for helper in helpers:
            helper.start()
        try:
            dag_run = dag.test(run_conf={"candidate_version": "v2"} if run_conf is None else run_conf)
        finally:
            done.set()
            for helper in helpers:
                helper.join(timeout=30)
    finally:
        sim.stop_event.set()
        thread.join(timeout=30)
    with engine.connect() as conn:
        found = conn.execute(sa.select(rollouts)).all()
        traffic = [
            h.to_percent
            for h in conn.execute(
                sa.select(traffic_history).where(traffic_history.c.applied).order_by(traffic_history.c.id)
            )
        ]
        notes = [h.note for h in conn.execute(sa.select(traffic_history).order_by(traffic_history.c.id))]
        decided = conn.execute(sa.select(decisions).order_by(decisions.c.id)).all()
        polls = conn.execute(
            sa.select(sa.func.count(sa.distinct(measurements.c.measured_at))).where(measurements.c.tier == "guardrail")
        ).scalar()
    return Outcome(
        state=str(dag_run.state),
        task_states={ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()},
        rollout=found[0] if found else None,
        split=router.get_split(MODEL),
        traffic=traffic,
        notes=notes,
        decisions=decided,
        guardrail_polls=polls,
    )
