"""The guardrail triggers: poll the canary's health in the triggerer while a stage bakes or waits,
with the slow analysis looking alongside every ``analysis.interval``."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from airflow.providers.standard.triggers.hitl import HITLTrigger
from airflow.sdk.execution_time.hitl import update_hitl_detail_response
from airflow.sdk.timezone import utcnow as hitl_utcnow
from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async
from sqlalchemy.engine import Engine

from mlcanary import progress
from mlcanary import rollout as steps
from mlcanary.analysis import AnalysisResult
from mlcanary.audit import record_checks, record_decision
from mlcanary.guardrails import GuardrailResult, evaluate_guardrails
from mlcanary.lifecycle import after_guardrails
from mlcanary.sources import MetricSource
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import naive_utc, utcnow
from mlcanary.watch import End, Ended, WatchState, after_error, after_look, after_poll, past_deadline
from mlcanary.words import took
from mlcanary_airflow.hooks import WarehouseHook, metric_source, router_for

_T = TypeVar("_T")


@dataclass(frozen=True)
class Clock:
    """The trigger's clocks: ``monotonic`` advances the bake, ``wall`` decides the deadline (tests
    replace it with one that steps)."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


CLOCK = Clock()

_MARKS = {Verdict.PASS: "ok", Verdict.FAIL: "FAIL", Verdict.INCONCLUSIVE: "inconclusive", Verdict.INVALID: "INVALID"}


def _check_text(check: CheckResult) -> str:
    """``p99_latency_ms 212 ms < 250 ms ok``: the check's value against its limit, and its verdict."""
    said = check.reason.split(" (", 1)[0]
    return said if check.verdict is Verdict.INCONCLUSIVE and "no data" in said else f"{said} {_MARKS[check.verdict]}"


def poll_line(poll: int, stage: int, percent: float, where: str, result: GuardrailResult) -> str:
    """One poll in one line: each check's value against its limit (the evidence in brackets left to
    the measurements table), e.g. ``poll 12 (stage 1, 10 %, 48 s of 2 min healthy): success_rate
    99.91 % >= 99.5 % ok; p99_latency_ms 212 ms < 250 ms ok; ...``."""
    checks = "; ".join(_check_text(c) for c in result.checks)
    return f"poll {poll} (stage {stage}, {percent:g} %, {where}): {checks or result.reason}"


