"""A rollout's life: lock, traffic steps, promotion or rollback, and release.

These functions are what the Airflow tasks call; they work the same from a script or a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mlcanary import registry
from mlcanary.audit import record_decision
from mlcanary.routers.base import Router, Split, TrafficShiftError
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import rollouts, traffic_history


class RolloutError(RuntimeError):
    """The rollout cannot start (bad versions, no baseline, another rollout active)."""


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    spec_name: str
    model: str
    baseline_version: str
    canary_version: str
    dry_run: bool
    status: str
    stage_reached: int
    canary_percent: float
    reason: str | None
    started_at: datetime

    @classmethod
    def from_row(cls, row: sa.Row) -> Rollout:
        return cls(
            row.rollout_id,
            row.spec_name,
            row.model,
            row.baseline_version,
            row.canary_version,
            bool(row.dry_run),
            row.status,
            row.stage_reached,
            float(row.canary_percent),
            row.reason,
            row.started_at,
        )


def get_rollout(conn: Connection, rollout_id: str) -> Rollout | None:
    row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one_or_none()
    return None if row is None else Rollout.from_row(row)


def begin_rollout(
    engine: Engine,
    router: Router,
    spec: RolloutSpec,
    rollout_id: str,
    canary_version: str,
    baseline_version: str | None = None,
    dry_run: bool = False,
) -> Rollout:
    """Validate the versions and take the model's lock. Retrying with the same id is harmless."""
    with engine.connect() as conn:
        existing = get_rollout(conn, rollout_id)
    if existing is not None:
        return existing
    current = router.get_split(spec.model)
    if baseline_version is None:
        if current is None:
            raise RolloutError(
                f"model {spec.model!r} has no traffic split yet, so there is no baseline to compare "
                "with: pass baseline_version"
            )
        baseline_version = current.baseline_version
    if canary_version == baseline_version:
        raise RolloutError(f"candidate and baseline are the same version {canary_version!r}")
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(rollouts).values(
                    rollout_id=rollout_id,
                    spec_name=spec.name,
                    model=spec.model,
                    baseline_version=baseline_version,
                    canary_version=canary_version,
                    dry_run=dry_run,
                    status="running",
                    stage_reached=0,
                    canary_percent=0.0,
                    started_at=utcnow(),
                    active_model=spec.model,
                )
            )
            if not dry_run:
                registry.mark(conn, spec.model, canary_version, "rolling_out", rollout_id, "rollout started")
    except IntegrityError:
        with engine.connect() as conn:
            holder = conn.execute(
                sa.select(rollouts.c.rollout_id, rollouts.c.canary_version, rollouts.c.started_at).where(
                    rollouts.c.active_model == spec.model
                )
            ).one_or_none()
        if holder is None:
            raise
        raise RolloutError(
            f"model {spec.model!r} already has an active rollout: {holder.rollout_id} "
            f"(candidate {holder.canary_version}, started {holder.started_at:%Y-%m-%d %H:%M:%S} UTC); "
            "wait for it to end or stop it first. No traffic was changed."
        ) from None
    if current is None and not dry_run:
        # First rollout of this model: record that the baseline serves everything.
        router.set_split(Split(spec.model, baseline_version, None, 0.0), rollout_id)
    with engine.connect() as conn:
        started = get_rollout(conn, rollout_id)
    assert started is not None
    return started


def apply_split(engine: Engine, router: Router, rollout: Rollout, target: Split, note: str) -> Split:
    """Apply ``target`` unless it is already in force, read it back, and record the step.

    A retry of the same step finds the split in force and changes nothing. The read-back must send
    the same traffic to each version (a platform may not know which one is the baseline). A failure (the router
    gave up, or the read-back differs) is recorded with the split the platform reports afterwards,
    so the split is never unknown, then raised as :class:`TrafficShiftError`: the task retries.
    """
    try:
        before = router.get_split(target.model)
    except Exception as exc:  # the platform cannot even be read: record that, the task retries
        _history(engine, rollout, target, None, None, False, f"FAILED {note}: the split could not be read: {exc}")
        raise TrafficShiftError(f"{note}: {exc}") from exc
    from_pct = None if before is None else before.share(rollout.canary_version)
    if rollout.dry_run:
        applied, note = False, f"{note} (dry run: not applied)"
    elif before == target:
        applied, note = False, f"{note} (already in force)"
    else:
        try:
            router.set_split(target, rollout.rollout_id)
            after = router.get_split(target.model)
            if not target.same_traffic(after):
                raise TrafficShiftError(f"the router reads back {_describe(after)} after setting {_describe(target)}")
        except Exception as exc:
            _record_failure(engine, router, rollout, target, note, from_pct, exc)
            raise TrafficShiftError(f"{note}: {exc}") from exc
        applied = True
    _history(engine, rollout, target, from_pct, target.share(rollout.canary_version), applied, note)
    return target


def _describe(split: Split | None) -> str:
    if split is None:
        return "no split"
    canary = f", {split.canary_version} {split.canary_percent:g} %" if split.canary_version else ""
    return f"{split.baseline_version} {split.share(split.baseline_version):g} %{canary}"


