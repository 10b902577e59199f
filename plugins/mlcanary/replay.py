"""Replay: a rollout's whole decision sequence re-run on recorded data, under any spec, touching no traffic.

Every guardrail poll and analysis look is taken at the moment the DAG would have taken it, through the
same state machines (:mod:`mlcanary.watch`, :mod:`mlcanary.lifecycle`) and the same checks
(:func:`~mlcanary.guardrails.evaluate_guardrails`, :func:`~mlcanary.analysis.evaluate`):

- a stage starts when the traffic history says its split was applied (``--rollout``), or when the
  previous stage of the spec would have advanced (``--start``: the spec's stages from T0);
- during the bake, a poll every ``guardrails.interval`` from one interval after the stage's start
  and a background look every ``analysis.interval``; the bake ends healthy, or badly (breach, no
  data, failing looks, deadline);
- after the bake the stage's gate look, then looks again every ``analysis.interval`` while the
  state machine says so (a confirmation, an extension), the guardrails polling in between;
- after the last stage, the final decision: promote, roll back, or ask a person.

What the replay cannot know it says: a recorded stage that ended before this spec decided ends the
replay undecided ("the recorded data ends"); a question to a person is reported as such. An approval
before the final stage is taken as given, and the polls while a person is asked are not replayed.
A stage's deadline counts from its start (the live sensor's from when it began, a few seconds later),
and an extension's time from look to look (the live one also counts each look's own run time).

The rows are read once. The analysis' sums per (version, segment, score bin, time slot, label slot)
come from one scan (:class:`~mlcanary.analysis.LookCube`) and each look adds up its slots: a look is
taken at the grid point at or before its moment (the grid: whole multiples of the greatest common
divisor of the guardrail interval, the analysis interval and window and the label delay; 30 s for
the usual specs), so it sees at most one slot less than the live look did. The score's bin edges,
the segment values kept and the drift features' edges are taken once, from the baseline's most
recent rows of the replayed span, where the live looks take them per look: counts, rates and means
are the live ones exactly; AUC, ECE, precision/recall and drift differ a little (AUC by 1e-4, ECE by 0.01). The
polls are at their exact moments; a stage's request counts run on from poll to poll
(:class:`_RunningCounts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mlcanary.analysis import AnalysisResult, AnalysisWindow, LookCube, analyze
from mlcanary.guardrails import GuardrailResult, evaluate_guardrails
from mlcanary.lifecycle import Step, after_guardrails, after_look, final_decision
from mlcanary.sources.warehouse import WarehouseMetrics
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse import queries
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import decisions, rollouts, traffic_history
from mlcanary.watch import End, Ended, WatchState, after_poll, past_deadline
from mlcanary.watch import after_look as watch_after_look
from mlcanary.words import took

EPOCH = datetime(1970, 1, 1)


class ReplayError(ValueError):
    """The rollout or the window cannot be replayed (unknown rollout, no stages recorded, bad times)."""


@dataclass(frozen=True)
class RecordedStage:
    percent: float
    start: datetime
    end: datetime  # the next stage's start, or the rollout's end: the split held in [start, end)


@dataclass(frozen=True)
class Timeline:
    """What traffic did: the versions, when the rollout started, and each stage's split and span.

    ``stages`` empty: a planned replay, the stages follow the spec from ``started_at``."""

    model: str
    baseline_version: str
    canary_version: str
    started_at: datetime
    ends_at: datetime  # no data after this is read
    stages: tuple[RecordedStage, ...] = ()
    rollout_id: str | None = None
    recorded_status: str | None = None
    recorded_reason: str | None = None
    recorded_at: datetime | None = None  # when the recorded rollout ended


@dataclass(frozen=True)
class StageReplay:
    number: int
    percent: float
    start: datetime
    decided_at: datetime | None
    decision: str  # advance | promote | rollback | ask | undecided
    reason: str
    polls: int
    looks: int
    first_failures: dict[str, datetime] = field(default_factory=dict)  # check -> first poll or look it failed


@dataclass(frozen=True)
class ReplayResult:
    spec_name: str
    timeline: Timeline
    stages: list[StageReplay]
    decision: str  # promote | rollback | ask | undecided
    decided_at: datetime | None
    reason: str
    polls: int
    looks: int

    @property
    def time_to_decision(self) -> timedelta | None:
        """From the rollout's start to the replayed decision."""
        return None if self.decided_at is None else self.decided_at - self.timeline.started_at

    def to_dict(self) -> dict[str, Any]:
        t = self.timeline
        return {
            "spec": self.spec_name,
            "rollout_id": t.rollout_id,
            "model": t.model,
            "baseline_version": t.baseline_version,
            "canary_version": t.canary_version,
            "started_at": t.started_at.isoformat(),
            "recorded": {"status": t.recorded_status, "reason": t.recorded_reason, "ended_at": _iso(t.recorded_at)},
            "replayed": {
                "decision": self.decision,
                "reason": self.reason,
                "decided_at": _iso(self.decided_at),
                "seconds_to_decision": None if self.time_to_decision is None else self.time_to_decision.total_seconds(),
            },
            "polls": self.polls,
            "looks": self.looks,
            "stages": [
                {
                    "stage": s.number,
                    "percent": s.percent,
                    "start": s.start.isoformat(),
                    "decided_at": _iso(s.decided_at),
                    "decision": s.decision,
                    "reason": s.reason,
                    "polls": s.polls,
                    "looks": s.looks,
                    "first_failures": {k: v.isoformat() for k, v in s.first_failures.items()},
                }
                for s in self.stages
            ],
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- the timeline ----------------------------------------------------------------------------------


def recorded_timeline(conn: Connection, rollout_id: str) -> Timeline:
    """A recorded rollout's versions and stages: each stage from its ``advance`` decision (when the
    split was applied, as the live guardrails count it) to the next one or the rollout's end."""
    row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one_or_none()
    if row is None:
        raise ReplayError(f"no rollout {rollout_id!r} in this warehouse (see `mlcanary report`)")
    if row.dry_run:
        raise ReplayError(
            f"{rollout_id} was a dry run: no traffic moved to {row.canary_version}, so its rows are the baseline's; "
            "replay a window with --start instead"
        )
    advances = conn.execute(
        sa.select(decisions.c.stage, decisions.c.decided_at)
        .where(decisions.c.rollout_id == rollout_id, decisions.c.action == "advance", decisions.c.stage.is_not(None))
        .order_by(decisions.c.stage)
    ).all()
    h = traffic_history.c
    shares = conn.execute(  # the canary's share as each step of the rollout read it, oldest first
        sa.select(h.applied_at, h.to_percent)
        .where(h.rollout_id == rollout_id, h.to_percent.is_not(None))
        .order_by(h.applied_at, h.id)
    ).all()
    if not advances:
        raise ReplayError(f"{rollout_id} never moved traffic to its canary: there is nothing to replay")
    ended = row.ended_at or utcnow()  # a rollout still running: up to now
    starts = [at for _, at in advances]
    stages = tuple(
        RecordedStage(_share_at(shares, at), at, starts[i + 1] if i + 1 < len(starts) else ended)
        for i, at in enumerate(starts)
    )
    return Timeline(
        model=row.model,
        baseline_version=row.baseline_version,
        canary_version=row.canary_version,
        started_at=row.started_at,
        ends_at=ended,
        stages=stages,
        rollout_id=rollout_id,
        recorded_status=row.status,
        recorded_reason=row.reason,
        recorded_at=row.ended_at,
    )


def _share_at(shares: Sequence[sa.Row], at: datetime) -> float:
    """The share in force when a stage's ``advance`` was decided: its step's history row, written
    just before the decision in the same transaction (NaN: none recorded)."""
    before = [row.to_percent for row in shares if row.applied_at <= at]
    return float(before[-1]) if before else math.nan


def planned_timeline(spec: RolloutSpec, baseline: str, canary: str, start: datetime, end: datetime) -> Timeline:
    """The spec's stages from ``start`` (each starts when the one before would have advanced)."""
    if end <= start:
        raise ReplayError(f"the end {end:%Y-%m-%d %H:%M:%S} must be after the start {start:%Y-%m-%d %H:%M:%S}")
    return Timeline(spec.model, baseline, canary, start, end)


def recorded_rollouts(conn: Connection, model: str) -> list[str]:
    """The model's ended rollouts that moved traffic (dry runs left out), oldest first."""
    moved = sa.select(decisions.c.rollout_id).where(decisions.c.action == "advance").distinct()
    r = rollouts.c
    return list(
        conn.execute(
            sa.select(r.rollout_id)
            .where(r.model == model, r.ended_at.is_not(None), r.dry_run.is_(False), r.rollout_id.in_(moved))
            .order_by(r.started_at)
        ).scalars()
    )


# --- the grid --------------------------------------------------------------------------------------


def slot_seconds(spec: RolloutSpec) -> int | None:
    """The grid every replayed poll and window lies on: the whole seconds that divide the guardrail
    interval and window, the analysis interval and window, and the label delay (None: one of them is
    no whole number of seconds, and nothing is reused: every poll and look scans its window)."""
    g, a = spec.guardrails, spec.analysis
    spans = [s.total_seconds() for s in (g.interval, g.window, a.interval, a.window, a.label_delay)]
    if any(s != int(s) for s in spans):
        return None
    return max(1, math.gcd(*(int(s) for s in spans)))


def _up(t: datetime, slot: int) -> datetime:
    """``t`` rounded up to the grid."""
    down = _down(t, slot)
    return down if down == t else down + timedelta(seconds=slot)


def _down(t: datetime, slot: int) -> datetime:
    """``t`` rounded down to the grid (whole multiples of ``slot`` seconds since the epoch)."""
    seconds = (t - EPOCH) // timedelta(microseconds=1)
    return EPOCH + timedelta(microseconds=seconds - seconds % (slot * 1_000_000))


# --- the replay ------------------------------------------------------------------------------------


class _RunningCounts(WarehouseMetrics):
    """The warehouse's guardrail metrics, with the request counts of a stage kept running: each count
    from the stage's start is the last one plus the rows since (one short range per poll), and a
    window that starts at an earlier poll is the difference of two of them. Exact at any times."""

    def __init__(self, engine: Engine, spec: RolloutSpec) -> None:
        super().__init__(engine, spec)
        self.points: dict[str, dict[datetime, np.ndarray]] = {}  # per version: counts from the stage's start

    def _requests(self, conn: Connection, version: str, start: datetime, end: datetime) -> queries.Requests:
        points = self.points.setdefault(version, {})
        if start not in points:
            if points and start < max(points):  # a range that is not the stage's: count it as it is
                return super()._requests(conn, version, start, end)
            points = self.points[version] = {start: np.zeros(4, dtype=np.int64)}  # a new stage
        if end not in points:
            last = max((t for t in points if t <= end), default=start)
            more = super()._requests(conn, version, last, end)
            points[end] = points[last] + np.array([more.n, more.ok, more.bad_success, more.bad_latency])
        return queries.Requests(*(int(x) for x in points[end] - points[start]))


class _Replay:
    def __init__(
        self,
        engine: Engine,
        spec: RolloutSpec,
        timeline: Timeline,
        progress: Callable[[str], None] | None,
        reuse: bool = True,
    ) -> None:
        self.engine, self.spec, self.t = engine, spec, timeline
        self.say = progress or (lambda _msg: None)
        slot = slot_seconds(spec)
        self.slot = slot or 1
        self.t0 = _up(timeline.started_at, self.slot)  # the looks' grid, and where their windows may begin
        self.end = timeline.ends_at
        versions = [timeline.baseline_version, timeline.canary_version]
        self.source: WarehouseMetrics = WarehouseMetrics(engine, spec)
        self.cube: LookCube | None = None
        if reuse:
            self.source = _RunningCounts(engine, spec)
        if reuse and slot is not None:
            self.cube = LookCube.build(engine, spec, *versions, self.t0, self.end, slot)
        self.polls = self.looks = 0

    # one poll and one look, as the trigger and the analysis task take them

    def poll(self, at: datetime, since: datetime, percent: float | None, max_polls: int) -> GuardrailResult:
        """A poll at ``at`` of the stage since ``since``; ``percent``: the split in force (None: unknown)."""
        g = self.spec.guardrails
        settled = at - since >= 2 * g.window
        self.polls += 1
        return evaluate_guardrails(
            self.source,
            self.spec,
            self.t.canary_version,
            at,
            self.t.baseline_version,
            since=since,
            canary_percent=percent if settled and percent is not None and 0 < percent < 100 else None,
            window_alpha=g.alpha / (2 * max_polls),
        )

    def look(self, at: datetime) -> AnalysisResult:
        """A look at ``at``, with the labels and rows up to the grid point at or before it."""
        window = AnalysisWindow.ending_at(self.spec, _down(at, self.slot), not_before=self.t0)
        self.looks += 1
        if self.cube is None:
            with self.engine.connect() as conn:
                return analyze(conn, self.spec, self.t.baseline_version, self.t.canary_version, window)
        return self.cube.analyze(self.spec, self.t.baseline_version, self.t.canary_version, window)

    # a stage

    def stage(self, number: int, percent: float, start: datetime, data_end: datetime, known: bool) -> StageReplay:
        """Stage ``number`` at ``percent`` from ``start``, on data up to ``data_end``; ``known``: the
        split in force is the recorded one (else the sample-ratio check is left out: nobody knows it)."""
        split = percent if known else None
        spec, g, a = self.spec, self.spec.guardrails, self.spec.analysis
        last = number == len(spec.stages)
        bake = spec.stages[number - 1].bake
        interval, look_every = g.interval, a.interval
        deadline = start + bake + g.deadline_margin
        max_polls = max(1, math.ceil((bake + g.deadline_margin) / interval))
        first: dict[str, datetime] = {}
        polls0, looks0 = self.polls, self.looks

        def seen(checks: list[CheckResult], at: datetime) -> None:
            for c in checks:
                if c.verdict is Verdict.FAIL and c.gating:
                    name = c.check if c.segment in ("*", "") else f"{c.check} ({c.segment})"
                    first.setdefault(name, at)

        def out(at: datetime | None, decision: str, reason: str) -> StageReplay:
            self.say(f"stage {number} ({percent:g} %): {decision} at {_clock(at)}: {reason}")
            return StageReplay(
                number, percent, start, at, decision, reason, self.polls - polls0, self.looks - looks0, first
            )

        def undecided(at: datetime, doing: str) -> StageReplay:
            return out(
                None,
                "undecided",
                f"the recorded data ends at {_clock(data_end)} while {doing}: this spec had not decided by then",
            )

        # the bake: polls, and looks alongside. As in the trigger, a look starts after a poll once
        # it is due and its verdict counts at the next poll; one still pending when the bake ends is dropped.
        state = WatchState()
        at = start + interval
        next_look = start + look_every
        pending: AnalysisResult | None = None
        ended: Ended | None = None
        while ended is None:
            if at > data_end:
                return undecided(
                    data_end, f"the bake ran ({state.healthy_seconds:.0f} s of {bake.total_seconds():.0f} s healthy)"
                )
            result = self.poll(at, start, split, max_polls)
            seen(result.checks, at)
            state, ended = after_poll(
                state,
                g,
                result.verdict,
                result.reason,
                result.missing,
                (at - start).total_seconds(),
                bake.total_seconds(),
                spec.policies.invalid == "rollback",
            )
            if pending is not None:
                state, looked = watch_after_look(state, pending.verdict, pending.reason, a.consecutive_fails)
                pending = None
                if looked is not None and (ended is None or ended.end is End.HEALTHY):
                    ended = looked
            ended = ended or past_deadline(
                state, (at + interval - EPOCH).total_seconds(), (deadline - EPOCH).total_seconds(), bake.total_seconds()
            )
            if ended is None:
                if at >= next_look:
                    pending = self.look(at)
                    seen(pending.checks, at)
                    next_look = at + look_every
                at += interval
        nxt = after_guardrails(ended.end.value, ended.reason, number)
        if nxt.step is Step.ROLL_BACK:
            return out(at, "rollback", nxt.reason)
        # the gate look, and looks again while the state machine says so (polls in between)
        first_look, fails = at, state.look_fails
        while True:
            result = self.look(at)
            seen(result.checks, at)
            policy = spec.policies.for_verdict(invalid=result.verdict is Verdict.INVALID)
            nxt = after_look(
                result.verdict,
                result.reason,
                final=last,
                policy=policy,
                fails=fails,
                consecutive_fails=a.consecutive_fails,
                waited=at - first_look,
                interval=look_every,
                max_extension=spec.policies.max_extension,
                advance_on=a.advance_on,
            )
            if nxt.step is Step.ROLL_BACK:
                return out(at, "rollback", nxt.reason)
            if nxt.step is Step.PROCEED:
                break
            fails = fails + 1 if nxt.action == "confirm" else 0
            # the guarded wait: a poll at once and every interval until the next look (its own counters)
            wait_state, until, poll_at = WatchState(), at + look_every, at
            wait_polls = max(1, math.ceil(look_every / interval))
            while poll_at < until:
                if poll_at > data_end:
                    return undecided(data_end, f"waiting to look again ({nxt.reason})")
                polled = self.poll(poll_at, start, split, wait_polls)
                seen(polled.checks, poll_at)
                wait_state, bad = after_poll(
                    wait_state,
                    g,
                    polled.verdict,
                    polled.reason,
                    polled.missing,
                    0.0,
                    math.inf,
                    spec.policies.invalid == "rollback",
                )
                if bad is not None:
                    why = f"{bad.reason} (while waiting for the next analysis look)"
                    return out(poll_at, "rollback", after_guardrails(bad.end.value, why, number).reason)
                poll_at += interval
            at = until
            if at > data_end:
                return undecided(data_end, f"waiting to look again ({nxt.reason})")
        if not last:
            return out(at, "advance", f"stage {number} done: {result.verdict.value}: {result.reason}")
        final = final_decision(
            result.verdict, result.reason, spec.policies.for_verdict(result.verdict is Verdict.INVALID)
        )
        decision = {Step.PROMOTE: "promote", Step.ASK: "ask"}.get(final.step, "rollback")
        return out(at, decision, final.reason)


def replay(
    engine: Engine,
    spec: RolloutSpec,
    timeline: Timeline,
    progress: Callable[[str], None] | None = None,
    reuse: bool = True,
) -> ReplayResult:
    """Re-run the decision sequence of ``spec`` over ``timeline``; nothing is written anywhere.
    ``reuse=False``: every poll and look scans its own window, as the live tasks do (for comparison)."""
    if spec.model != timeline.model:  # another model's rollouts under this spec's rules: read their rows
        spec = spec.model_copy(update={"model": timeline.model})
    run = _Replay(engine, spec, timeline, progress, reuse)
    stages: list[StageReplay] = []
    start = timeline.started_at
    for number in range(1, len(spec.stages) + 1):
        if timeline.stages:  # recorded: the stage's own split, from when it was applied
            if number > len(timeline.stages):
                ends = timeline.recorded_at or timeline.ends_at
                stages.append(
                    StageReplay(
                        number,
                        spec.stages[number - 1].percent,
                        ends,
                        None,
                        "undecided",
                        f"the recorded rollout ended ({timeline.recorded_status}) before stage {number}: "
                        f"this spec had not decided by {_clock(ends)}",
                        0,
                        0,
                    )
                )
                break
            recorded = timeline.stages[number - 1]
            percent, begin, data_end = recorded.percent, max(recorded.start, start), recorded.end
        else:
            percent, begin, data_end = spec.stages[number - 1].percent, start, timeline.ends_at
        outcome = run.stage(number, percent, begin, min(data_end, timeline.ends_at), bool(timeline.stages))
        stages.append(outcome)
        if outcome.decision != "advance":
            break
        assert outcome.decided_at is not None
        start = outcome.decided_at
    final = stages[-1]
    return ReplayResult(
        spec.name, timeline, stages, final.decision, final.decided_at, final.reason, run.polls, run.looks
    )


def compare(results: list[ReplayResult]) -> dict[str, int]:
    """How the replayed decisions of recorded rollouts compare with what was recorded."""
    out = {"rollouts": len(results), "agree": 0, "false_rollbacks": 0, "missed": 0, "undecided": 0, "other": 0}
    for r in results:
        recorded = {"promoted": "promote", "rolled_back": "rollback"}.get(r.timeline.recorded_status or "")
        if r.decision == "undecided":
            out["undecided"] += 1
        elif recorded is None or r.decision == "ask":  # ended otherwise (a failed rollback), or a person decides
            out["other"] += 1
        elif r.decision == recorded:
            out["agree"] += 1
        elif recorded == "promote" and r.decision == "rollback":
            out["false_rollbacks"] += 1
        elif recorded == "rollback" and r.decision == "promote":
            out["missed"] += 1
    return out


def _clock(at: datetime | None) -> str:
    return "-" if at is None else f"{at:%Y-%m-%d %H:%M:%S}"


def describe(result: ReplayResult) -> list[str]:
    """The replay as lines for a terminal: per stage when each check first failed and the decision."""
    t = result.timeline
    lines = [
        f"{t.model}: {t.canary_version} against {t.baseline_version}, replayed under spec {result.spec_name}"
        + (f" (rollout {t.rollout_id})" if t.rollout_id else ""),
        f"rollout start {_clock(t.started_at)}; {result.polls} polls and {result.looks} analysis looks replayed",
    ]
    for s in result.stages:
        into = "" if s.decided_at is None else f" ({took(s.decided_at - s.start)} into the stage)"
        lines.append(
            f"stage {s.number} ({s.percent:g} %) from {_clock(s.start)}: {s.decision} at {_clock(s.decided_at)}{into}"
        )
        for check, when in sorted(s.first_failures.items(), key=lambda kv: kv[1]):
            lines.append(f"    {check}: first failed at {_clock(when)} ({took(when - s.start)} into the stage)")
        lines.append(f"    {s.reason}")
    if t.rollout_id:
        lines.append(f"recorded: {t.recorded_status} at {_clock(t.recorded_at)}: {t.recorded_reason or ''}")
    spent = result.time_to_decision
    lines.append(
        f"replayed: {result.decision}"
        + ("" if spent is None else f" at {_clock(result.decided_at)}, {took(spent)} after the start")
        + f": {result.reason}"
    )
    if t.recorded_at is not None and result.decided_at is not None:
        gap = t.recorded_at - result.decided_at
        when = "at the same moment as" if not gap else f"{took(abs(gap))} {'before' if gap > timedelta(0) else 'after'}"
        lines.append(f"this spec decides {when} the recorded end")
    return lines
