"""The guardrail trigger: polls the canary's health in the triggerer until the bake is done."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from mlcanary.audit import record_checks
from mlcanary.guardrails import GuardrailResult, evaluate_guardrails
from mlcanary.sources import MetricSource
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary_airflow.hooks import WarehouseHook, metric_source


class GuardrailTrigger(BaseTrigger):
    """Poll every ``guardrails.interval`` until one of:

    - ``healthy``: healthy polls have covered ``bake_seconds`` (polls with no data do not count);
    - ``breach``: ``guardrails.consecutive_breaches`` failing polls in a row;
    - ``no_data``: ``guardrails.no_data_limit`` polls in a row without enough data, under the
      policy ``fail`` (under ``hold`` the stage waits for data until the deadline);
    - ``error``: ``guardrails.error_limit`` metric-source errors in a row (fail closed); an error is
      retried after 1, 2, 4 ... seconds, never later than the next interval;
    - ``timeout``: ``deadline_epoch`` passed first. The deadline is absolute and enforced here,
      so ``dag.test()`` (which ignores defer timeouts) and a moved trigger behave the same.

    Every poll, and every source error, is written to the measurements table.
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
    ) -> None:
        super().__init__()
        self.spec = spec
        self.rollout_id = rollout_id
        self.stage = stage
        self.baseline_version = baseline_version
        self.canary_version = canary_version
        self.bake_seconds = bake_seconds
        self.deadline_epoch = deadline_epoch

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
            ),
        )

    def _record(self, spec: RolloutSpec, checks: list[CheckResult]) -> None:
        with WarehouseHook(spec.warehouse.conn_id).get_engine().begin() as conn:
            record_checks(
                conn,
                checks,
                model=spec.model,
                rollout_id=self.rollout_id,
                stage=self.stage,
                baseline_version=self.baseline_version,
                canary_version=self.canary_version,
            )

    def _poll(self, spec: RolloutSpec, source: MetricSource) -> GuardrailResult:
        result = evaluate_guardrails(source, spec, self.canary_version, utcnow(), self.baseline_version)
        self._record(spec, result.checks)
        return result

    def _record_error(self, spec: RolloutSpec, error: Exception, errors: int) -> str:
        now = utcnow()
        reason = (
            f"metric source error {errors} of {spec.guardrails.error_limit} in a row: {type(error).__name__}: {error}"
        )
        try:
            self._record(
                spec,
                [
                    CheckResult(
                        tier="guardrail",
                        check="metric_source",
                        segment="*",
                        verdict=Verdict.INVALID,
                        reason=reason,
                        window_start=now - spec.guardrails.window,
                        window_end=now,
                        gating=False,
                    )
                ],
            )
        except Exception as exc:  # the warehouse itself is the failing source: the event still says why
            self.log.warning("could not record the source error: %s", exc)
        return reason

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        g = spec.guardrails
        interval = g.interval.total_seconds()
        healthy = 0.0
        breaches = no_data = errors = polls = 0
        last_ok_at: float | None = None
        reason = "no poll yet"
        source: MetricSource | None = None
        while True:
            polled_at = time.time()
            polls += 1
            try:
                source = source or await sync_to_async(metric_source)(spec)
                last = await sync_to_async(self._poll)(spec, source)
            except Exception as exc:  # any source failure is retried, then fails closed
                errors += 1
                last_ok_at = None
                reason = await sync_to_async(self._record_error)(spec, exc, errors)
                self.log.warning("guardrails stage %d: %s", self.stage, reason)
                base = {"polls": polls, "healthy_seconds": healthy, "reason": reason, "result": None}
                if errors >= g.error_limit:
                    yield TriggerEvent({"status": "error", **base})
                    return
                retry = polled_at + min(interval, 2.0 ** (errors - 1))
                if retry > self.deadline_epoch:
                    yield TriggerEvent({"status": "timeout", **base, "reason": f"deadline passed; {reason}"})
                    return
                await asyncio.sleep(max(0.0, retry - time.time()))
                continue
            errors = 0
            reason = last.reason
            base = {"polls": polls, "healthy_seconds": healthy, "reason": reason, "result": last.to_dict()}
            if last.verdict is Verdict.FAIL:
                breaches += 1
                last_ok_at = None
                if breaches >= g.consecutive_breaches:
                    yield TriggerEvent({"status": "breach", **base})
                    return
            else:
                breaches = 0
            no_data = no_data + 1 if last.missing else 0
            if last.verdict is Verdict.PASS:
                if last_ok_at is not None:
                    healthy += polled_at - last_ok_at
                last_ok_at = polled_at
                if healthy >= self.bake_seconds:
                    yield TriggerEvent({"status": "healthy", **base, "healthy_seconds": healthy})
                    return
            elif last.verdict is not Verdict.FAIL:
                last_ok_at = None  # no data, or not yet significant: the bake does not advance
            if no_data >= g.no_data_limit and g.no_data_policy == "fail":
                yield TriggerEvent(
                    {
                        "status": "no_data",
                        **base,
                        "reason": f"{no_data} polls in a row without enough data "
                        f"({', '.join(last.missing)}); policy fail: {reason}",
                    }
                )
                return
            next_poll = polled_at + interval
            if next_poll > self.deadline_epoch:
                yield TriggerEvent(
                    {
                        "status": "timeout",
                        **base,
                        "reason": f"deadline passed with {healthy:.0f} s of {self.bake_seconds:.0f} s "
                        f"baked healthy; last poll: {reason}",
                    }
                )
                return
            await asyncio.sleep(max(0.0, next_poll - time.time()))


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
        await asyncio.sleep(max(0.0, self.at_epoch - time.time()))
        yield TriggerEvent(self.state)
