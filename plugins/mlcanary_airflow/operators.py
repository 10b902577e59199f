"""Operators of a rollout DAG. Each maps one task to one call of the core library."""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseBranchOperator, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from sqlalchemy.engine import Engine

from mlcanary import rollout as lifecycle
from mlcanary.analysis import AnalysisResult, AnalysisWindow, analyze
from mlcanary.audit import last_decision, record_checks, record_decision
from mlcanary.report import format_report, rollout_report
from mlcanary.rollout import Rollout, RolloutError
from mlcanary.routers.base import Router
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import create_schema
from mlcanary_airflow.hooks import WarehouseHook, router_for
from mlcanary_airflow.triggers import LookAgainTrigger


def rollout_id_of(context: Context) -> str:
    return f"{context['dag'].dag_id}/{context['run_id']}"


class RolloutTaskMixin:
    """What every rollout task needs: its spec, the warehouse, the router and its rollout."""

    spec_data: dict[str, Any]
    log: Any  # the operator's logger

    @cached_property
    def spec(self) -> RolloutSpec:
        return RolloutSpec.model_validate(self.spec_data)

    @cached_property
    def engine(self) -> Engine:
        return WarehouseHook(self.spec.warehouse.conn_id).get_engine()

    @cached_property
    def router(self) -> Router:
        return router_for(self.spec)

    def rollout(self, context: Context) -> Rollout:
        with self.engine.connect() as conn:
            found = lifecycle.get_rollout(conn, rollout_id_of(context))
        if found is None:
            raise AirflowSkipException("this run never started a rollout (see validate_and_lock)")
        return found

    def roll_back_now(self, rollout: Rollout, reason: str) -> None:
        """Canary to 0 % from the task that saw the breach, before it fails: no waiting for the
        DAG's failure cascade to reach the ``rollback`` task. That task still runs (with retries)
        and finds the split already in force; if this attempt fails, it does the work."""
        try:
            lifecycle.rollback(self.engine, self.router, self.spec, rollout, reason)
        except Exception as exc:  # the rollback task retries; the original failure must still be raised
            self.log.error("immediate rollback failed, the rollback task will retry it: %s", exc)


class BeginRolloutOperator(RolloutTaskMixin, BaseOperator):
    """Validate the trigger's versions and take the model's lock; nothing else touches traffic first."""

    ui_color = "#e8f0fe"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> dict[str, Any]:
        params = context["params"]
        candidate = params.get("candidate_version")
        if not candidate:
            raise AirflowSkipException(f"no candidate version for {self.spec.model}: nothing to roll out")
        create_schema(self.engine, contract=False)
        try:
            started = lifecycle.begin_rollout(
                self.engine,
                self.router,
                self.spec,
                rollout_id_of(context),
                candidate,
                params.get("baseline_version") or None,
                bool(params.get("dry_run")),
            )
        except RolloutError as exc:
            raise AirflowFailException(str(exc)) from None
        self.log.info(
            "rollout %s: %s → %s%s",
            started.rollout_id,
            started.baseline_version,
            started.canary_version,
            " (dry run)" if started.dry_run else "",
        )
        return {"baseline_version": started.baseline_version, "canary_version": started.canary_version}


