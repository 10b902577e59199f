"""The ``mlcanary`` command: the core's commands, plus the two for on-call that need Airflow.

- ``mlcanary status [--model M] [--json]``: every rollout that holds its model's lock, with its stage,
  the split the router reports, its Airflow run, and its last checks. A lock whose run is no longer
  running is reported as stale, with the command that clears it; nothing is taken over silently.
  Exit code 0 when nothing needs a person, 1 otherwise.
- ``mlcanary abort --rollout ID --reason TEXT [--by NAME]``: roll the canary back (unless promoted),
  record who and why, release the lock once the split is safe, and stop the Airflow run if it runs.
  Exit code 0 when the lock was released, 1 when the split is still not safe.

Both read the routers' credentials from Airflow connections and the runs from Airflow's metadata
database, like the ``airflow`` command does, so run them where ``airflow`` runs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from mlcanary import cli as core
from mlcanary import rollout as steps
from mlcanary.lifecycle import describe, stale_reason
from mlcanary.report import format_table, last_checks
from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema


def _engine(args: argparse.Namespace) -> Engine:
    """``--warehouse`` (or ``$MLCANARY_WAREHOUSE``), else the Airflow connection ``mlcanary_warehouse``."""
    if args.warehouse:
        return make_engine(args.warehouse)
    from mlcanary_airflow.hooks import WarehouseHook

    return WarehouseHook().get_engine()


def run_state(rollout_id: str) -> tuple[str | None, str | None]:
    """(state of the rollout's Airflow run or None if it does not exist, why it could not be read)."""
    try:
        import sqlalchemy as sa
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        dag_id, run_id = rollout_id.split("/", 1)
        with create_session() as session:
            state = session.scalar(sa.select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        return (None if state is None else str(getattr(state, "value", state))), None
    except Exception as exc:  # the metadata database is down: say so, decide nothing
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _router(rollout: steps.Rollout) -> Any:
    from mlcanary_airflow.hooks import router_for

    if rollout.spec is None:
        raise core.UsageError(f"{rollout.rollout_id} has no stored spec (it started before mlcanary kept them)")
    return router_for(RolloutSpec.model_validate(rollout.spec))


def _status_of(engine: Engine, rollout: steps.Rollout) -> dict[str, Any]:
    state, error = run_state(rollout.rollout_id)
    try:
        split = describe(_router(rollout).get_split(rollout.model))
    except Exception as exc:
        split = f"could not be read: {type(exc).__name__}: {exc}"
    stale = None if error else stale_reason(rollout.status, state)
    attention = stale or (f"{rollout.status}: {rollout.reason}" if rollout.status.needs_a_person else None)
    with engine.connect() as conn:
        checks = last_checks(conn, rollout.rollout_id)
    stages = len(rollout.spec["stages"]) if rollout.spec else "?"
    return {
        "rollout_id": rollout.rollout_id,
        "model": rollout.model,
        "baseline_version": rollout.baseline_version,
        "canary_version": rollout.canary_version,
        "status": rollout.status.value,
        "stage": f"{rollout.stage_reached} of {stages}",
        "split": split,
        "lock_holder": rollout.rollout_id,
        "airflow_run": (error and f"unknown ({error})") or (state or "deleted"),
        "stale": stale,
        "needs_attention": attention,
        "clear_with": (f"mlcanary abort --rollout '{rollout.rollout_id}' --reason '...'" if attention else None),
        "reason": rollout.reason,
        "last_checks": checks,
    }


def cmd_status(args: argparse.Namespace) -> int:
    engine = _engine(args)
    create_schema(engine, contract=False)  # a warehouse of an older mlcanary gains the new columns
    with engine.connect() as conn:
        locked = steps.locked_rollouts(conn, args.model)
    found = [_status_of(engine, r) for r in locked]
    if args.json:
        print(json.dumps(found, indent=2))
    elif not found:
        print("no rollout holds a lock" + (f" for {args.model}" if args.model else ""))
    else:
        rows = [
            [s["rollout_id"], s["canary_version"], s["status"], s["stage"], s["split"], s["airflow_run"]] for s in found
        ]
        print(format_table(rows, ["rollout (lock holder)", "candidate", "status", "stage", "split", "airflow run"]))
        for s in found:
            for tier, look in s["last_checks"].items():
                counts = ", ".join(f"{v} {n}" for v, n in sorted(look["verdicts"].items()))
                print(f"  {s['rollout_id']}: last {tier} look {look['at']}: {counts}")
                for reason in look["not_passing"]:
                    print(f"    - {reason}")
            if s["needs_attention"]:
                print(
                    f"  NEEDS ATTENTION {s['rollout_id']}: {s['needs_attention']}\n    clear it with: {s['clear_with']}"
                )
    return 1 if any(s["needs_attention"] for s in found) else 0


def cmd_abort(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise core.UsageError("--reason must say why")
    engine = _engine(args)
    create_schema(engine, contract=False)
    with engine.connect() as conn:
        rollout = steps.get_rollout(conn, args.rollout)
    if rollout is None:
        raise core.UsageError(f"no rollout {args.rollout!r} in this warehouse")
    try:
        done = steps.abort(engine, _router(rollout), args.rollout, args.reason.strip(), args.by)
    except steps.RolloutError as exc:
        raise core.UsageError(str(exc)) from None
    stopped = _stop_run(args.rollout)
    if done.released:
        from mlcanary_airflow import snapshots

        spec_dir = os.environ.get("MLCANARY_SPEC_DIR") or "include/rollouts"
        snapshots.remove(snapshots.snapshot_dir(spec_dir), rollout.spec_name, args.rollout)
    result = {
        "rollout_id": args.rollout,
        "status": done.rollout.status.value,
        "split": describe(done.split),
        "released": done.released,
        "problem": done.state.problem,
        "airflow_run": stopped,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.rollout}: {result['status']}; the router reports {result['split']}")
        print("lock released" if done.released else f"STILL LOCKED: {done.state.problem}")
        print(f"Airflow run: {stopped}")
    return 0 if done.released else 1


def _stop_run(rollout_id: str) -> str:
    """Mark the rollout's Airflow run failed if it still runs (its teardowns then find nothing to do)."""
    try:
        import sqlalchemy as sa
        from airflow.api_fastapi.core_api.datamodels.dag_run import DagRunMutableStates
        from airflow.api_fastapi.core_api.services.public.dag_run import patch_dag_run_state
        from airflow.models.dagbag import DBDagBag
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        dag_id, run_id = rollout_id.split("/", 1)
        with create_session() as session:
            run = session.scalar(sa.select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
            if run is None:
                return "none (deleted)"
            if str(run.state) not in ("queued", "running"):
                return f"already {run.state}"
            dag = DBDagBag().get_dag_for_run(run, session=session)
            if dag is None:
                return f"{run.state}: its DAG was not found, stop it in the UI"
            patch_dag_run_state(dag=dag, dag_run=run, state=DagRunMutableStates.FAILED, session=session)
        return "marked failed"
    except Exception as exc:  # Airflow is not reachable from here: the traffic part is done anyway
        return f"not stopped ({type(exc).__name__}: {exc}); mark it failed in the UI"


def add_commands(sub: Any) -> None:
    p = sub.add_parser("status", help="rollouts that hold a lock: stage, split, Airflow run, last checks")
    core._warehouse(p)
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("abort", help="roll a rollout back now, record who and why, release its lock")
    core._warehouse(p)
    p.add_argument("--rollout", required=True, help="rollout id (dag_id/run_id)")
    p.add_argument("--reason", required=True, help="why (recorded, and shown to the rollout's channels)")
    p.add_argument("--by", default=os.environ.get("USER") or getpass.getuser(), help="who (default: $USER)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_abort)


def main(argv: Sequence[str] | None = None) -> int:
    return core.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())
