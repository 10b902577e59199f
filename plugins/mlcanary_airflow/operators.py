"""Operators of a rollout DAG. Each maps one task to one call of the core library."""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.bases.branch import BranchMixIn
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from sqlalchemy.engine import Engine

from mlcanary import registry
from mlcanary import rollout as lifecycle
from mlcanary.analysis import AnalysisResult, AnalysisWindow, analyze
from mlcanary.audit import last_decision, record_checks, record_decision
from mlcanary.mlflow_alias import promote_alias
from mlcanary.report import format_report, rollout_report
from mlcanary.rollout import Rollout, RolloutError
from mlcanary.routers.base import Router
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import create_schema
from mlcanary_airflow.hooks import WarehouseHook, mlflow_client, router_for
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

    def decide(
        self, rollout: Rollout, action: str, reason: str, stage: int | None, verdict: Verdict | None = None
    ) -> None:
        """Record a decision about this rollout in the audit table."""
        record_decision(
            self.engine,
            rollout_id=rollout.rollout_id,
            model=self.spec.model,
            stage=stage,
            action=action,
            verdict=verdict,
            reason=reason,
        )

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
        create_schema(self.engine, contract=False)
        if not candidate:  # a scheduled run: the newest candidate in the registry, if there is one
            with self.engine.connect() as conn:
                found = registry.next_candidate(conn, self.spec.model)
            if found is None:
                raise AirflowSkipException(
                    f"no new candidate for {self.spec.model} in the registry: nothing to roll out"
                )
            candidate = found.version
            self.log.info("candidate %s from the registry (registered %s)", candidate, found.registered_at)
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
        a = self.spec.analysis

        def decide(action: str, reason: str) -> None:
            self.decide(rollout, action, reason, self.stage, result.verdict)

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
        if result.verdict is Verdict.INVALID and self.policy(result.verdict) == "rollback":
            decide("rollback", f"analysis: comparison invalid: {result.reason}")
            self.roll_back_now(rollout, f"analysis: comparison invalid: {result.reason}")
            raise AirflowFailException(f"analysis INVALID: {result.reason}")
        if self._extend(result, first_look):
            decide("extend", f"{result.verdict.value}, policy extend: looking again in {a.interval}: {result.reason}")
            look_again()
        return {"verdict": result.verdict.value, "reason": result.reason, "flags": result.flags}

    def policy(self, verdict: Verdict) -> str:
        """The spec's policy for an INCONCLUSIVE or INVALID verdict."""
        return self.spec.policies.for_verdict(invalid=verdict is Verdict.INVALID)

    def _extend(self, result: AnalysisResult, first_look: float) -> bool:
        if not self.final or result.verdict is Verdict.PASS:
            return False
        waited = time.time() - first_look + self.spec.analysis.interval.total_seconds()
        return self.policy(result.verdict) == "extend" and waited <= self.spec.policies.max_extension.total_seconds()


class ExtendOperator(AnalysisOperator, BranchMixIn):
    """A person chose Extend: look again every analysis interval until the verdict is PASS or FAIL or
    ``policies.max_extension`` has passed; then promote on PASS, else roll back."""

    inherits_from_skipmixin = True

    def __init__(self, *, spec: dict[str, Any], promote_task_id: str, **kwargs: Any) -> None:
        super().__init__(spec=spec, stage=len(RolloutSpec.model_validate(spec).stages), final=True, **kwargs)
        self.promote_task_id = promote_task_id

    def policy(self, verdict: Verdict) -> str:
        return "extend"

    def execute(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        result = super().execute(context, event)  # defers between looks; raises on FAIL
        if result["verdict"] == Verdict.PASS.value:
            return self.do_branch(context, self.promote_task_id)
        rollout = self.rollout(context)
        reason = (
            f"extended analysis still {result['verdict']} after {self.spec.policies.max_extension}: {result['reason']}"
        )
        self.decide(rollout, "rollback", reason, self.stage, Verdict(result["verdict"]))
        return self.do_branch(context, None)  # skip the promotion: the rollback task acts


class PromoteOperator(RolloutTaskMixin, BaseOperator):
    ui_color = "#ceead6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> str:
        rollout = self.rollout(context)
        with self.engine.connect() as conn:
            decided = last_decision(conn, rollout.rollout_id, "promote_chosen")
        reason = decided.reason if decided else f"all {len(self.spec.stages)} stages healthy and final analysis PASS"
        lifecycle.promote(self.engine, self.router, self.spec, rollout, reason)
        self.log.info("promoted %s: it now serves 100 %% of %s", rollout.canary_version, self.spec.model)
        mlflow = self.spec.registry.mlflow
        if mlflow is not None:
            previous = promote_alias(
                mlflow_client(mlflow.conn_id),
                mlflow.registered_model,
                mlflow.alias,
                rollout.canary_version,
                mlflow.version,
            )
            self.log.info(
                "MLflow: %s@%s -> %s (was %s)", mlflow.registered_model, mlflow.alias, rollout.canary_version, previous
            )
        return reason


class RollbackOperator(RolloutTaskMixin, BaseOperator):
    """Canary to 0 % unless the candidate was promoted. It runs last, whatever happened upstream
    (ALL_DONE): after a breach, a failed task, a decision to roll back, or a failed promotion."""

    ui_color = "#fce8e6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("retries", 5)
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> str:
        rollout = self.rollout(context)
        if rollout.status == "promoted":
            raise AirflowSkipException(f"{rollout.canary_version} was promoted: nothing to roll back")
        with self.engine.connect() as conn:
            decided = last_decision(conn, rollout.rollout_id, "rollback")
        reason = decided.reason if decided else "an upstream task failed (see the Airflow run)"
        if decided is None:
            self.decide(rollout, "rollback", reason, rollout.stage_reached or None)
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
        assert ended is not None
        final = lifecycle.record_final_split(self.engine, self.router, ended)
        expected = 100.0 if ended.status == "promoted" else 0.0
        if not ended.dry_run and (final is None or final.share(ended.canary_version) != expected):
            self.log.error(
                "mlcanary: the split in force is not the one this rollout ended with (%s: canary at %g %%); "
                "check the router: %s",
                ended.status,
                expected,
                final,
            )
        with self.engine.connect() as conn:
            report = rollout_report(conn, rollout_id)
        assert report is not None
        self.log.info("\n%s", format_report(report))
        if ended.status != "promoted":
            raise AirflowFailException(f"{ended.status.replace('_', ' ')}: {ended.reason}")
        return {"status": ended.status, "stage_reached": ended.stage_reached, "reason": ended.reason}
