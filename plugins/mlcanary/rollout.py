"""A rollout's traffic steps, carried out as :mod:`mlcanary.lifecycle` allows: start (take the lock),
shift, promote, roll back, finish (read the split back, release the lock), abort.

Every step that changes traffic is guarded twice:

- the rollout must hold its model's lock, in a state that allows the step (its row in the warehouse);
- the split must be the one it set: the step reads the split back first and compares its owner and
  versions (a compare-and-set; on the warehouse router, one conditional statement).

A rollback is the one step that also runs without the warehouse: it acts on the router's record of
the owner alone and writes its records once the warehouse answers. The versions it needs travel with
the task as a :class:`RolloutRef`.

These functions are what the Airflow tasks call; they work the same from a script, the CLI or a test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from tenacity import Retrying, stop_after_delay, wait_exponential

from mlcanary import registry
from mlcanary.analysis import AnalysisResult, AnalysisWindow, analyze
from mlcanary.audit import record_checks, record_decision
from mlcanary.lifecycle import (
    Action,
    FinalState,
    Status,
    describe,
    final_state,
    refusal,
    rollback_refusal,
    start_refusal,
    step_refusal,
)
from mlcanary.routers.base import Router, Split, TrafficShiftError
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.spec import VERSION_PATTERN, RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import decisions, rollouts, traffic_history

# How long a step keeps trying to write its records after the traffic changed (the warehouse may be
# restarting); past that a rollback hands them on (see :class:`Rollback`), other steps fail and retry.
RECORD_RETRY_SECONDS = 30.0


class RolloutError(RuntimeError):
    """The rollout cannot start (bad versions, a baseline that does not serve, another rollout active)."""


class StepRefused(RuntimeError):
    """This rollout may not take this step (it ended, lost its lock, or the split is not its own).
    Nothing was changed."""


@dataclass(frozen=True)
class RolloutRef:
    """What names a rollout and its versions. It travels with the tasks (XCom), so a rollback knows
    what to roll back without reading the warehouse."""

    rollout_id: str
    model: str
    baseline_version: str
    canary_version: str
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(RolloutRef)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutRef:
        return RolloutRef(**{f.name: data[f.name] for f in fields(RolloutRef)})


@dataclass(frozen=True)
class Rollout(RolloutRef):
    """A rollout's row: its state, and whether it still holds its model's lock."""

    spec_name: str
    status: Status
    stage_reached: int
    canary_percent: float  # the canary's share as this rollout last recorded it
    reason: str | None
    started_at: datetime
    ended_at: datetime | None
    holds_lock: bool
    spec: dict[str, Any] | None  # the spec it started with

    @property
    def ref(self) -> RolloutRef:
        return RolloutRef.from_dict(self.to_dict())

    @classmethod
    def from_row(cls, row: sa.Row) -> Rollout:
        return cls(
            rollout_id=row.rollout_id,
            model=row.model,
            baseline_version=row.baseline_version,
            canary_version=row.canary_version,
            dry_run=bool(row.dry_run),
            spec_name=row.spec_name,
            status=Status(row.status),
            stage_reached=row.stage_reached,
            canary_percent=float(row.canary_percent),
            reason=row.reason,
            started_at=row.started_at,
            ended_at=row.ended_at,
            holds_lock=row.active_model == row.model,
            spec=json.loads(row.spec) if row.spec else None,
        )


def look(engine: Engine, spec: RolloutSpec, ref: RolloutRef, stage: int) -> AnalysisResult:
    """One analysis look at the rollout's label-complete rows so far (never before its start), with
    its checks recorded: the stage's gate look and the trigger's background looks alike."""
    with engine.connect() as conn:
        found = get_rollout(conn, ref.rollout_id)
        window = AnalysisWindow.ending_at(spec, utcnow(), not_before=found.started_at if found else None)
        result = analyze(conn, spec, ref.baseline_version, ref.canary_version, window)
    with engine.begin() as conn:
        record_checks(
            conn,
            result.checks,
            model=spec.model,
            rollout_id=ref.rollout_id,
            stage=stage,
            baseline_version=ref.baseline_version,
            canary_version=ref.canary_version,
        )
    return result


def get_rollout(conn: Connection, rollout_id: str) -> Rollout | None:
    row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one_or_none()
    return None if row is None else Rollout.from_row(row)


def lock_holder(conn: Connection, model: str) -> Rollout | None:
    """The rollout holding ``model``'s lock, if any."""
    row = conn.execute(sa.select(rollouts).where(rollouts.c.active_model == model)).one_or_none()
    return None if row is None else Rollout.from_row(row)


