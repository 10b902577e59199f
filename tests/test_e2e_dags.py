"""Whole rollout DAGs through ``dag.test()`` against live simulated traffic (about 20 s each)."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import base_spec
from mlcanary.routers.base import Split
from mlcanary.simulator import Fault, SimConfig
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import decisions, measurements, predictions, rollouts, traffic_history
from rollout_runner import E2E_ANALYSIS, MODEL, load_dag, run_rollout, warehouse

CTR_FELL = r"analysis( stage \d: failing look 1 of 1 during the bake)?: ctr fell"

pytestmark = pytest.mark.e2e


def test_healthy_candidate_is_promoted(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_rollout(tmp_path, monkeypatch)
    assert out.state == "success", out.task_states
    assert out.rollout.status == "promoted" and out.rollout.stage_reached == 3
    assert out.split.share("v2") == 100.0 and out.split.baseline_version == "v2"
    assert out.traffic == [10.0, 30.0, 60.0, 100.0, 100.0]
    # read back from the router and recorded at the end, with the rollout that set it
    assert out.notes[-1] == f"final split: v2 100 % (set by {out.rollout.rollout_id})"
    assert out.task_states["promote"] == "success"
    assert out.task_states["rollback"] == "skipped" and out.task_states["report"] == "success"
    assert out.rollout.active_model is None  # the lock is released
    assert out.guardrail_polls >= 12  # three stages of 4 s baked at 1 s polls


def test_latency_breach_in_stage_2_rolls_back(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:latency_ms=300;min_percent=30",))
    assert out.state == "failed"
    assert out.rollout.status == "rolled_back" and out.rollout.stage_reached == 2
    assert out.rollout.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert out.split.share("v2") == 0.0 and out.split.baseline_version == "v1"
    assert 60.0 not in out.traffic and out.traffic[-1] == 0.0
    assert out.notes[-1] == f"final split: v1 100 %, v2 0 % (set by {out.rollout.rollout_id})"
    assert out.task_states["stage_2.guardrails"] == "failed"
    assert out.task_states["stage_3.shift_traffic"] == "upstream_failed"  # stage 3 never starts
    assert out.task_states["rollback"] == "success" and out.task_states["report"] == "failed"
    assert out.task_states["promote"] == "upstream_failed"


def test_error_rate_breach_rolls_back(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:error_rate=0.05",))
    assert out.state == "failed"
    assert out.rollout.status == "rolled_back" and out.rollout.stage_reached == 1
    assert "success_rate" in out.rollout.reason
    assert out.split.share("v2") == 0.0
    assert out.task_states["stage_1.guardrails"] == "failed"


def test_ctr_drop_with_healthy_infrastructure_rolls_back_by_analysis(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:ctr_drop=0.4",))
    assert out.state == "failed"
    assert out.rollout.status == "rolled_back"
    assert re.match(CTR_FELL, out.rollout.reason), out.rollout.reason  # a look during a bake, or a gate look
    assert out.split.share("v2") == 0.0
    failed = [t for t, s in out.task_states.items() if s == "failed"]
    assert len(failed) == 2 and "report" in failed  # the task whose look failed, and the run's outcome
    with make_engine(f"sqlite:///{tmp_path}/warehouse.db").connect() as conn:
        m = measurements.c
        breaches = conn.execute(sa.select(sa.func.count()).where(m.tier == "guardrail", m.verdict == "FAIL")).scalar()
    assert breaches == 0  # the infrastructure stayed healthy: the analysis alone rolled back


@pytest.mark.parametrize("kind", ["latency", "errors"])
def test_reaction_time_from_unhealthy_data_to_zero_traffic(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """From the first unhealthy canary request to the canary at 0 %: at most one poll interval + 15 s."""
    interval = 5.0
    fault = {"latency": "v2:latency_ms=300;min_percent=30", "errors": "v2:error_rate=0.5;min_percent=30"}[kind]
    guardrails = {**base_spec()["guardrails"], "interval": f"{interval:g}s", "window": "10s"}
    out = run_rollout(tmp_path, monkeypatch, faults=(fault,), guardrails=guardrails)
    assert out.rollout.status == "rolled_back" and out.rollout.stage_reached == 2
    p = predictions.c
    with make_engine(f"sqlite:///{tmp_path}/warehouse.db").connect() as conn:
        shifted = conn.execute(
            sa.select(sa.func.min(traffic_history.c.applied_at)).where(traffic_history.c.to_percent == 30)
        ).scalar()
        unhealthy = (
            (p.latency_ms > 250) if kind == "latency" else (p.success == 0) & (p.ts >= shifted - timedelta(seconds=1))
        )
        first_bad = conn.execute(sa.select(sa.func.min(p.ts)).where(p.model_version == "v2", unhealthy)).scalar()
        zero = conn.execute(
            sa.select(sa.func.min(traffic_history.c.applied_at)).where(
                traffic_history.c.applied, traffic_history.c.to_percent == 0
            )
        ).scalar()
    reaction = (zero - first_bad).total_seconds()
    print(f"\nreaction time ({kind}): {reaction:.1f} s from the first bad request to 0 % (polls every {interval:g} s)")
    assert 0 < reaction <= interval + 15


def test_second_trigger_for_the_same_model_fails_fast(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, router = warehouse(tmp_path, monkeypatch)
    router.set_split(Split(MODEL, "v1", "v5", 10.0), "other")
    with engine.begin() as conn:
        conn.execute(
            sa.insert(rollouts).values(
                rollout_id="rollout__other/run",
                spec_name="other",
                model=MODEL,
                baseline_version="v1",
                canary_version="v5",
                dry_run=False,
                status="running",
                stage_reached=1,
                canary_percent=10.0,
                started_at=sa.func.now(),
                active_model=MODEL,
            )
        )
    started = time.monotonic()
    dag_run = load_dag(tmp_path, monkeypatch, base_spec()).test(run_conf={"candidate_version": "v2"})
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "failed"
    assert states["validate_and_lock"] == "failed"
    # it never started a rollout: the teardowns of its start do not run, and touch nothing
    assert states["rollback"] == "upstream_failed" and states["report"] == "upstream_failed"
    assert router.get_split(MODEL) == Split(MODEL, "v1", "v5", 10.0)
    assert time.monotonic() - started < 30


def test_a_fail_is_confirmed_by_consecutive_looks(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis = {**E2E_ANALYSIS, "consecutive_fails": 2}
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:ctr_drop=0.4",), analysis=analysis)
    actions = [d.action for d in out.decisions]
    assert "confirm" in actions and actions.index("confirm") < actions.index("rollback")
    confirm = next(d for d in out.decisions if d.action == "confirm")
    assert re.match(r"failing look 1 of 2( during the bake)?: ctr fell", confirm.reason), confirm.reason
    assert out.rollout.status == "rolled_back"
    assert re.match(r"analysis( stage \d: failing look 2 of 2 during the bake)?: ctr fell", out.rollout.reason)
    assert out.split.share("v2") == 0.0


def test_input_drift_between_the_arms_rolls_back_as_invalid(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis = {**E2E_ANALYSIS, "drift": {"features": ["f1"]}}
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:input_drift=1.0",), analysis=analysis)
    assert out.state == "failed"
    assert out.rollout.status == "rolled_back"
    assert out.rollout.reason.startswith("analysis: comparison invalid: input f1 drift between the arms")
    assert out.split.share("v2") == 0.0


def test_extension_ends_at_max_extension_and_rolls_back(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An INCONCLUSIVE final stage (too few samples) with policy extend looks again until
    policies.max_extension, then the policy's fallback rolls back: it never waits forever."""
    analysis = {**E2E_ANALYSIS, "min_samples": 10_000_000}
    started = time.monotonic()
    out = run_rollout(
        tmp_path, monkeypatch, analysis=analysis, policies={"inconclusive": "extend", "max_extension": "8s"}
    )
    extends = [d for d in out.decisions if d.action == "extend"]
    assert 2 <= len(extends) <= 5  # every 2 s for about 8 s
    assert out.rollout.status == "rolled_back"
    assert out.rollout.reason.startswith("final analysis INCONCLUSIVE (policy extend: max_extension reached)")
    assert out.task_states["decide"] == "success" and out.task_states["rollback"] == "success"
    assert time.monotonic() - started < 90