class ShiftTrafficOperator(RolloutTaskMixin, BaseOperator):
    """Move the canary to the stage's share; idempotent, verified by reading the split back."""

    ui_color = "#fff4e5"

    def __init__(self, *, spec: dict[str, Any], stage: int, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage

    def execute(self, context: Context) -> float:
        split = lifecycle.shift_to_stage(self.engine, self.router, self.spec, self.rollout(context), self.stage)
        self.log.info("stage %d: canary %s at %g %%", self.stage, split.canary_version, split.canary_percent)
        return split.canary_percent


class AnalysisOperator(RolloutTaskMixin, BaseOperator):
    """Slow ML analysis of the label-complete window so far.

    - FAIL stops the rollout once ``analysis.consecutive_fails`` looks in a row have failed; between
      looks the task waits one analysis interval in the triggerer.
    - INVALID (the arms' inputs drifted apart) with the policy ``rollback`` stops the rollout at any stage.
    - At the last stage, with the policy ``extend``, an INCONCLUSIVE (or INVALID) result looks again
      every interval until it is conclusive or ``policies.max_extension`` has passed.
    """

    ui_color = "#e6f4ea"

    def __init__(self, *, spec: dict[str, Any], stage: int, final: bool, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 2)
        kwargs.setdefault("retry_delay", timedelta(seconds=10))
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage
        self.final = final

    def execute(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        state = event or {}  # what the previous look handed over (see LookAgainTrigger)
        first_look: float = state.get("first_look") or time.time()
        fails: int = state.get("fails", 0)
        rollout = self.rollout(context)
        with self.engine.connect() as conn:
            window = AnalysisWindow.ending_at(self.spec, utcnow(), not_before=rollout.started_at)
            result = analyze(conn, self.spec, rollout.baseline_version, rollout.canary_version, window)
        with self.engine.begin() as conn:
            record_checks(
                conn,
                result.checks,
                model=self.spec.model,
                rollout_id=rollout.rollout_id,
                stage=self.stage,
                baseline_version=rollout.baseline_version,
                canary_version=rollout.canary_version,
            )
        self.log.info("stage %d analysis: %s: %s", self.stage, result.verdict.value, result.reason)
        for flag in result.flags:
            self.log.warning("stage %d: %s", self.stage, flag)
        a, p = self.spec.analysis, self.spec.policies

        def decide(action: str, reason: str) -> None:
            record_decision(
                self.engine,
                rollout_id=rollout.rollout_id,
                model=self.spec.model,
                stage=self.stage,
                action=action,
                verdict=result.verdict,
                reason=reason,
            )

        def look_again(fails: int = 0) -> None:
            at = time.time() + a.interval.total_seconds()
            self.defer(
                trigger=LookAgainTrigger(at_epoch=at, state={"first_look": first_look, "fails": fails}),
                method_name="execute",
            )

        if result.verdict is Verdict.FAIL:
            if fails + 1 < a.consecutive_fails:
                decide("confirm", f"failing look {fails + 1} of {a.consecutive_fails}: {result.reason}")
                look_again(fails=fails + 1)
            decide("rollback", f"analysis: {result.reason}")
            self.roll_back_now(rollout, f"analysis: {result.reason}")
            raise AirflowFailException(f"analysis FAIL: {result.reason}")
        if result.verdict is Verdict.INVALID and p.invalid == "rollback":
            decide("rollback", f"analysis: comparison invalid: {result.reason}")
            self.roll_back_now(rollout, f"analysis: comparison invalid: {result.reason}")
            raise AirflowFailException(f"analysis INVALID: {result.reason}")
        if self._extend(result, first_look):
            decide("extend", f"{result.verdict.value}, policy extend: looking again in {a.interval}: {result.reason}")
            look_again()
        return {"verdict": result.verdict.value, "reason": result.reason, "flags": result.flags}

    def _extend(self, result: AnalysisResult, first_look: float) -> bool:
        if not self.final or result.verdict is Verdict.PASS:
            return False
        p = self.spec.policies
        policy = p.invalid if result.verdict is Verdict.INVALID else p.inconclusive
        waited = time.time() - first_look + self.spec.analysis.interval.total_seconds()
        return policy == "extend" and waited <= p.max_extension.total_seconds()


class DecideOperator(RolloutTaskMixin, BaseBranchOperator):
    """Promote on PASS of the final analysis; otherwise apply the spec's policy."""

    def __init__(self, *, spec: dict[str, Any], final_analysis_task_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_data = spec
        self.final_analysis_task_id = final_analysis_task_id

    def choose_branch(self, context: Context) -> str:
        rollout = self.rollout(context)
        final = context["ti"].xcom_pull(task_ids=self.final_analysis_task_id) or {}
        verdict = Verdict(final.get("verdict", Verdict.INCONCLUSIVE.value))
        reason = final.get("reason", "no final analysis result")
        if verdict is Verdict.PASS:
            self.log.info("final analysis PASS: promote")
            return "promote"
        policy = self.spec.policies.invalid if verdict is Verdict.INVALID else self.spec.policies.inconclusive
        how = "policy extend: max_extension reached" if policy == "extend" else f"policy {policy}"
        why = f"final analysis {verdict.value} ({how}): {reason}"
        record_decision(
            self.engine,
            rollout_id=rollout.rollout_id,
            model=self.spec.model,
            stage=len(self.spec.stages),
            action="rollback",
            verdict=verdict,
            reason=why,
        )
        self.log.info(why)
        return "rollback"


class PromoteOperator(RolloutTaskMixin, BaseOperator):
    ui_color = "#ceead6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> None:
        rollout = self.rollout(context)
        lifecycle.promote(
            self.engine,
            self.router,
            self.spec,
            rollout,
            f"all {len(self.spec.stages)} stages healthy and final analysis PASS",
        )
        self.log.info("promoted %s: it now serves 100 %% of %s", rollout.canary_version, self.spec.model)


class RollbackOperator(RolloutTaskMixin, BaseOperator):
    """Canary to 0 %. Runs when anything upstream failed or the decision says so."""

    ui_color = "#fce8e6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("retries", 5)
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> str:
        rollout = self.rollout(context)
        with self.engine.connect() as conn:
            decided = last_decision(conn, rollout.rollout_id, "rollback")
        reason = decided.reason if decided else "an upstream task failed (see the Airflow run)"
        if decided is None:
            record_decision(
                self.engine,
                rollout_id=rollout.rollout_id,
                model=self.spec.model,
                stage=rollout.stage_reached or None,
                action="rollback",
                verdict=None,
                reason=reason,
            )
        lifecycle.rollback(self.engine, self.router, self.spec, rollout, reason)
        self.log.warning("rolled back %s to 0 %%: %s", rollout.canary_version, reason)
        return reason


class ReportOperator(RolloutTaskMixin, BaseOperator):
    """The last task, whatever happened: release the model's lock, log the report, and set the run's
    outcome. The run succeeds only when the candidate was promoted; a rollback (or a rollout that
    could not start) fails it, so Airflow's own alerting fires. No candidate at all skips cleanly.
    """

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> dict[str, Any]:
        rollout_id = rollout_id_of(context)
        with self.engine.connect() as conn:
            started = lifecycle.get_rollout(conn, rollout_id)
        if started is None:
            if not context["params"].get("candidate_version"):
                raise AirflowSkipException("no candidate version: nothing was rolled out")
            raise AirflowFailException("the rollout never started: see validate_and_lock")
        ended = lifecycle.release(self.engine, rollout_id, "ended without promotion or rollback")
        with self.engine.connect() as conn:
            report = rollout_report(conn, rollout_id)
        assert report is not None and ended is not None
        self.log.info("\n%s", format_report(report))
        if ended.status != "promoted":
            raise AirflowFailException(f"{ended.status.replace('_', ' ')}: {ended.reason}")
        return {"status": ended.status, "stage_reached": ended.stage_reached, "reason": ended.reason}