def locked_rollouts(conn: Connection, model: str | None = None) -> list[Rollout]:
    """Every rollout that holds its model's lock (active, or waiting for a person)."""
    stmt = sa.select(rollouts).where(rollouts.c.active_model.is_not(None)).order_by(rollouts.c.started_at)
    if model:
        stmt = stmt.where(rollouts.c.model == model)
    return [Rollout.from_row(r) for r in conn.execute(stmt)]


# --- start ---------------------------------------------------------------------------------------


def begin_rollout(
    engine: Engine,
    router: Router,
    spec: RolloutSpec,
    rollout_id: str,
    canary_version: str,
    baseline_version: str | None = None,
    dry_run: bool = False,
    force_reason: str | None = None,
) -> Rollout:
    """Check the versions against what the router reports, and take the model's lock.

    Nothing is written to the router: traffic moves at the first stage. A retry of a start that took
    the lock returns the same rollout; a start of a run whose rollout already ended is refused.
    """
    for what, version in (("candidate", canary_version), ("baseline", baseline_version)):
        if version is not None and not re.fullmatch(VERSION_PATTERN, version):
            raise RolloutError(
                f"{what} version {version!r} is not a version (1-128 letters, digits, . _ : + -); nothing changed"
            )
    with engine.connect() as conn:
        existing = get_rollout(conn, rollout_id)
        holder = lock_holder(conn, spec.model)
    if holder is not None and holder.rollout_id != rollout_id:
        raise RolloutError(_held(spec.model, holder))
    if existing is not None:
        if existing.holds_lock and existing.status is Status.RUNNING:
            return existing
        raise RolloutError(
            f"this run's rollout already ended ({existing.status}: {existing.reason or 'no reason recorded'}); "
            "a cleared or re-run start changes no traffic: trigger a new run"
        )
    current = router.get_split(spec.model)
    problem = start_refusal(current, canary_version, baseline_version)
    if problem:
        raise RolloutError(f"model {spec.model!r}: {problem}. No traffic was changed.")
    baseline = baseline_version or current.baseline_version  # type: ignore[union-attr]  # start_refusal saw to it
    if canary_version == baseline:
        raise RolloutError(f"candidate and baseline are the same version {canary_version!r}")
    with engine.connect() as conn:
        entry = registry.get(conn, spec.model, canary_version)
    if entry is not None and entry.status == "rejected" and not dry_run and not force_reason:
        raise RolloutError(
            f"{spec.model} {canary_version} was rolled back before ({entry.rollout_id or 'no rollout recorded'}: "
            f"{entry.note or 'no reason recorded'}). To roll it out again, trigger with force_reason saying why. "
            "No traffic was changed."
        )
    ref = RolloutRef(rollout_id, spec.model, baseline, canary_version, dry_run)
    start = f"start: the router reports {describe(current)}"
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(rollouts).values(
                    rollout_id=rollout_id,
                    spec_name=spec.name,
                    model=spec.model,
                    baseline_version=baseline,
                    canary_version=canary_version,
                    dry_run=dry_run,
                    status=Status.RUNNING.value,
                    stage_reached=0,
                    canary_percent=0.0,
                    started_at=utcnow(),
                    spec=json.dumps(spec.model_dump(mode="json", by_alias=True)),
                    active_model=spec.model,
                )
            )
            _history(conn, ref, current, applied=False, note=start)
            decide = _decider(conn, rollout_id, spec.model)
            decide("start", f"{canary_version} against {baseline}" + (" (dry run)" if dry_run else ""), key="start")
            if force_reason and entry is not None and entry.status == "rejected":
                decide("force", f"rolled back before ({entry.note}); rolled out again: {force_reason}", key="force")
            if not dry_run:
                registry.mark(conn, spec.model, canary_version, "rolling_out", rollout_id, "rollout started")
    except IntegrityError:
        with engine.connect() as conn:
            holder = lock_holder(conn, spec.model)
        if holder is None:
            raise
        raise RolloutError(_held(spec.model, holder)) from None
    with engine.connect() as conn:
        started = get_rollout(conn, rollout_id)
    if started is None:
        raise RolloutError(f"the rollout {rollout_id} was not stored")
    return started


