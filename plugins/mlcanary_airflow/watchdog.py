"""The watchdog: a small DAG that finishes rollouts whose own run cannot any more.

Teardown tasks cover a run that fails or that a person marks failed or success. They cannot cover a
run that is gone: deleting a DAG (``DELETE /api/v2/dags/{dag_id}``, ``airflow dags delete``) deletes
its runs, deferred and waiting tasks included, and nothing of that run will ever run again. Every
``MLCANARY_WATCHDOG_SECONDS`` (default 60) the watchdog lists the rollouts that hold a lock, asks
Airflow for each one's run, and where the run is deleted or ended without finishing
(:func:`mlcanary.lifecycle.stale_reason`) it does what ``mlcanary abort`` does: canary to 0 % unless
promoted, read the split back, release the lock once it is safe. It records why and tells the
rollout's channels.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, BaseOperator, Context

from mlcanary import rollout as steps
from mlcanary.lifecycle import stale_reason
from mlcanary.spec import RolloutSpec, load_specs
from mlcanary_airflow import snapshots
from mlcanary_airflow.hooks import WarehouseHook, router_for
from mlcanary_airflow.notifiers import send

DAG_ID = "mlcanary_watchdog"


def _run_state(context: Context, rollout_id: str) -> str | None:
    """The state of the rollout's Airflow run, None if it does not exist."""
    dag_id, run_id = rollout_id.split("/", 1)
    ti = context["ti"]
    if not ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]):
        return None
    state = ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    return str(getattr(state, "value", state))  # a DagRunState, or its string


class WatchdogOperator(BaseOperator):
    """Finish the rollouts whose runs were deleted or ended without finishing them."""

    ui_color = "#f3e8fd"

    def __init__(self, *, spec_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_dir = spec_dir

    def warehouses(self) -> set[str]:
        """The warehouse connections of every spec, and of every running rollout's stored spec."""
        specs, _ = load_specs(self.spec_dir)
        running, _ = snapshots.load_all(snapshots.snapshot_dir(self.spec_dir))
        ids = {spec.warehouse.conn_id for _, spec in specs}
        for snap in running:
            ids.add(str(snap.spec.get("warehouse", {}).get("conn_id", "mlcanary_warehouse")))
        return ids or {"mlcanary_warehouse"}

    def execute(self, context: Context) -> list[dict[str, Any]]:
        acted: list[dict[str, Any]] = []
        for conn_id in sorted(self.warehouses()):
            try:
                engine = WarehouseHook(conn_id).get_engine()
                with engine.connect() as conn:
                    locked = steps.locked_rollouts(conn)
            except Exception as exc:  # one warehouse down must not stop the others being watched
                self.log.error("mlcanary watchdog: cannot read the locks in %s: %s", conn_id, exc)
                continue
            for rollout in locked:
                why = stale_reason(rollout.status, _run_state(context, rollout.rollout_id))
                if why is None:
                    continue
                acted.append(self._finish(context, engine, rollout, why))
        self.log.info("mlcanary watchdog: %d rollout(s) finished", len(acted))
        return acted

    def _finish(self, context: Context, engine: Any, rollout: steps.Rollout, why: str) -> dict[str, Any]:
        self.log.warning("mlcanary watchdog: %s: %s", rollout.rollout_id, why)
        if rollout.spec is None:
            self.log.error("mlcanary watchdog: %s has no stored spec: run mlcanary abort", rollout.rollout_id)
            return {"rollout_id": rollout.rollout_id, "why": why, "status": "no stored spec"}
        spec = RolloutSpec.model_validate(rollout.spec)
        try:
            done = steps.abort(
                engine, router_for(spec), rollout.rollout_id, why, by="the mlcanary watchdog", key="watchdog"
            )
        except Exception as exc:  # the router is down: try again next time, the lock stays
            self.log.error("mlcanary watchdog: could not finish %s: %s", rollout.rollout_id, exc)
            return {"rollout_id": rollout.rollout_id, "why": why, "status": f"failed: {exc}"}
        if done.released:
            snapshots.remove(snapshots.snapshot_dir(self.spec_dir), spec.name, rollout.rollout_id)
        state = done.rollout.status.value
        subject = f"mlcanary watchdog: {spec.model} {rollout.canary_version} {state.replace('_', ' ')}"
        text = f"{subject}: rollout {rollout.rollout_id}: {why}. " + (
            f"The lock is released. {done.state.problem or ''}"
            if done.released
            else f"Still locked: {done.state.problem}."
        )
        send(spec, subject, text, context, "watchdog")
        return {"rollout_id": rollout.rollout_id, "why": why, "status": state, "released": done.released}


def build_watchdog_dag(spec_dir: str | Path) -> DAG:
    seconds = float(os.environ.get("MLCANARY_WATCHDOG_SECONDS", "60"))
    with DAG(
        dag_id=DAG_ID,
        description="finishes rollouts whose Airflow runs were deleted or ended without finishing them",
        doc_md=__doc__,
        schedule=timedelta(seconds=seconds),
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=False,
        dagrun_timeout=timedelta(seconds=max(10 * seconds, 600)),
        tags=["mlcanary"],
    ) as dag:
        WatchdogOperator(task_id="finish_stale_rollouts", spec_dir=str(spec_dir))
    return dag