def _read_back(router: Router, model: str) -> tuple[Split | None, str | None]:
    """The split the platform reports now, or why it could not be read (the platform is down)."""
    try:
        return router.get_split(model), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _record_failure(
    engine: Engine, router: Router, rollout: Rollout, target: Split, note: str, from_pct: float | None, exc: Exception
) -> None:
    """Record a failed step with the split the platform reports now (or that it cannot be read)."""
    now, error = _read_back(router, target.model)
    state = f"the split could not be read back ({error})" if error else f"the platform reports {_describe(now)}"
    share = None if now is None else now.share(rollout.canary_version)
    _history(engine, rollout, target, from_pct, share, False, f"FAILED {note}: {type(exc).__name__}: {exc}; {state}")


def _history(
    engine: Engine,
    rollout: Rollout,
    target: Split,
    from_pct: float | None,
    to_pct: float | None,
    applied: bool,
    note: str,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(traffic_history).values(
                model=target.model,
                rollout_id=rollout.rollout_id,
                baseline_version=target.baseline_version,
                canary_version=target.canary_version,
                from_percent=from_pct,
                to_percent=to_pct,
                applied=applied,
                note=note,
                applied_at=utcnow(),
            )
        )


def shift_to_stage(engine: Engine, router: Router, spec: RolloutSpec, rollout: Rollout, stage: int) -> Split:
    """Send ``spec.stages[stage - 1].percent`` of traffic to the canary (stages count from 1)."""
    percent = spec.stages[stage - 1].percent
    split = Split(spec.model, rollout.baseline_version, rollout.canary_version, percent)
    apply_split(engine, router, rollout, split, f"stage {stage}: canary to {percent:g} %")
    with engine.begin() as conn:
        conn.execute(
            sa.update(rollouts)
            .where(rollouts.c.rollout_id == rollout.rollout_id)
            .values(stage_reached=stage, canary_percent=percent)
        )
    record_decision(
        engine,
        rollout_id=rollout.rollout_id,
        model=spec.model,
        stage=stage,
        action="advance",
        verdict=None,
        reason=f"traffic to canary {percent:g} %",
    )
    return split


def promote(engine: Engine, router: Router, spec: RolloutSpec, rollout: Rollout, reason: str) -> Split:
    """Canary to 100 %, then make it the model's baseline."""
    apply_split(
        engine,
        router,
        rollout,
        Split(spec.model, rollout.baseline_version, rollout.canary_version, 100.0),
        "promotion: canary to 100 %",
    )
    final = apply_split(
        engine,
        router,
        rollout,
        Split(spec.model, rollout.canary_version, None, 0.0),
        f"promotion: {rollout.canary_version} is the new baseline",
    )
    _end(engine, rollout, "promoted", 100.0, reason)
    record_decision(
        engine,
        rollout_id=rollout.rollout_id,
        model=spec.model,
        stage=None,
        action="promote",
        verdict=Verdict.PASS,
        reason=reason,
    )
    return final


def rollback(engine: Engine, router: Router, spec: RolloutSpec, rollout: Rollout, reason: str) -> Split:
    """Canary to 0 %; the baseline serves everything again."""
    final = apply_split(
        engine,
        router,
        rollout,
        Split(spec.model, rollout.baseline_version, rollout.canary_version, 0.0),
        "rollback: canary to 0 %",
    )
    _end(engine, rollout, "rolled_back", 0.0, reason)
    return final


def _end(engine: Engine, rollout: Rollout, status: str, percent: float, reason: str) -> None:
    """Record the outcome, on the rollout and (unless a dry run) in the registry, in one transaction."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(rollouts)
            .where(rollouts.c.rollout_id == rollout.rollout_id)
            .values(status=status, canary_percent=percent, reason=reason, ended_at=utcnow())
        )
        if rollout.dry_run:
            return
        if status == "promoted":
            registry.promote(conn, rollout.model, rollout.canary_version, rollout.rollout_id)
        else:
            registry.mark(conn, rollout.model, rollout.canary_version, "rejected", rollout.rollout_id, reason[:500])


def record_final_split(engine: Engine, router: Router, rollout: Rollout) -> Split | None:
    """Read the split the platform reports at the end of a rollout and record it: the last row of
    the traffic history says what is in force (or that it could not be read, and why)."""
    split, error = _read_back(router, rollout.model)
    note = (
        f"final split UNKNOWN: the platform could not be read ({error})"
        if error
        else f"final split: {_describe(split)}"
    )
    share = None if split is None else split.share(rollout.canary_version)
    recorded = Split(rollout.model, rollout.baseline_version, rollout.canary_version, share or 0.0)
    _history(engine, rollout, recorded, share, share, False, note)
    return split


def release(engine: Engine, rollout_id: str, reason_if_unfinished: str) -> Rollout | None:
    """Free the model's lock. A rollout still 'running' here ended without a decision: 'failed'."""
    with engine.begin() as conn:
        unfinished = conn.execute(
            sa.update(rollouts)
            .where(rollouts.c.rollout_id == rollout_id, rollouts.c.status == "running")
            .values(status="failed", reason=reason_if_unfinished, ended_at=utcnow())
        ).rowcount
        conn.execute(sa.update(rollouts).where(rollouts.c.rollout_id == rollout_id).values(active_model=None))
        ended = get_rollout(conn, rollout_id)
        if unfinished and ended is not None and not ended.dry_run:
            registry.mark(conn, ended.model, ended.canary_version, "failed", rollout_id, reason_if_unfinished)
        return ended