def _held(model: str, holder: Rollout) -> str:
    if holder.status.needs_a_person:
        return (
            f"model {model!r} is locked by {holder.rollout_id}, which ended {holder.status}: {holder.reason}. "
            f"The canary may still have traffic: check the router, then run "
            f"`mlcanary abort --rollout {holder.rollout_id} --reason ...`. No traffic was changed."
        )
    return (
        f"model {model!r} already has an active rollout: {holder.rollout_id} "
        f"(candidate {holder.canary_version}, {holder.status}, started {holder.started_at:%Y-%m-%d %H:%M:%S} UTC); "
        "wait for it to end or stop it first (`mlcanary status`, `mlcanary abort`). No traffic was changed."
    )


# --- traffic steps -------------------------------------------------------------------------------


def shift_to_stage(engine: Engine, router: Router, spec: RolloutSpec, ref: RolloutRef, stage: int) -> Split:
    """Send ``spec.stages[stage - 1].percent`` of traffic to the canary (stages count from 1)."""
    percent = spec.stages[stage - 1].percent
    target = Split(ref.model, ref.baseline_version, ref.canary_version, percent)

    def records(conn: Connection, decide: _Decide) -> None:
        _while_running(conn, ref, stage_reached=stage, canary_percent=percent)
        decide("advance", f"traffic to canary {percent:g} %", stage=stage, key=f"advance:{stage}")

    return _step(engine, router, ref, target, f"stage {stage}: canary to {percent:g} %", Action.SHIFT, records)


def stage_started_at(conn: Connection, rollout_id: str, stage: int) -> datetime | None:
    """When the rollout's split moved to ``stage`` (its ``advance`` decision), if that was recorded."""
    return conn.execute(
        sa.select(decisions.c.decided_at).where(
            decisions.c.rollout_id == rollout_id, decisions.c.decision_key == f"advance:{stage}"
        )
    ).scalar_one_or_none()


def promote(
    engine: Engine, router: Router, ref: RolloutRef, reason: str, verdict: Verdict | None = Verdict.PASS
) -> Split:
    """Canary to 100 %, then make it the model's baseline (the registry's too). ``verdict`` is the
    decision's: PASS for a final analysis that passed, None for a person's choice (not a verdict)."""
    full = Split(ref.model, ref.baseline_version, ref.canary_version, 100.0)

    def at_full(conn: Connection, decide: _Decide) -> None:
        _while_running(conn, ref, canary_percent=100.0)

    _step(engine, router, ref, full, "promotion: canary to 100 %", Action.PROMOTE, at_full)

    def promoted(conn: Connection, decide: _Decide) -> None:
        _while_running(conn, ref, status=Status.PROMOTED.value, canary_percent=100.0, reason=reason, ended_at=utcnow())
        decide("promote", reason, verdict=verdict, key="promote")
        if not ref.dry_run:
            registry.promote(conn, ref.model, ref.canary_version, ref.rollout_id)

    alone = Split(ref.model, ref.canary_version, None, 0.0)
    return _step(
        engine,
        router,
        ref,
        alone,
        f"promotion: {ref.canary_version} is the new baseline",
        Action.PROMOTE,
        promoted,
    )


_Decide = Callable[..., None]
_Records = Callable[[Connection, _Decide], None]