def _when_decided(action: str, fault: str, injected: list[float]) -> Any:
    """Add ``fault`` to the running simulator as soon as a decision ``action`` is recorded."""

    def inject(engine: sa.Engine, config: SimConfig, done: threading.Event) -> None:
        while not done.wait(0.2):
            with engine.connect() as conn:
                if conn.execute(sa.select(decisions.c.id).where(decisions.c.action == action)).first():
                    config.faults.append(Fault.parse(fault))
                    injected.append(time.time())
                    return

    return inject


def test_a_breach_during_an_extension_rolls_back_within_one_interval(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final analysis is INCONCLUSIVE and extends; while it waits for its next look, the
    canary's latency jumps: the guardrails, still polling, roll it back before the next look."""
    analysis = {**E2E_ANALYSIS, "min_samples": 10_000_000, "interval": "20s"}
    injected: list[float] = []
    out = run_rollout(
        tmp_path,
        monkeypatch,
        analysis=analysis,
        policies={"inconclusive": "extend", "max_extension": "60s"},
        inject=_when_decided("extend", "v2:latency_ms=400", injected),
    )
    assert injected, "the analysis never extended"
    assert out.rollout.status == "rolled_back"
    assert out.rollout.reason.startswith("guardrails stage 3 breach: p99_latency_ms")
    assert out.rollout.reason.endswith("(while waiting for the next analysis look)")
    assert out.split.share("v2") == 0.0
    rollback = next(d for d in out.decisions if d.action == "rollback")
    reaction = rollback.decided_at.replace(tzinfo=UTC).timestamp() - injected[0]
    assert reaction < 1 + 2 + 1  # one guardrail interval, the simulator's tick and window filling, a poll
    assert [d.action for d in out.decisions].count("extend") == 1  # no second look: the wait ended first


def test_a_ctr_collapse_early_in_a_long_stage_rolls_back_before_the_bake_ends(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10-minute first stage, infrastructure healthy, CTR down 40 % from the first request: the
    analysis looking every 2 s beside the guardrail polls rolls back within seconds, not after the bake."""
    stages = [{"percent": 10, "bake": "600s"}, {"percent": 50, "bake": "4s"}]
    started = time.monotonic()
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:ctr_drop=0.4",), stages=stages)
    took = time.monotonic() - started
    assert out.state == "failed" and out.rollout.status == "rolled_back" and out.rollout.stage_reached == 1
    assert out.rollout.reason.startswith("analysis stage 1: failing look 1 of 1 during the bake: ctr fell")
    assert out.traffic == [10.0, 0.0] and out.split.share("v2") == 0.0
    assert out.task_states["stage_1.guardrails"] == "failed"  # the stage's watch ended it
    assert out.task_states["stage_1.analysis"] == "upstream_failed"
    with make_engine(f"sqlite:///{tmp_path}/warehouse.db").connect() as conn:
        h = traffic_history.c
        shifted, zero = conn.execute(
            sa.select(sa.func.min(h.applied_at), sa.func.max(h.applied_at)).where(h.applied)
        ).one()
    in_stage = (zero - shifted).total_seconds()
    print(f"\nCTR collapse: rolled back {in_stage:.1f} s into a 600 s stage ({took:.0f} s in all)")
    assert in_stage < 90 and took < 120


def test_advance_on_pass_holds_an_inconclusive_stage_then_rolls_back(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``advance_on: pass``: a healthy candidate with too little evidence never leaves stage 1; it is
    looked at again until ``max_extension`` is spent, then rolled back with the rule named."""
    analysis = {**E2E_ANALYSIS, "min_samples": 10_000_000, "advance_on": "pass"}
    out = run_rollout(
        tmp_path, monkeypatch, analysis=analysis, policies={"inconclusive": "extend", "max_extension": "6s"}
    )
    assert out.rollout.status == "rolled_back" and out.rollout.stage_reached == 1
    assert out.rollout.reason.startswith("analysis: still INCONCLUSIVE after 6 s (advance_on pass)")
    assert out.traffic == [10.0, 0.0]
    extended = [d for d in out.decisions if d.action == "extend"]
    assert extended and all(d.stage == 1 for d in extended)
    assert extended[0].reason.startswith("INCONCLUSIVE, advance_on pass: looking again in 2 s")


def test_a_warehouse_that_fails_the_pre_flight_check_is_refused_before_any_traffic(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec mapping a label column the table does not have: ``validate_and_lock`` refuses with the
    check's findings; no lock, no split change, the candidate not marked."""
    warehouse = {"predictions": {"columns": {"label": "outcome"}}}
    out = run_rollout(tmp_path, monkeypatch, warehouse=warehouse)
    assert out.state == "failed" and out.task_states["validate_and_lock"] == "failed"
    assert out.rollout is None and out.traffic == []
    assert out.split == Split(MODEL, "v1", None, 0.0)
    assert out.task_states["rollback"] == "upstream_failed"
