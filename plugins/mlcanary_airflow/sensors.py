"""The guardrail sensor: deferrable, fail-closed, never ``soft_fail``."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from mlcanary_airflow.operators import RolloutTaskMixin
from mlcanary_airflow.triggers import GuardrailTrigger


class GuardrailSensor(RolloutTaskMixin, BaseOperator):
    """Wait in the triggerer while the stage bakes; fail the task at once on a breach.

    A breach, too long without data (policy ``fail``), failing metric sources, a deadline without a
    full healthy bake, or a trigger error: the canary goes to 0 % at once, then the task raises
    ``AirflowFailException`` (no retries) and the DAG's ``rollback`` task confirms the rollback.
    """

    ui_color = "#fef7e0"

    def __init__(self, *, spec: dict[str, Any], stage: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage

    def execute(self, context: Context) -> None:
        rollout = self.rollout(context)
        bake = self.spec.stages[self.stage - 1].bake.total_seconds()
        limit = bake + self.spec.guardrails.deadline_margin.total_seconds()
        self.defer(
            trigger=GuardrailTrigger(
                spec=self.spec_data,
                rollout_id=rollout.rollout_id,
                stage=self.stage,
                baseline_version=rollout.baseline_version,
                canary_version=rollout.canary_version,
                bake_seconds=bake,
                deadline_epoch=time.time() + limit,
            ),
            method_name="execute_complete",
            # A backstop for a real triggerer; the trigger's own deadline normally ends it first.
            timeout=timedelta(seconds=limit + 60),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        event = event or {"status": "error", "reason": "the trigger ended without an event"}
        if event["status"] == "healthy":
            self.log.info(
                "stage %d healthy for %.0f s over %d polls: %s",
                self.stage,
                event["healthy_seconds"],
                event["polls"],
                event["reason"],
            )
            return {k: event[k] for k in ("status", "polls", "healthy_seconds", "reason")}
        rollout = self.rollout(context)
        reason = f"guardrails stage {self.stage} {event['status']}: {event['reason']}"
        self.decide(rollout, "rollback", reason, self.stage)
        self.roll_back_now(rollout, reason)
        raise AirflowFailException(reason)