def _step(
    engine: Engine,
    router: Router,
    ref: RolloutRef,
    target: Split,
    note: str,
    action: Action,
    records: _Records,
) -> Split:
    """One guarded traffic step: the rollout may take it, the split is its own, write, read back, record.

    A retry finds the split in force and changes nothing; if an earlier attempt changed it and was
    killed before recording, the history says so. A failure is recorded with the split the platform
    reports afterwards (or that it cannot be read), so the split is never unknown, then raised as
    :class:`TrafficShiftError`: the task retries.
    """
    with engine.connect() as conn:
        row = get_rollout(conn, ref.rollout_id)
    if row is None:
        raise StepRefused(f"there is no rollout {ref.rollout_id}")
    why = refusal(row.status, row.holds_lock, action)
    if why:
        raise StepRefused(why)
    before = _read_or_record(engine, router, ref, note)
    first = row.stage_reached == 0  # this rollout's first traffic step: it may start from the baseline alone
    why = step_refusal(
        before, ref.rollout_id, ref.baseline_version, ref.canary_version, first=first, last_percent=row.canary_percent
    )
    if why:
        _record_only(engine, ref, before, f"REFUSED {note}: {why}")
        raise StepRefused(why)
    applied, from_pct, note = _outcome(ref, row.canary_percent, before, target, note)
    if not applied or before == target:  # nothing to write to the router
        _write_records(engine, ref, target, from_pct, applied, note, records)
        return target
    if isinstance(router, WarehouseRouter) and router.shares_database_with(engine):
        with engine.begin() as conn:  # the split and its records in one transaction
            if not router.compare_and_set(conn, before, target, ref.rollout_id):
                raise TrafficShiftError(f"{note}: the split changed while the step ran; nothing was changed")
            _records_in(conn, ref, target, from_pct, True, note, records)
        return target
    _set_and_verify(engine, router, ref, target, note, from_pct)
    _write_records(engine, ref, target, from_pct, True, note, records)
    return target


def _outcome(
    ref: RolloutRef, recorded: float, before: Split | None, target: Split, note: str
) -> tuple[bool, float, str]:
    """Whether the step changes traffic (or an earlier, unrecorded attempt did), the canary's share
    before it, and the note for the history.

    ``recorded`` is the canary's share as this rollout last recorded it: a split that is already the
    target, set by this rollout, but not what it recorded, was set by an attempt killed before it
    could record it.
    """
    share = _share(before, ref)
    if ref.dry_run:
        return False, share, f"{note} (dry run: not applied)"
    if before != target:  # roles included: a platform that knows the baseline is told the new one
        return True, share, note
    if before is not None and before.owner == ref.rollout_id and abs(share - recorded) > 0.01:
        return True, recorded, f"{note} (applied by an earlier attempt, whose record was lost)"
    return False, share, f"{note} (already in force)"


def _share(split: Split | None, ref: RolloutRef) -> float:
    return 0.0 if split is None else split.share(ref.canary_version)


def _set_and_verify(
    engine: Engine | None, router: Router, ref: RolloutRef, target: Split, note: str, from_pct: float
) -> None:
    try:
        router.set_split(target, ref.rollout_id)
        after = router.get_split(target.model)
        if not target.same_traffic(after):
            raise TrafficShiftError(f"the router reads back {describe(after)} after setting {describe(target)}")
    except Exception as exc:
        now, error = _read_back(router, target.model)
        state = f"the split could not be read back ({error})" if error else f"the platform reports {describe(now)}"
        if engine is not None:
            _record_only(engine, ref, now, f"FAILED {note}: {type(exc).__name__}: {exc}; {state}", from_pct)
        raise TrafficShiftError(f"{note}: {exc}") from exc


def _read_or_record(engine: Engine, router: Router, ref: RolloutRef, note: str) -> Split | None:
    try:
        return router.get_split(ref.model)
    except Exception as exc:  # the platform cannot even be read: record that, the task retries
        _record_only(engine, ref, None, f"FAILED {note}: the split could not be read: {exc}")
        raise TrafficShiftError(f"{note}: {exc}") from exc


def _read_back(router: Router, model: str) -> tuple[Split | None, str | None]:
    """The split the platform reports now, or why it could not be read (the platform is down)."""
    try:
        return router.get_split(model), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _update(ref: RolloutRef) -> sa.Update:
    return sa.update(rollouts).where(rollouts.c.rollout_id == ref.rollout_id)


def _while_running(conn: Connection, ref: RolloutRef, **values: Any) -> None:
    """Update the rollout's row only if it is still running with its lock; else undo the transaction."""
    r = rollouts.c
    guarded = _update(ref).where(r.status == Status.RUNNING.value, r.active_model == ref.model)
    if conn.execute(guarded.values(**values)).rowcount != 1:
        raise StepRefused("the rollout ended or lost its lock while the step ran: nothing was recorded")


def _decider(conn: Connection, rollout_id: str, model: str) -> _Decide:
    def decide(
        action: str, reason: str, *, stage: int | None = None, verdict: Verdict | None = None, key: str | None = None
    ) -> None:
        record_decision(
            conn,
            rollout_id=rollout_id,
            model=model,
            stage=stage,
            action=action,
            verdict=verdict,
            reason=reason,
            key=key,
        )

    return decide