class _GuardrailPolls(BaseTrigger):
    """What every trigger that watches a stage's guardrails shares: one poll at a time in a thread
    of the loop's pool with a time limit (``max(interval, 5 s)``), so a slow or hung source is this
    trigger's error and does not hold up another rollout's polls (the triggerer's one shared thread
    would); every poll and source error written to the
    measurements table with the watch's counters (:mod:`mlcanary.progress`), so a restarted
    trigger goes on from them. The window of a poll starts no earlier than the stage's shift.

    The slow tier looks alongside during a bake (``looks_in_background``): every
    ``analysis.interval`` of the stage an analysis look runs in a thread of its own, never holding
    up a poll, and ``consecutive_fails`` failing looks in a row end the watch (``analysis_fail``)
    and roll back."""

    wait_prefix = "guardrails"
    looks_in_background = True

    def __init__(
        self,
        spec: dict[str, Any],
        rollout_id: str,
        stage: int,
        baseline_version: str,
        canary_version: str,
        stage_started_epoch: float | None = None,
        dry_run: bool = False,
        waiting_for: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.rollout_id = rollout_id
        self.stage = stage
        self.baseline_version = baseline_version
        self.canary_version = canary_version
        self.stage_started_epoch = stage_started_epoch
        self.dry_run = dry_run
        self.waiting_for = waiting_for  # what the stage waits for, for the reason of a rollback
        self._source: MetricSource | None = None  # built at the first poll, in its thread
        self._warehouse: Engine | None = None
        self._look_task: asyncio.Future[AnalysisResult] | None = None
        self._next_look = math.inf  # monotonic

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            spec=self.spec,
            rollout_id=self.rollout_id,
            stage=self.stage,
            baseline_version=self.baseline_version,
            canary_version=self.canary_version,
            stage_started_epoch=self.stage_started_epoch,
            dry_run=self.dry_run,
            waiting_for=self.waiting_for,
        )

    @property
    def wait(self) -> str:
        return f"{self.wait_prefix}:stage_{self.stage}"

    def _engine(self, spec: RolloutSpec) -> Engine:
        """The warehouse's engine, looked up once per trigger: the connection's lookup (and the
        masking of its secrets) goes through the supervisor, which ``dag.test()``'s in-process
        supervisor does not allow from two threads at once."""
        if self._warehouse is None:
            self._warehouse = WarehouseHook(spec.warehouse.conn_id).get_engine()
        return self._warehouse

    def _measure(self, spec: RolloutSpec, source: MetricSource | None) -> tuple[MetricSource, GuardrailResult]:
        source = source or metric_source(spec)
        since = None
        if self.stage_started_epoch is not None:
            since = naive_utc(datetime.fromtimestamp(self.stage_started_epoch, UTC))
        now = utcnow()
        return source, evaluate_guardrails(
            source,
            spec,
            self.canary_version,
            now,
            self.baseline_version,
            since=since,
            canary_percent=self._share(spec, now, since),
            window_alpha=spec.guardrails.alpha / (2 * self.max_polls(spec)),
        )

    def max_polls(self, spec: RolloutSpec) -> int:
        """How many polls this watch can take: the window tests share ``alpha / 2`` among them."""
        g = spec.guardrails
        longest = spec.stages[max(self.stage, 1) - 1].bake + g.deadline_margin
        return max(1, math.ceil(longest / g.interval))

    def _share(self, spec: RolloutSpec, now: datetime, since: datetime | None) -> float | None:
        """The canary's share in force, for the sample-ratio check; None in a dry run (nothing moved)
        and until the stage is two guardrail windows old, so requests routed by the previous split
        while the platform applied this one are a small part of the counts."""
        settled = since is not None and now - since >= 2 * spec.guardrails.window
        return None if self.dry_run or not settled else spec.stages[self.stage - 1].percent

    def _record(self, spec: RolloutSpec, checks: list[CheckResult], state: WatchState) -> None:
        with self._engine(spec).begin() as conn:
            record_checks(
                conn,
                checks,
                model=spec.model,
                rollout_id=self.rollout_id,
                stage=self.stage,
                baseline_version=self.baseline_version,
                canary_version=self.canary_version,
            )
            progress.save(conn, self.rollout_id, self.wait, state.to_dict())

    def _record_error(self, spec: RolloutSpec, state: WatchState) -> None:
        now = utcnow()
        check = CheckResult(
            tier="guardrail",
            check="metric_source",
            segment="*",
            verdict=Verdict.INVALID,
            reason=state.reason,
            window_start=now - spec.guardrails.window,
            window_end=now,
            gating=False,
        )
        try:
            self._record(spec, [check], state)
        except Exception as exc:  # the warehouse itself is the failing source: the event still says why
            self.log.warning("could not record the source error: %s", exc)

    def _load(self, spec: RolloutSpec) -> WatchState:
        try:
            with self._engine(spec).connect() as conn:
                return WatchState.from_dict(progress.load(conn, self.rollout_id, self.wait))
        except Exception as exc:  # no counters to go on from: start afresh, the first poll will say why
            self.log.warning("guardrails stage %d: could not load the watch's counters: %s", self.stage, exc)
            return WatchState()

    def _clear(self, spec: RolloutSpec) -> None:
        try:
            with self._engine(spec).begin() as conn:
                progress.clear(conn, self.rollout_id, self.wait)
        except Exception as exc:
            self.log.warning("guardrails stage %d: could not clear the watch's counters: %s", self.stage, exc)

    def _roll_back_now(self, spec: RolloutSpec, ended: Ended) -> dict[str, Any]:
        """The canary to 0 % from the triggerer, the moment the watch ends badly: the task resumes
        seconds later (a worker slot, a process) and only confirms. What it did travels in the event;
        records it could not write go on to the report."""
        why = ended.reason + (f" (while waiting for {self.waiting_for})" if self.waiting_for else "")
        reason = after_guardrails(ended.end.value, why, self.stage).reason
        try:
            done = steps.rollback(self._engine(spec), router_for(spec), self._ref(spec), reason)
        except Exception as exc:  # refused, or the router failed: the task rolls back (with retries)
            self.log.error("guardrails stage %d: rollback from the triggerer failed: %s", self.stage, exc)
            return {"reason": reason, "error": f"{type(exc).__name__}: {exc}"}
        self.log.warning("guardrails stage %d: rolled back: %s", self.stage, reason)
        return {
            "reason": reason,
            "note": done.records.note,
            "pending": None if done.recorded else done.records.to_dict(),
        }

    async def _end_badly(self, spec: RolloutSpec, ended: Ended) -> dict[str, Any]:
        done = await asyncio.to_thread(self._roll_back_now, spec, ended)  # no time limit: never abandoned
        await self._best_effort(spec, self._clear, spec)
        return done

    async def _in_thread(self, limit: float, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn`` in a thread of the loop's pool, never the triggerer's one shared thread."""
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout=limit)

    async def _best_effort(self, spec: RolloutSpec, fn: Callable[..., Any], *args: Any) -> None:
        """Bookkeeping (the counters, a source error's record) that must never end the watch."""
        try:
            await self._in_thread(self._limit(spec), fn, *args)
        except Exception as exc:  # a timeout included: the watch goes on without it
            self.log.warning("guardrails stage %d: %s skipped: %s", self.stage, fn.__name__, exc or type(exc).__name__)

    def _look(self, spec: RolloutSpec) -> AnalysisResult:
        """One background analysis look at the label-complete rows so far, recorded like the gate's."""
        return steps.look(self._engine(spec), spec, self._ref(spec), self.stage)

    def _ref(self, spec: RolloutSpec) -> steps.RolloutRef:
        return steps.RolloutRef(self.rollout_id, spec.model, self.baseline_version, self.canary_version, self.dry_run)

    def _record_confirm(self, spec: RolloutSpec, state: WatchState, reason: str) -> None:
        """A failing look that does not end the stage yet, in the decision log (once per look)."""
        a = spec.analysis
        with self._engine(spec).begin() as conn:
            record_decision(
                conn,
                rollout_id=self.rollout_id,
                model=spec.model,
                stage=self.stage,
                action="confirm",
                verdict=Verdict.FAIL,
                reason=f"failing look {state.look_fails} of {a.consecutive_fails} during the bake: {reason}",
                key=f"confirm:{self.wait}:{state.looks}",
            )

    async def _looking(self, spec: RolloutSpec, state: WatchState) -> tuple[WatchState, Ended | None]:
        """Take the verdict of a background look that finished; start the next when it is due and
        none is running (a look slower than the interval delays the next, never piles up)."""
        if not self.looks_in_background:
            return state, None
        ended = None
        task = self._look_task
        if task is not None and task.done():
            self._look_task = None
            try:
                result = task.result()
            except Exception as exc:  # a look that cannot run decides nothing; the gate look will say why
                self.log.warning("stage %d: background analysis look failed: %r", self.stage, exc)
            else:
                state, ended = after_look(state, result.verdict, result.reason, spec.analysis.consecutive_fails)
                if ended is None and state.look_fails:
                    await self._best_effort(spec, self._record_confirm, spec, state, result.reason)
                self.log.info(
                    "stage %d: analysis look %d in the background: %s: %s",
                    self.stage,
                    state.looks,
                    result.verdict.value,
                    result.reason,
                )
        if ended is None and self._look_task is None and CLOCK.monotonic() >= self._next_look:
            self._next_look = CLOCK.monotonic() + spec.analysis.interval.total_seconds()
            self._look_task = asyncio.ensure_future(asyncio.to_thread(self._look, spec))
        return state, ended

    def _first_look(self, spec: RolloutSpec) -> float:
        """When the first background look is due (monotonic): one analysis interval into the stage,
        or the next multiple of it for a trigger that restarts mid-stage."""
        interval = spec.analysis.interval.total_seconds()
        into = CLOCK.wall() - (self.stage_started_epoch or CLOCK.wall())
        return CLOCK.monotonic() + (interval - into % interval if into > 0 else interval)

    async def _start(self, spec: RolloutSpec) -> WatchState:
        self._next_look = self._first_look(spec)
        try:
            state = await self._in_thread(self._limit(spec), self._load, spec)
        except TimeoutError:
            self.log.warning("guardrails stage %d: the watch's counters took too long to load: afresh", self.stage)
            state = WatchState()
        if state.polls:
            self.log.info(
                "guardrails stage %d: going on from %d polls, %.0f s baked",
                self.stage,
                state.polls,
                state.healthy_seconds,
            )
        return state

    def _log_poll(self, spec: RolloutSpec, state: WatchState, bake_seconds: float, result: GuardrailResult) -> None:
        """The poll in the task's log (a trigger's log lines go to its task's log): info when every
        check passed, warning (yellow in the UI) otherwise."""
        if math.isfinite(bake_seconds):
            where = f"{took(state.healthy_seconds)} of {took(bake_seconds)} healthy"
        else:
            where = f"waiting for {self.waiting_for or 'the next step'}"
        line = poll_line(state.polls, self.stage, spec.stages[self.stage - 1].percent, where, result)
        (self.log.info if result.verdict is Verdict.PASS else self.log.warning)(line)

    @staticmethod
    def _limit(spec: RolloutSpec) -> float:
        return max(spec.guardrails.interval.total_seconds(), 5.0)

    async def _poll(
        self, spec: RolloutSpec, state: WatchState, bake_seconds: float
    ) -> tuple[WatchState, Ended | None, float, GuardrailResult | None]:
        """One poll (or one source error): the new counters, how the watch ended if it did, the
        seconds until the next poll, and the poll's result."""
        g = spec.guardrails
        limit = self._limit(spec)
        polled = CLOCK.monotonic()
        try:
            self._source, result = await self._in_thread(limit, self._measure, spec, self._source)
            rolls_back = spec.policies.invalid == "rollback"
            new, ended = after_poll(
                state, g, result.verdict, result.reason, result.missing, polled, bake_seconds, rolls_back
            )
            try:
                await self._in_thread(limit, self._record, spec, result.checks, new)
            except Exception as exc:
                if ended is None or ended.end is End.HEALTHY:
                    raise  # no advance, and no all-clear, without its audit: an error like any other
                self.log.error("guardrails stage %d: this poll could not be recorded: %s", self.stage, exc)
            self._log_poll(spec, new, bake_seconds, result)
            return new, ended, max(0.0, polled + g.interval.total_seconds() - CLOCK.monotonic()), result
        except Exception as exc:  # any source failure (or a poll past its limit) is retried, then fails closed
            what = f"poll took longer than {limit:g} s" if isinstance(exc, TimeoutError) else str(exc)
            new, ended, delay = after_error(state, g, f"{type(exc).__name__}: {what}")
            self.log.warning("guardrails stage %d: %s", self.stage, new.reason)
            await self._best_effort(spec, self._record_error, spec, new)
            return new, ended, max(0.0, polled + delay - CLOCK.monotonic()), None


class GuardrailTrigger(_GuardrailPolls):
    """Poll every ``guardrails.interval``, from one interval after the stage's shift, until the
    watch (:mod:`mlcanary.watch`) ends it: ``healthy``, ``breach``, ``no_data``, ``error`` or
    ``timeout`` (``deadline_epoch``, absolute, enforced here, so ``dag.test()`` and a moved trigger
    behave the same)."""

    def __init__(self, bake_seconds: float, deadline_epoch: float, **watch: Any) -> None:
        super().__init__(**watch)
        self.bake_seconds = bake_seconds
        self.deadline_epoch = deadline_epoch

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs = self._kwargs() | {"bake_seconds": self.bake_seconds, "deadline_epoch": self.deadline_epoch}
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        interval = spec.guardrails.interval.total_seconds()
        state = await self._start(spec)
        first = (self.stage_started_epoch or CLOCK.wall()) + interval  # the stage's own traffic only
        await CLOCK.sleep(min(interval, max(0.0, first - CLOCK.wall())))
        while True:
            state, ended, wait, _ = await self._poll(spec, state, self.bake_seconds)
            state, looked = await self._looking(spec, state)
            if looked is not None and (ended is None or ended.end is End.HEALTHY):
                ended = looked  # a failing analysis outweighs a healthy bake
            ended = ended or past_deadline(state, CLOCK.wall() + wait, self.deadline_epoch, self.bake_seconds)
            if ended is not None:
                healthy = ended.end is End.HEALTHY
                if healthy:
                    await self._best_effort(spec, self._clear, spec)
                # What the task needs, no more: the triggerer logs the whole event ("Trigger fired
                # event"), and every poll's values are in the log lines above and the measurements table.
                yield TriggerEvent(
                    {
                        "status": ended.end.value,
                        "polls": state.polls,
                        "healthy_seconds": round(state.healthy_seconds, 1),
                        "reason": ended.reason,
                        "looks": state.looks,
                        "look_fails": state.look_fails,
                        "rolled_back": None if healthy else await self._end_badly(spec, ended),
                    }
                )
                return
            await CLOCK.sleep(wait)


class GuardedWaitTrigger(_GuardrailPolls):
    """Wait until ``at_epoch`` (the next analysis look) while the guardrails keep polling the stage
    in force; hand ``state`` back to the task in the event. A breach (or too long without data, or
    failing sources) ends the wait at once, with ``guardrails`` in the event: the task rolls back.

    The state travels in the event, not in the defer kwargs: ``dag.test()`` resumes a task with the
    event alone, while a real triggerer merges both, and the two must behave the same.
    """

    wait_prefix = "watch"
    looks_in_background = False  # the wait ends in the task's own look

    def max_polls(self, spec: RolloutSpec) -> int:
        return max(1, math.ceil(spec.analysis.interval / spec.guardrails.interval))

    def __init__(self, at_epoch: float, state: dict[str, Any], **watch: Any) -> None:
        super().__init__(**watch)
        self.at_epoch = at_epoch
        self.state = state

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs = self._kwargs() | {"at_epoch": self.at_epoch, "state": self.state}
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        state = await self._start(spec)
        while True:
            state, ended, wait, _ = await self._poll(spec, state, float("inf"))
            if ended is None and CLOCK.wall() + wait >= self.at_epoch:
                await CLOCK.sleep(max(0.0, self.at_epoch - CLOCK.wall()))  # no poll due before the look
            if ended is not None:
                guard = {"status": ended.end.value, "reason": ended.reason}
                yield TriggerEvent(
                    {**self.state, "guardrails": guard, "rolled_back": await self._end_badly(spec, ended)}
                )
                return
            if CLOCK.wall() >= self.at_epoch:
                await self._best_effort(spec, self._clear, spec)
                yield TriggerEvent({**self.state, "guardrails": None})
                return
            await CLOCK.sleep(wait)


class GuardedHITLTrigger(_GuardrailPolls):
    """A question to a person (Airflow's ``HITLTrigger``: an answer, or the defaults at the
    timeout) while the guardrails keep polling the stage in force. A breach (or too long without
    data, or failing sources) answers the question itself with ``reject`` (recorded as answered
    by nobody, so the Required Actions entry closes) and ends the wait at once, with
    ``guardrails`` in the event: the task rolls back.
    """

    wait_prefix = "ask"
    # The question comes after the stage's gate look (or the final one); the guardrails keep watching
    # while a person thinks, and the triggerer's threads stay free for the polls.
    looks_in_background = False

    def max_polls(self, spec: RolloutSpec) -> int:
        """The question's timeout in polls (a day without one), counted when the watch starts."""
        if self._max_polls is None:
            timeout = self.question.timeout_datetime
            seconds = 86400.0 if timeout is None else max(0.0, (timeout - hitl_utcnow()).total_seconds())
            self._max_polls = max(1, math.ceil(seconds / spec.guardrails.interval.total_seconds()))
        return self._max_polls

    def __init__(self, hitl: dict[str, Any], reject: str, **watch: Any) -> None:
        super().__init__(**watch)
        self.reject = reject
        self.question = HITLTrigger(**hitl)
        self._max_polls: int | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs = self._kwargs() | {"hitl": self.question.serialize()[1], "reject": self.reject}
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def _close(self) -> Any:
        """Answer the question with ``reject``; None when a person answered first (409). In the
        question's own thread (``sync_to_async``, as ``HITLTrigger`` does), after any check of its
        answer still in flight."""
        try:
            return await sync_to_async(update_hitl_detail_response)(
                ti_id=self.question.ti_id, chosen_options=[self.reject], params_input=self.question.params.dump()
            )
        except Exception as exc:
            self.log.warning("the question could not be closed (answered meanwhile?): %s", exc)
            return None

    async def _answer(self) -> TriggerEvent:
        """The question's own loop (``HITLTrigger.run``: an answer, or the defaults at the timeout)."""
        async for event in self.question.run():
            return event
        raise RuntimeError("the question ended without an event")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        state = await self._start(spec)
        q = self.question
        # The question is watched side by side with the polls, from the first poll on: its API round
        # trips (seconds, the first one, on a loaded triggerer) never hold up a poll.
        answer: asyncio.Future[TriggerEvent] | None = None
        try:
            while answer is None or not answer.done():
                state, ended, wait, _ = await self._poll(spec, state, float("inf"))
                if ended is not None:
                    if answer is not None:
                        answer.cancel()
                    done = await self._end_badly(spec, ended)  # traffic first, then the question
                    closed = await self._close()
                    breach = {"status": ended.end.value, "reason": ended.reason}
                    if closed is None and (answered := await q._handle_response()) is not None:
                        # a person's answer came first: it goes on, with the breach and its rollback
                        yield TriggerEvent({**answered.payload, "guardrails": breach, "rolled_back": done})
                        return
                    yield TriggerEvent(
                        {
                            "chosen_options": [self.reject],
                            "params_input": q.params.dump(),
                            "responded_by_user": None,
                            "responded_at": hitl_utcnow() if closed is None else closed.responded_at,
                            "timedout": False,
                            "guardrails": breach,
                            "rolled_back": done,
                        }
                    )
                    return
                answer = answer or asyncio.ensure_future(self._answer())
                await asyncio.wait({answer}, timeout=wait)
            await self._best_effort(spec, self._clear, spec)
            yield answer.result()
        finally:
            if answer is not None:
                answer.cancel()
