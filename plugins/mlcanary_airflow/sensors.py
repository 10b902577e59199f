"""The guardrail sensor: deferrable, fail-closed, never ``soft_fail``."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context

from mlcanary.lifecycle import Action, Step, after_guardrails
from mlcanary.words import took
from mlcanary_airflow.links import RolloutReportLink
from mlcanary_airflow.operators import DECIDED, RolloutTaskMixin
from mlcanary_airflow.triggers import GuardrailTrigger


class GuardrailSensor(RolloutTaskMixin, BaseOperator):
    """Wait in the triggerer while the stage bakes, the analysis looking alongside; fail the task at
    once on a breach or on ``analysis.consecutive_fails`` failing looks.

    A breach, failing analysis looks, too long without data (policy ``fail``), failing metric
    sources, a deadline without a full healthy bake, or a trigger error: the canary goes to 0 % at
    once, then the task raises ``AirflowFailException`` (no retries) and the DAG's ``rollback``
    teardown confirms the rollback.
    A rollout that is no longer running is not watched again (its task is skipped or fails).
    """

    ui_color = "#fef7e0"
    operator_extra_links = (RolloutReportLink(),)

    def __init__(self, *, spec: dict[str, Any], stage: int, **kwargs: Any) -> None:
        kwargs.setdefault("retry_policy", DECIDED)  # a breach fails it in one log line, without retries
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage

    def execute(self, context: Context) -> None:
        rollout = self.rollout(context, Action.LOOK)
        bake = self.spec.stages[self.stage - 1].bake.total_seconds()
        limit = bake + self.spec.guardrails.deadline_margin.total_seconds()
        stage = self.spec.stages[self.stage - 1]
        self.log.info(
            "stage %d: %s at %g %% of traffic, %s of %g %%; baking %s, a poll every %s (each poll below, "
            "in the triggerer's lines)",
            self.stage,
            rollout.canary_version,
            stage.percent,
            rollout.baseline_version,
            100 - stage.percent,
            took(bake),
            took(self.spec.guardrails.interval),
        )
        self.defer(
            trigger=GuardrailTrigger(
                bake_seconds=bake, deadline_epoch=time.time() + limit, **self.watch(rollout, self.stage)
            ),
            method_name="execute_complete",
            # A backstop for a real triggerer; the trigger's own deadline normally ends it first.
            timeout=timedelta(seconds=limit + 60),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        event = event or {"status": "error", "reason": "the trigger ended without an event"}
        nxt = after_guardrails(event["status"], event["reason"], self.stage)
        if nxt.step is Step.ROLL_BACK:
            self.stop(context, self.ref(context), nxt, event.get("rolled_back"))
        self.log.info(
            "stage %d healthy for %s over %d polls: %s",
            self.stage,
            took(event["healthy_seconds"]),
            event["polls"],
            event["reason"],
        )
        kept = {k: event[k] for k in ("status", "polls", "healthy_seconds", "reason")}
        return kept | {"looks": event.get("looks", 0), "look_fails": event.get("look_fails", 0)}