def _history(
    conn: Connection, ref: RolloutRef, split: Split | None, *, applied: bool, note: str, from_pct: float | None = None
) -> None:
    """One row of the traffic history: the canary's share under ``split`` (None: unknown), and why."""
    conn.execute(
        sa.insert(traffic_history).values(
            model=ref.model,
            rollout_id=ref.rollout_id,
            baseline_version=ref.baseline_version,
            canary_version=ref.canary_version,
            from_percent=from_pct,
            to_percent=None if split is None else split.share(ref.canary_version),
            applied=applied,
            note=note,
            applied_at=utcnow(),
        )
    )


def _records_in(
    conn: Connection, ref: RolloutRef, target: Split, from_pct: float, applied: bool, note: str, records: _Records
) -> None:
    _history(conn, ref, target, applied=applied, note=note, from_pct=from_pct)
    records(conn, _decider(conn, ref.rollout_id, ref.model))


def _write_records(
    engine: Engine, ref: RolloutRef, target: Split, from_pct: float, applied: bool, note: str, records: _Records
) -> None:
    def write() -> None:
        with engine.begin() as conn:
            _records_in(conn, ref, target, from_pct, applied, note, records)

    _retrying(write)


def _retrying(write: Callable[[], None], seconds: float = RECORD_RETRY_SECONDS) -> None:
    Retrying(stop=stop_after_delay(seconds), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)(write)


def _record_only(
    engine: Engine, ref: RolloutRef, split: Split | None, note: str, from_pct: float | None = None
) -> None:
    """A history row for a step that changed nothing (refused, failed); best effort."""
    try:
        with engine.begin() as conn:
            _history(conn, ref, split, applied=False, note=note, from_pct=from_pct)
    except Exception:  # the warehouse is down too: the exception the caller raises still says why
        pass


# --- rollback ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackRecords:
    """What a rollback writes to the warehouse, kept apart so it can be written later (the warehouse
    was down when the router was reached)."""

    reason: str
    note: str
    from_percent: float | None
    applied: bool
    split: dict[str, Any] | None  # the split as read back
    at: str  # when the router was changed (ISO, UTC)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RollbackRecords:
        return cls(**data)


@dataclass(frozen=True)
class Rollback:
    split: Split | None  # as read back after the rollback
    records: RollbackRecords
    recorded: bool  # False: the warehouse could not be written; hand ``records`` on (record_rollback)
    record_error: str | None = None


def rollback(engine: Engine, router: Router, ref: RolloutRef, reason: str) -> Rollback:
    """Decide a rollback and carry it out: the canary to 0 %, the router first, the records after.

    The warehouse guard (the rollout holds its lock and is not promoted) applies when the warehouse
    answers; when it does not, the router's record of the owner decides alone. Raises
    :class:`StepRefused` when there is nothing this rollout may roll back, and
    :class:`TrafficShiftError` when the router could not be changed (the task retries).
    """
    row, unreachable = _try_rollout(engine, ref.rollout_id)
    if row is not None:
        if row.status is Status.PROMOTED:
            raise StepRefused(f"{ref.canary_version} was promoted: there is nothing to roll back")
        why = refusal(row.status, row.holds_lock, Action.ROLL_BACK)
        if why:
            raise StepRefused(why)
    note = "rollback: canary to 0 %"
    target = Split(ref.model, ref.baseline_version, ref.canary_version, 0.0)
    warehouse = None if unreachable else engine
    if row is not None and row.status is Status.RUNNING:
        # Decided before the router is called: a task killed during the call, then retried, finds
        # the rollout rolling back and goes no further. Without the warehouse the router goes first.
        _decide_rollback(warehouse, ref, reason)
    try:
        before = router.get_split(ref.model)
    except Exception as exc:
        if warehouse is not None:
            _record_only(warehouse, ref, None, f"FAILED {note}: the split could not be read: {exc}")
        raise TrafficShiftError(f"{note}: the split could not be read: {exc}") from exc
    why = rollback_refusal(before, ref.rollout_id, ref.baseline_version, ref.canary_version)
    if why:
        if warehouse is not None:
            _record_only(warehouse, ref, before, f"REFUSED {note}: {why}")
        raise StepRefused(why)
    from_pct = _share(before, ref)
    if ref.dry_run:
        applied, note = False, f"{note} (dry run: not applied)"
    elif from_pct == 0.0:  # whether an earlier attempt did it is settled when the records are written
        applied, note = False, f"{note} (already in force)"
    else:
        applied = True
        if warehouse is not None and isinstance(router, WarehouseRouter) and router.shares_database_with(warehouse):
            records = RollbackRecords(reason, note, from_pct, True, _split_dict(target), utcnow().isoformat())
            with warehouse.begin() as conn:  # the split and its records in one transaction
                if not router.compare_and_set(conn, before, target, ref.rollout_id):
                    raise TrafficShiftError(f"{note}: the split changed while the rollback ran; nothing was changed")
                _rollback_records_in(conn, ref, records)
            return Rollback(target, records, True)
        _set_and_verify(warehouse, router, ref, target, note, from_pct)
    after, _ = _read_back(router, ref.model)
    records = RollbackRecords(reason, note, from_pct, applied, _split_dict(after), utcnow().isoformat())
    if unreachable:
        return Rollback(after, records, False, unreachable)
    try:
        record_rollback(engine, ref, records)
    except Exception as exc:  # the traffic is safe; the caller hands the records on
        return Rollback(after, records, False, f"{type(exc).__name__}: {exc}")
    return Rollback(after, records, True)


