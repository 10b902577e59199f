"""The guardrail trigger: polls the canary's health in the triggerer until the bake is done."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from airflow.triggers.base import BaseTrigger, TriggerEvent
from sqlalchemy.engine import Engine

from mlcanary import progress
from mlcanary.audit import record_checks
from mlcanary.guardrails import GuardrailResult, evaluate_guardrails
from mlcanary.sources import MetricSource
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.watch import WatchState, after_error, after_poll, past_deadline
from mlcanary_airflow.hooks import WarehouseHook, metric_source

_T = TypeVar("_T")


@dataclass(frozen=True)
class Clock:
    """The trigger's clocks: ``monotonic`` advances the bake, ``wall`` decides the deadline (tests
    replace it with one that steps)."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


CLOCK = Clock()


class GuardrailTrigger(BaseTrigger):
    """Poll every ``guardrails.interval``, from one interval after the stage's shift, until the
    watch (:mod:`mlcanary.watch`) ends it: ``healthy``, ``breach``, ``no_data``, ``error`` or
    ``timeout`` (``deadline_epoch``, absolute, enforced here, so ``dag.test()`` and a moved trigger
    behave the same).

    Each poll runs in a thread of its own with a time limit (``max(interval, 5 s)``): a slow or hung
    source is this trigger's error, never another rollout's wait. Every poll and every source error
    is written to the measurements table, with the watch's counters (:mod:`mlcanary.progress`): a
    restarted trigger goes on from them.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        rollout_id: str,
        stage: int,
        baseline_version: str,
        canary_version: str,
        bake_seconds: float,
        deadline_epoch: float,
        stage_started_epoch: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.rollout_id = rollout_id
        self.stage = stage
        self.baseline_version = baseline_version
        self.canary_version = canary_version
        self.bake_seconds = bake_seconds
        self.deadline_epoch = deadline_epoch
        self.stage_started_epoch = stage_started_epoch

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            dict(
                spec=self.spec,
                rollout_id=self.rollout_id,
                stage=self.stage,
                baseline_version=self.baseline_version,
                canary_version=self.canary_version,
                bake_seconds=self.bake_seconds,
                deadline_epoch=self.deadline_epoch,
                stage_started_epoch=self.stage_started_epoch,
            ),
        )

    @property
    def wait(self) -> str:
        return f"guardrails:stage_{self.stage}"

    def _engine(self, spec: RolloutSpec) -> Engine:
        return WarehouseHook(spec.warehouse.conn_id).get_engine()

    def _measure(self, spec: RolloutSpec, source: MetricSource | None) -> tuple[MetricSource, GuardrailResult]:
        source = source or metric_source(spec)
        since = None if self.stage_started_epoch is None else datetime.fromtimestamp(self.stage_started_epoch, UTC)
        since_naive = None if since is None else since.replace(tzinfo=None)
        return source, evaluate_guardrails(
            source, spec, self.canary_version, utcnow(), self.baseline_version, since=since_naive
        )

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

    async def _in_thread(self, limit: float, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn`` in a thread of the loop's pool, never the triggerer's one shared thread."""
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout=limit)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        g = spec.guardrails
        interval = g.interval.total_seconds()
        limit = max(interval, 5.0)
        state = await self._in_thread(limit, self._load, spec)
        if state.polls:
            self.log.info(
                "guardrails stage %d: going on from %d polls, %.0f s baked",
                self.stage,
                state.polls,
                state.healthy_seconds,
            )
        source: MetricSource | None = None
        last: GuardrailResult | None = None
        first = (self.stage_started_epoch or CLOCK.wall()) + interval  # the stage's own traffic only
        await CLOCK.sleep(min(interval, max(0.0, first - CLOCK.wall())))
        while True:
            polled = CLOCK.monotonic()
            try:
                source, result = await self._in_thread(limit, self._measure, spec, source)
                new, ended = after_poll(
                    state, g, result.verdict, result.reason, result.missing, polled, self.bake_seconds
                )
                await self._in_thread(limit, self._record, spec, result.checks, new)
                state, last, delay = new, result, interval
            except Exception as exc:  # any source failure (or a poll past its limit) is retried, then fails closed
                what = f"poll took longer than {limit:g} s" if isinstance(exc, TimeoutError) else str(exc)
                state, ended, delay = after_error(state, g, f"{type(exc).__name__}: {what}")
                self.log.warning("guardrails stage %d: %s", self.stage, state.reason)
                await self._in_thread(limit, self._record_error, spec, state)
                last = None
            wait = max(0.0, polled + delay - CLOCK.monotonic())
            ended = ended or past_deadline(state, CLOCK.wall() + wait, self.deadline_epoch, self.bake_seconds)
            if ended is not None:
                await self._in_thread(limit, self._clear, spec)
                yield TriggerEvent(
                    {
                        "status": ended.end.value,
                        "polls": state.polls,
                        "healthy_seconds": state.healthy_seconds,
                        "reason": ended.reason,
                        "result": None if last is None else last.to_dict(),
                    }
                )
                return
            await CLOCK.sleep(wait)


class LookAgainTrigger(BaseTrigger):
    """Wait until ``at_epoch``, then hand ``state`` back to the task in the event.

    The state travels in the event, not in the defer kwargs: ``dag.test()`` resumes a task with the
    event alone, while a real triggerer merges both, and the two must behave the same.
    """

    def __init__(self, at_epoch: float, state: dict[str, Any]) -> None:
        super().__init__()
        self.at_epoch = at_epoch
        self.state = state

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {"at_epoch": self.at_epoch, "state": self.state})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await CLOCK.sleep(max(0.0, self.at_epoch - CLOCK.wall()))
        yield TriggerEvent(self.state)
