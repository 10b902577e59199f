"""Operators of a rollout DAG. Each maps one task to the core: a step of :mod:`mlcanary.rollout`, or
the :class:`~mlcanary.lifecycle.Next` step the state machine chose, turned into return, defer,
skip or fail.

- A task of a rollout that ended, or lost its lock, changes nothing: it is skipped, and says why.
- A task of a rollout that is rolling back (or waits for a person) fails: the DAG goes no further.
- ``rollback`` and ``report`` are teardown tasks: they run however the run ends (failed, marked
  failed or success), and ``rollback`` needs nothing but the router (the versions come in XCom).
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, timedelta
from functools import cached_property
from typing import Any, NoReturn

from airflow.sdk import BaseOperator, Context
from airflow.sdk.bases.branch import BranchMixIn
from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy, RetryAction, RetryRule
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from sqlalchemy.engine import Engine

from mlcanary import progress, registry
from mlcanary import rollout as steps
from mlcanary.audit import last_decision, record_decision
from mlcanary.lifecycle import Action, Next, Status, Step, after_guardrails, after_look, describe, refusal
from mlcanary.mlflow_alias import promote_alias
from mlcanary.preflight import check_warehouse
from mlcanary.report import format_report, rollout_report
from mlcanary.routers.base import Router
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.schema import create_schema
from mlcanary.words import took
from mlcanary_airflow import snapshots
from mlcanary_airflow.hooks import WarehouseHook, mlflow_client, router_for
from mlcanary_airflow.links import RolloutReportLink
from mlcanary_airflow.notifiers import alert
from mlcanary_airflow.run_notes import RUN_NOTE, run_note
from mlcanary_airflow.triggers import GuardedWaitTrigger

BEGIN = "validate_and_lock"  # its XCom is the rollout's RolloutRef: what a rollback needs
PENDING = "mlcanary_rollback"  # XCom of a task that rolled back but could not record it (or why it rolled back)


NEXT_LOOK = "the next analysis look"


class Decided(SystemExit):
    """The task fails because of a decision (a rollback, a run that ends without promotion), not an
    error. Airflow 3.3 logs an ``AirflowFailException`` with its whole traceback ("Task failed with
    exception"); a ``SystemExit`` it logs as one line (``Task exited``), and :data:`DECIDED` (the
    tasks' retry policy) fails it at once, without retries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


DECIDED = ExceptionRetryPolicy(
    rules=[RetryRule(exception=Decided, action=RetryAction.FAIL, reason="a rollout decision, not an error: no retry")]
)


def fail_decided(log: Any, reason: str) -> NoReturn:
    """Fail the task on a decision with one readable log line (no traceback) and no retry."""
    log.error("mlcanary: %s", reason)
    raise Decided(reason)


def rollout_id_of(context: Context) -> str:
    return f"{context['dag'].dag_id}/{context['run_id']}"


class SpecTaskMixin:
    """A task of a spec's DAG: its spec (passed as data) and the warehouse."""

    spec_data: dict[str, Any]

    @cached_property
    def spec(self) -> RolloutSpec:
        return RolloutSpec.model_validate(self.spec_data)

    @cached_property
    def engine(self) -> Engine:
        return WarehouseHook(self.spec.warehouse.conn_id).get_engine()


class RolloutTaskMixin(SpecTaskMixin):
    """What every rollout task needs: its spec, the warehouse, the router and its rollout."""

    log: Any  # the operator's logger

    @cached_property
    def router(self) -> Router:
        return router_for(self.spec)

    def ref(self, context: Context) -> steps.RolloutRef:
        """The rollout's names and versions, from the start task's XCom: no warehouse needed."""
        started = context["ti"].xcom_pull(task_ids=BEGIN)
        if not started:
            raise AirflowSkipException("this run never started a rollout (see validate_and_lock)")
        return steps.RolloutRef.from_dict(started)

    def rollout(self, context: Context, action: Action = Action.LOOK) -> steps.Rollout:
        """The rollout's row, if it may still take ``action``: skip when it ended, fail when it may not."""
        with self.engine.connect() as conn:
            found = steps.get_rollout(conn, rollout_id_of(context))
        if found is None:
            raise AirflowSkipException("this run never started a rollout (see validate_and_lock)")
        why = refusal(found.status, found.holds_lock, action)
        if why:
            self.refuse(found, why)
        return found

    def refuse(self, rollout: steps.Rollout | None, why: str) -> NoReturn:
        """Nothing changes: skip if the rollout ended (a cleared task of a finished run), else fail."""
        self.log.warning("mlcanary: %s", why)
        if rollout is None or not rollout.holds_lock or rollout.status.ended:
            raise AirflowSkipException(f"{why}; nothing was changed")
        raise AirflowFailException(f"{why} ({rollout.reason or rollout.status}); nothing was changed")

    def decide(
        self,
        rollout: steps.RolloutRef,
        action: str,
        reason: str,
        stage: int | None,
        verdict: Verdict | None = None,
        key: str | None = None,
    ) -> None:
        """Record a decision in the audit table (once, with a ``key``)."""
        with self.engine.begin() as conn:
            record_decision(
                conn,
                rollout_id=rollout.rollout_id,
                model=self.spec.model,
                stage=stage,
                action=action,
                verdict=verdict,
                reason=reason,
                key=key,
            )

    def roll_back_now(self, context: Context, ref: steps.RolloutRef, reason: str) -> None:
        """Canary to 0 % from the task that decided it, before it fails: no waiting for the failure
        cascade. The ``rollback`` teardown still runs (with retries) and finishes what this began;
        records this task could not write (the warehouse is down) go to it in XCom."""
        try:
            done = steps.rollback(self.engine, self.router, ref, reason)
        except steps.StepRefused as why:
            self.log.warning("mlcanary: no rollback needed: %s", why)
        except Exception as exc:  # the rollback task retries; the decision must still be raised
            self.log.error("mlcanary: immediate rollback failed, the rollback task retries it: %s", exc)
            context["ti"].xcom_push(key=PENDING, value={"reason": reason})
        else:
            self.log.warning("mlcanary: rolled back: %s (%s)", reason, done.records.note)
            if not done.recorded:
                context["ti"].xcom_push(key=PENDING, value=done.records.to_dict())

    def stage_started_epoch(self, rollout: steps.RolloutRef, stage: int) -> float:
        """When the split moved to ``stage``; not recorded (the step's records were lost): now, which
        is later than the shift, never earlier."""
        with self.engine.connect() as conn:
            shifted = steps.stage_started_at(conn, rollout.rollout_id, stage)
        return time.time() if shifted is None else shifted.replace(tzinfo=UTC).timestamp()

    def watch(self, rollout: steps.RolloutRef, stage: int, waiting_for: str | None = None) -> dict[str, Any]:
        """The arguments of a trigger that watches ``stage``'s guardrails (and rolls back itself)."""
        return dict(
            spec=self.spec_data,
            rollout_id=rollout.rollout_id,
            stage=stage,
            baseline_version=rollout.baseline_version,
            canary_version=rollout.canary_version,
            stage_started_epoch=self.stage_started_epoch(rollout, stage),
            dry_run=rollout.dry_run,
            waiting_for=waiting_for,
        )

    def guarded_wait(
        self, rollout: steps.RolloutRef, stage: int, at_epoch: float, state: dict[str, Any]
    ) -> GuardedWaitTrigger:
        """A wait until ``at_epoch`` during which the guardrails keep watching ``stage``."""
        return GuardedWaitTrigger(at_epoch=at_epoch, state=state, **self.watch(rollout, stage, NEXT_LOOK))

    def rolled_back_by_trigger(self, context: Context, done: dict[str, Any] | None) -> bool:
        """Whether the guardrails' trigger already rolled back (see ``_GuardrailPolls._roll_back_now``);
        records it could not write go to the ``rollback`` teardown in XCom, as :meth:`roll_back_now`'s do."""
        if not done or done.get("error"):
            return False
        self.log.warning("mlcanary: rolled back from the triggerer: %s (%s)", done["reason"], done["note"])
        if done.get("pending"):
            context["ti"].xcom_push(key=PENDING, value=done["pending"])
        return True

    def stop(self, context: Context, ref: steps.RolloutRef, nxt: Next, done: dict[str, Any] | None = None) -> NoReturn:
        """The state machine said roll back: do it now (unless the trigger ``done`` it), then fail
        this task (no retries)."""
        if not self.rolled_back_by_trigger(context, done):
            self.roll_back_now(context, ref, nxt.reason)
        fail_decided(self.log, nxt.reason)


class BeginRolloutOperator(RolloutTaskMixin, BaseOperator):
    """Check the trigger's versions against what the router reports, take the model's lock, and
    keep the spec this rollout runs on. Nothing touches traffic before stage 1."""

    ui_color = "#e8f0fe"

    def __init__(
        self, *, spec: dict[str, Any], snapshot_dir: str, built_from: str | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("retries", 2)  # reading the router may fail for a moment
        kwargs.setdefault("retry_delay", timedelta(seconds=5))
        super().__init__(**kwargs)
        self.spec_data = spec
        self.snapshot_dir = snapshot_dir
        self.built_from = built_from  # the running rollout whose stored spec this DAG was built from

    def execute(self, context: Context) -> dict[str, Any]:
        if self.built_from is not None and self.built_from != rollout_id_of(context):
            self._stale_snapshot()
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
        self._preflight(params.get("baseline_version") or None)
        try:
            started = steps.begin_rollout(
                self.engine,
                self.router,
                self.spec,
                rollout_id_of(context),
                candidate,
                params.get("baseline_version") or None,
                bool(params.get("dry_run")),
                (params.get("force_reason") or "").strip() or None,
            )
        except steps.RolloutError as exc:
            raise AirflowFailException(str(exc)) from None
        try:
            snapshots.save(self.snapshot_dir, self.spec_data, started.rollout_id)
        except OSError as exc:  # without it an edited spec could strand the rollout: do not start
            steps.finish(self.engine, self.router, started.ref)
            raise AirflowFailException(
                f"cannot keep the spec this rollout runs on in {self.snapshot_dir} ({exc}): set "
                "MLCANARY_SNAPSHOT_DIR to a folder the DAG processor and the workers share. No traffic was changed."
            ) from None
        self.log.info(
            "rollout %s: %s → %s%s",
            started.rollout_id,
            started.baseline_version,
            started.canary_version,
            " (dry run)" if started.dry_run else "",
        )
        running = "running (dry run)" if started.dry_run else "running"
        context["ti"].xcom_push(key=RUN_NOTE, value=run_note(started.baseline_version, started.canary_version, running))
        return started.ref.to_dict()

    def _preflight(self, baseline: str | None) -> None:
        """The warehouse's pre-flight check (:mod:`mlcanary.preflight`) before any traffic moves: errors
        refuse the start with every reason, warnings go to the log."""
        if baseline is None:
            with contextlib.suppress(Exception):  # unreadable: begin_rollout says why, with its retries
                split = self.router.get_split(self.spec.model)
                baseline = split.baseline_version if split else None
        with self.engine.connect() as conn:
            found = check_warehouse(conn, self.spec, baseline)
        for warning in found.warnings:
            self.log.warning("mlcanary pre-flight: %s", warning.message)
        if found.errors:
            raise AirflowFailException(f"{found.summary()}\nNo traffic was changed.")

    def _stale_snapshot(self) -> None:
        """This DAG runs on the spec another rollout started with. While that rollout holds the lock the
        start is refused anyway; once it ended, its snapshot is left over (its run was deleted): remove
        it, so the next parse builds the DAG from the YAML again, and refuse this start."""
        with self.engine.connect() as conn:
            holder = steps.get_rollout(conn, self.built_from or "")
        if holder is not None and holder.holds_lock:
            return
        snapshots.remove(self.snapshot_dir, self.spec.name, self.built_from)
        raise AirflowFailException(
            f"this DAG was built from the spec rollout {self.built_from} started with, and that rollout has ended: "
            "its snapshot is removed now; trigger again once the DAG is parsed from the spec file (about a minute)"
        )


class ShiftTrafficOperator(RolloutTaskMixin, BaseOperator):
    """Move the canary to the stage's share: only this rollout's own split, idempotent, read back."""

    ui_color = "#fff4e5"

    def __init__(self, *, spec: dict[str, Any], stage: int, **kwargs: Any) -> None:
        retries = RolloutSpec.model_validate(spec).retries
        kwargs.setdefault("retries", retries.traffic)
        kwargs.setdefault("retry_delay", retries.delay)
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage

    def execute(self, context: Context) -> float:
        rollout = self.rollout(context, Action.SHIFT)
        try:
            split = steps.shift_to_stage(self.engine, self.router, self.spec, rollout.ref, self.stage)
        except steps.StepRefused as why:
            self.refuse(rollout, str(why))
        self.log.info(
            "stage %d: split in force: %s %g %%, %s %g %% (canary)",
            self.stage,
            split.baseline_version,
            100 - split.canary_percent,
            split.canary_version,
            split.canary_percent,
        )
        return split.canary_percent


class AnalysisOperator(RolloutTaskMixin, BaseOperator):
    """The stage's gate look after the bake: slow ML analysis of the label-complete window so far,
    then the state machine's next step (:func:`mlcanary.lifecycle.after_look`): proceed, look again
    after one analysis interval (a confirmation of a FAIL, an extension, or a stage that must PASS
    to advance), or roll back. A failing streak of the bake's background looks goes on here."""

    ui_color = "#e6f4ea"
    operator_extra_links = (RolloutReportLink(),)

    def __init__(
        self, *, spec: dict[str, Any], stage: int, final: bool, guardrails_task_id: str | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("retries", 2)
        kwargs.setdefault("retry_policy", DECIDED)
        kwargs.setdefault("retry_delay", timedelta(seconds=10))
        super().__init__(**kwargs)
        self.spec_data = spec
        self.stage = stage
        self.final = final
        self.guardrails_task_id = guardrails_task_id  # its background looks' failing streak goes on here

    def policy(self, verdict: Verdict) -> str:
        """The spec's policy for an INCONCLUSIVE or INVALID verdict."""
        return self.spec.policies.for_verdict(invalid=verdict is Verdict.INVALID)

    def execute(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if event and event.get("guardrails"):  # the guardrails ended the wait for this look (and rolled back)
            g = event["guardrails"]
            why = f"{g['reason']} (while waiting for {NEXT_LOOK})"
            self.stop(
                context, self.ref(context), after_guardrails(g["status"], why, self.stage), event.get("rolled_back")
            )
        rollout = self.rollout(context, Action.LOOK)  # a rollout rolling back goes no further
        wait = f"analysis:{self.task_id}"
        if event is None:  # a first look, or a retry after a worker died: go on from the last saved look
            with self.engine.connect() as conn:
                event = progress.load(conn, rollout.rollout_id, wait)
        state = event or {}  # what the previous look handed over (see GuardedWaitTrigger)
        first_look: float = state.get("first_look") or time.time()
        fails: int = state["fails"] if "fails" in state else self._background_fails(context)
        look: int = state.get("look", 0) + 1
        result = steps.look(self.engine, self.spec, rollout.ref, self.stage)
        log_look(self.log, self.stage, look, result)
        a = self.spec.analysis
        nxt = after_look(
            result.verdict,
            result.reason,
            final=self.final,
            policy=self.policy(result.verdict),
            fails=fails,
            consecutive_fails=a.consecutive_fails,
            waited=timedelta(seconds=time.time() - first_look),
            interval=a.interval,
            max_extension=self.spec.policies.max_extension,
            advance_on=a.advance_on,
        )
        match nxt.step:
            case Step.ROLL_BACK:
                self.stop(context, rollout.ref, nxt)  # fails the task
            case Step.LOOK_AGAIN:  # waits in the triggerer; the next look is this method again
                key = f"{nxt.action}:{self.task_id}:{look}"
                self.decide(rollout, nxt.action, nxt.reason, self.stage, result.verdict, key=key)
                confirmed = fails + 1 if nxt.action == "confirm" else 0
                handover = {"first_look": first_look, "fails": confirmed, "look": look}
                with self.engine.begin() as conn:
                    progress.save(conn, rollout.rollout_id, wait, handover)
                at = time.time() + a.interval.total_seconds()
                self.defer(trigger=self.guarded_wait(rollout, self.stage, at, handover), method_name="execute")
        with self.engine.begin() as conn:
            progress.clear(conn, rollout.rollout_id, wait)
        if result.verdict is not Verdict.PASS and nxt.step is Step.PROCEED:  # visibly not a PASS
            self.log.warning(
                "stage %d advances on %s, not PASS (analysis.advance_on: %s): %s",
                self.stage,
                result.verdict.value,
                a.advance_on,
                result.reason,
            )
        return {
            "verdict": result.verdict.value,
            "reason": result.reason,
            "flags": result.flags,
            "checks": evidence(result.checks),
        }

    def _background_fails(self, context: Context) -> int:
        """The failing streak of the looks the guardrails' trigger took during the bake."""
        if self.guardrails_task_id is None:
            return 0
        baked = context["ti"].xcom_pull(task_ids=self.guardrails_task_id) or {}
        return int(baked.get("look_fails", 0))


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
        result = super().execute(context, event)  # defers between looks; fails on FAIL
        if result["verdict"] == Verdict.PASS.value:
            return self.do_branch(context, self.promote_task_id)
        reason = (
            f"extended analysis still {result['verdict']} after {took(self.spec.policies.max_extension)}: "
            f"{result['reason']}"
        )
        self.roll_back_now(context, self.ref(context), reason)
        return self.do_branch(context, None)  # skip the promotion: the rollback is done


class PromoteOperator(RolloutTaskMixin, BaseOperator):
    ui_color = "#ceead6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        retries = RolloutSpec.model_validate(spec).retries
        kwargs.setdefault("retries", retries.traffic)
        kwargs.setdefault("retry_delay", retries.delay)
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> str:
        rollout = self.rollout(context, Action.FINISH)
        with self.engine.connect() as conn:
            decided = last_decision(conn, rollout.rollout_id, "promote_chosen")
        reason = decided.reason if decided else f"all {len(self.spec.stages)} stages healthy and final analysis PASS"
        verdict = None if decided else Verdict.PASS  # a person's choice is not a verdict
        if rollout.status is not Status.PROMOTED:  # a retry after the switch goes on with the registry steps
            try:
                steps.promote(self.engine, self.router, rollout.ref, reason, verdict=verdict)
            except steps.StepRefused as why:
                self.refuse(rollout, str(why))
        self.log.info("promoted %s: it now serves 100 %% of %s", rollout.canary_version, self.spec.model)
        mlflow = self.spec.registry.mlflow
        if mlflow is not None and not rollout.dry_run:
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
    """Teardown: the canary to 0 % unless the candidate was promoted, however the run ended.

    It calls the router first, with the versions from ``validate_and_lock``'s XCom, so it works when
    the warehouse is down; its records follow, and if the warehouse stays down they are handed to
    ``report`` in XCom. A rollout that ended (a cleared task of a finished run) changes nothing.
    """

    ui_color = "#fce8e6"

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        retries = RolloutSpec.model_validate(spec).retries
        kwargs.setdefault("retries", retries.rollback)
        kwargs.setdefault("retry_delay", retries.delay)
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> dict[str, Any]:
        ref = self.ref(context)
        earlier = self._earlier(context)
        reason = self._reason(context, ref, earlier)
        try:
            done = steps.rollback(self.engine, self.router, ref, reason)
        except steps.StepRefused as why:
            self.log.info("mlcanary: %s", why)
            raise AirflowSkipException(f"{why}; nothing was changed") from None
        self.log.warning("rolled back %s: %s (%s)", ref.canary_version, reason, done.records.note)
        result = {"reason": done.records.reason, "split": describe(done.split), "recorded": done.recorded}
        if not done.recorded:
            self.log.error(
                "mlcanary: the canary is at 0 %% (read back), but the records could not be written (%s); "
                "report writes them when the warehouse answers",
                done.record_error,
            )
            # the attempt that changed the split knows where it came from; a confirmation does not
            records = earlier if earlier and "note" in earlier and not done.records.applied else done.records.to_dict()
            result["pending"] = records
        return result

    def _earlier(self, context: Context) -> dict[str, Any] | None:
        """What a task that rolled back before this one could not record (the warehouse was down)."""
        found = context["ti"].xcom_pull(task_ids=[t for t in self.dag.task_ids if t != self.task_id], key=PENDING)
        earlier = [x for x in (found if isinstance(found, list) else [found]) if x]
        return dict(earlier[0]) if earlier else None

    def _reason(self, context: Context, ref: steps.RolloutRef, earlier: dict[str, Any] | None) -> str:
        """The decision's reason: from the warehouse, else from the task that decided it, else what the
        run's task states say."""
        try:
            with self.engine.connect() as conn:
                decided = last_decision(conn, ref.rollout_id, "rollback")
            if decided is not None:
                return str(decided.reason)
        except Exception as exc:  # the warehouse is down: the rollback goes on without it
            self.log.warning("mlcanary: the warehouse cannot be read (%s): rolling back on the router alone", exc)
        if earlier:
            return str(earlier["reason"])
        try:
            states = context["ti"].get_task_states(dag_id=context["dag"].dag_id, run_ids=[context["run_id"]])
            tasks = states.get(context["run_id"], {})
        except Exception:  # dag.test() and older task runners: the generic reason will do
            tasks = {}
        failed = sorted(t for t, s in tasks.items() if s == "failed" and t != self.task_id)
        if failed:
            return f"the run ended without promotion: {', '.join(failed)} failed (or the run was stopped)"
        return "the run ended without promotion (it was stopped, or a task did not finish)"


class ReportOperator(RolloutTaskMixin, BaseOperator):
    """Teardown, last: write records the rollback could not, read the final split back and record it,
    release the lock only if the split is what the outcome says, and set the run's outcome: success
    only when the candidate was promoted. A split that is not safe keeps the lock (``rollback_failed``
    or ``split_mismatch``), alerts every channel and fails the run.
    """

    operator_extra_links = (RolloutReportLink(),)

    def __init__(self, *, spec: dict[str, Any], snapshot_dir: str, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 3)  # the warehouse may be restarting
        kwargs.setdefault("retry_policy", DECIDED)
        kwargs.setdefault("retry_delay", 2 * RolloutSpec.model_validate(spec).retries.delay)
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)
        self.spec_data = spec
        self.snapshot_dir = snapshot_dir

    def execute(self, context: Context) -> dict[str, Any]:
        ref = self.ref(context)
        pending = (context["ti"].xcom_pull(task_ids="rollback") or {}).get("pending")
        if pending:
            steps.record_rollback(self.engine, ref, steps.RollbackRecords.from_dict(pending))
        ended = steps.finish(self.engine, self.router, ref)
        if ended.released or not ended.rollout.holds_lock:
            snapshots.remove(self.snapshot_dir, self.spec.name, ref.rollout_id)
        with self.engine.connect() as conn:
            report = rollout_report(conn, ref.rollout_id)
        if report is not None:
            self.log.info("\n%s", format_report(report))
        status = ended.rollout.status
        outcome = outcome_line(ended.rollout, len(self.spec.stages))
        context["ti"].xcom_push(key=RUN_NOTE, value=run_note(ref.baseline_version, ref.canary_version, outcome))
        if ended.state.problem:
            alert(self.spec, context, status.value, ended.state.problem, ref.rollout_id)
            fail_decided(
                self.log,
                f"{status}: {ended.state.problem}. The model stays locked: check the router, then "
                f"`mlcanary abort --rollout {ref.rollout_id} --reason ...`",
            )
        if status is not Status.PROMOTED:  # the run ends failed, so Airflow's alerting fires: one line, no traceback
            fail_decided(self.log, outcome)
        self.log.info("mlcanary: %s", outcome)
        return {"status": status.value, "stage_reached": ended.rollout.stage_reached, "reason": ended.rollout.reason}


def outcome_line(rollout: steps.Rollout, stages: int) -> str:
    """How a rollout ended, in one line: ``rolled back at stage 2: guardrails stage 2 breach: ...``."""
    status = str(rollout.status).replace("_", " ")
    if rollout.status is Status.PROMOTED:
        where = f"after {rollout.stage_reached} of {stages} stages"
    else:
        where = f"at stage {rollout.stage_reached}" if rollout.stage_reached else "before stage 1"
    reason = " ".join(str(rollout.reason or "").split())  # one line
    return f"{status} {where}: {reason}" if reason else f"{status} {where}"


def evidence(checks: list[Any], most: int = 8) -> list[str]:
    """The checks that decided, for a person (the approval question): the ones that did not pass
    first, one short line each."""
    ordered = sorted(checks, key=lambda c: c.verdict is Verdict.PASS)
    lines = [f"{c.verdict.value}: {' '.join(c.reason.split())}"[:240] for c in ordered[:most]]
    if len(checks) > most:
        lines.append(f"... and {len(checks) - most} more checks (see the report)")
    return lines


def log_look(log: Any, stage: int, look: int, result: Any) -> None:
    """An analysis look in the task log, one check per line: a PASS at info, anything else at warning
    level (Airflow shows it in yellow), so an INCONCLUSIVE that lets a stage advance stands out."""
    level = log.info if result.verdict is Verdict.PASS else log.warning
    level("stage %d analysis look %d: %s", stage, look, result.verdict.value)
    for c in result.checks:
        (log.info if c.verdict is Verdict.PASS else log.warning)("  %-12s %s", c.verdict.value, c.reason)
    for flag in result.flags:
        log.warning("stage %d: %s", stage, flag)