def record_rollback(engine: Engine, ref: RolloutRef, records: RollbackRecords) -> None:
    """Write a rollback's records (retried for a while): its history row, the decision, the rollout's
    state and the registry, in one transaction."""

    def write() -> None:
        with engine.begin() as conn:
            _rollback_records_in(conn, ref, records)

    _retrying(write)


def _rollback_records_in(conn: Connection, ref: RolloutRef, records: RollbackRecords) -> None:
    row = get_rollout(conn, ref.rollout_id)
    if row is None or row.status is Status.PROMOTED:
        return
    if row.status is Status.ROLLED_BACK and not records.applied:
        return  # decided and recorded already: this was a confirmation
    if not ref.dry_run and not records.applied and records.from_percent == 0.0 and row.canary_percent > 0:
        # The canary had traffic as this rollout last recorded it, and none when this attempt looked:
        # an earlier attempt of this rollout (killed, or without the warehouse) set it to 0 %.
        records = replace(
            records,
            applied=True,
            from_percent=row.canary_percent,
            note=records.note.replace(" (already in force)", " (applied by an earlier attempt, whose record was lost)"),
        )
    done = datetime.fromisoformat(records.at)
    late = f" (recorded late: done at {done:%H:%M:%S} UTC)" if (utcnow() - done).total_seconds() > 5 else ""
    _history(
        conn,
        ref,
        _split_from(records.split),
        applied=records.applied,
        note=records.note + late,
        from_pct=records.from_percent,
    )
    reason = _decided_reason(conn, ref, records.reason, row.stage_reached)
    conn.execute(
        _update(ref).values(status=Status.ROLLED_BACK.value, canary_percent=0.0, reason=reason, ended_at=utcnow())
    )
    if not ref.dry_run:
        _registry_after_rollback(conn, ref, reason)


def _decided_reason(conn: Connection, ref: RolloutRef, reason: str, stage: int | None) -> str:
    """Record the rollback decision once; the first reason stands."""
    decide = _decider(conn, ref.rollout_id, ref.model)
    decide("rollback", reason, stage=stage or None, key="rollback")
    first = conn.execute(
        sa.select(decisions.c.reason).where(
            decisions.c.rollout_id == ref.rollout_id, decisions.c.decision_key == "rollback"
        )
    ).scalar_one()
    return str(first)


def _decide_rollback(engine: Engine | None, ref: RolloutRef, reason: str) -> None:
    """The router could not be changed: record the decision and ``rolling_back``, so that no later task
    of this rollout goes on (best effort: the warehouse may be down too)."""
    if engine is None:
        return
    try:
        with engine.begin() as conn:
            row = get_rollout(conn, ref.rollout_id)
            if row is None or row.status is not Status.RUNNING:
                return
            reason = _decided_reason(conn, ref, reason, row.stage_reached)
            conn.execute(_update(ref).values(status=Status.ROLLING_BACK.value, reason=reason))
    except Exception:
        pass


