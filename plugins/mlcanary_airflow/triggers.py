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
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary_airflow.hooks import WarehouseHook


class GuardrailTrigger(BaseTrigger):
    """Poll every ``guardrails.interval`` until one of:

    - ``healthy``: healthy polls have covered ``bake_seconds`` (polls with no data do not count);
    - ``breach``: ``guardrails.consecutive_breaches`` failing polls in a row;
    - ``timeout``: ``deadline_epoch`` passed first. The deadline is absolute and enforced here,
      so ``dag.test()`` (which ignores defer timeouts) and a moved trigger behave the same.

    Every poll is written to the measurements table.
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

    def _poll(self, spec: RolloutSpec) -> GuardrailResult:
        engine = WarehouseHook(spec.warehouse.conn_id).get_engine()
        with engine.connect() as conn:
            result = evaluate_guardrails(conn, spec, self.canary_version, utcnow(), self.baseline_version)
        with engine.begin() as conn:
            record_checks(
                conn,
                result.checks,
                model=spec.model,
                rollout_id=self.rollout_id,
                stage=self.stage,
                baseline_version=self.baseline_version,
                canary_version=self.canary_version,
            )
        return result

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = RolloutSpec.model_validate(self.spec)
        interval = spec.guardrails.interval.total_seconds()
        healthy = 0.0
        breaches = 0
        polls = 0
        last_ok_at: float | None = None
        last: GuardrailResult | None = None
        while True:
            polled_at = time.time()
            last = await sync_to_async(self._poll)(spec)
            polls += 1
            base = {"polls": polls, "healthy_seconds": healthy, "reason": last.reason, "result": last.to_dict()}
            if last.verdict is Verdict.FAIL:
                breaches += 1
                last_ok_at = None
                if breaches >= spec.guardrails.consecutive_breaches:
                    yield TriggerEvent({"status": "breach", **base})
                    return
            else:
                breaches = 0
            if last.verdict is Verdict.PASS:
                if last_ok_at is not None:
                    healthy += polled_at - last_ok_at
                last_ok_at = polled_at
                if healthy >= self.bake_seconds:
                    yield TriggerEvent({"status": "healthy", **base, "healthy_seconds": healthy})
                    return
            elif last.verdict is not Verdict.FAIL:
                last_ok_at = None  # no data: the bake does not advance
            next_poll = polled_at + interval
            if next_poll > self.deadline_epoch:
                yield TriggerEvent(
                    {
                        "status": "timeout",
                        **base,
                        "reason": f"deadline passed with {healthy:.0f} s of {self.bake_seconds:.0f} s "
                        f"baked healthy; last poll: {last.reason}",
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