def _registry_after_rollback(conn: Connection, ref: RolloutRef, reason: str) -> None:
    entry = registry.get(conn, ref.model, ref.canary_version)
    if entry is not None and entry.status == "baseline":  # promoted, then the platform went back: undo it
        registry.promote(conn, ref.model, ref.baseline_version, ref.rollout_id)
    registry.mark(conn, ref.model, ref.canary_version, "rejected", ref.rollout_id, reason[:500])


def _try_rollout(engine: Engine, rollout_id: str) -> tuple[Rollout | None, str | None]:
    """The rollout's row, or why the warehouse could not be read."""
    try:
        with engine.connect() as conn:
            return get_rollout(conn, rollout_id), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _split_dict(split: Split | None) -> dict[str, Any] | None:
    return None if split is None else asdict(split)


def _split_from(data: dict[str, Any] | None) -> Split | None:
    return None if data is None else Split(**data)


# --- the end -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    rollout: Rollout
    split: Split | None  # as read back at the end (None: none, or unreadable)
    state: FinalState
    released: bool  # this call released the lock


def finish(engine: Engine, router: Router, ref: RolloutRef) -> Finish:
    """Read the split back and record it as the last row of the traffic history. If it is what the
    outcome says (promoted: the candidate serves alone; otherwise: the canary has no traffic), release
    the model's lock; if not, keep the lock as ``rollback_failed`` or ``split_mismatch``."""
    with engine.connect() as conn:
        row = get_rollout(conn, ref.rollout_id)
    if row is None:
        raise StepRefused(f"there is no rollout {ref.rollout_id}")
    if not row.holds_lock:
        return Finish(row, None, FinalState(row.status, True), released=False)
    split, error = _read_back(router, ref.model)
    state = final_state(row.status, split, error, ref.canary_version, ref.dry_run)
    note = (
        f"final split UNKNOWN: the platform could not be read ({error})" if error else f"final split: {describe(split)}"
    )
    values: dict[str, Any] = {"status": state.status.value}
    reason = row.reason
    if state.problem and state.problem not in (row.reason or ""):
        reason = state.problem + (f" (after: {row.reason})" if row.reason else "")
    elif row.status in (Status.RUNNING, Status.ROLLING_BACK) and state.status is Status.ROLLED_BACK:
        reason = row.reason or "ended without a decision; the canary has no traffic"
    if state.safe:
        values |= {"active_model": None, "ended_at": row.ended_at or utcnow(), "canary_percent": _share(split, ref)}
    with engine.begin() as conn:
        _history(conn, ref, split, applied=False, note=note, from_pct=None if split is None else _share(split, ref))
        conn.execute(_update(ref).values(reason=reason, **values))
        decide = _decider(conn, ref.rollout_id, ref.model)
        if state.problem:
            decide(state.status.value, state.problem, key=f"final:{state.status.value}")
        if state.safe and not ref.dry_run and row.status is Status.RUNNING and state.status is Status.ROLLED_BACK:
            registry.mark(conn, ref.model, ref.canary_version, "failed", ref.rollout_id, (reason or "")[:500])
        ended = get_rollout(conn, ref.rollout_id)
    if ended is None:  # deleted from under us: nothing to report on
        raise StepRefused(f"the rollout {ref.rollout_id} disappeared while it was finished")
    return Finish(ended, split, state, released=state.safe)


def abort(engine: Engine, router: Router, rollout_id: str, reason: str, by: str, key: str | None = None) -> Finish:
    """Stop a rollout from outside its run (a person, or the watchdog): roll the canary back unless it
    was promoted, record who and why (once per ``key``, if given), and release the lock once the split
    is known to be safe."""
    with engine.connect() as conn:
        row = get_rollout(conn, rollout_id)
    if row is None:
        raise RolloutError(f"there is no rollout {rollout_id!r} in this warehouse")
    if not row.holds_lock:
        raise RolloutError(f"{rollout_id} is {row.status} and holds no lock: there is nothing to abort")
    why = f"aborted by {by}: {reason}"
    with engine.begin() as conn:
        _decider(conn, rollout_id, row.model)("abort", why, stage=row.stage_reached or None, key=key)
    if row.status is not Status.PROMOTED:
        try:
            done = rollback(engine, router, row.ref, why)
            if not done.recorded:
                record_rollback(engine, row.ref, done.records)
        except StepRefused:
            pass  # nothing of this rollout's to roll back: finish() reads the split and says what it is
    return finish(engine, router, row.ref)
