"""People in the loop, with Airflow's human-in-the-loop operators (answered in the UI's Required
Actions or through the REST API). The task waits deferred while the guardrails keep polling the
stage in force: a breach rolls back at once and closes the question.

- :class:`ApproveFinalStageOperator`: Approve / Reject before the last traffic step (spec ``approval``).
- :class:`DecideOperator`: after the last stage, promote on PASS; otherwise the spec's policy: roll back,
  or ask a person Promote / Extend / Roll back (``policies.*: ask``).

No answer within the timeout takes the safe default: Reject, Roll back. Every answer is recorded in
the decisions table with who gave it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLBranchOperator, HITLOperator
from airflow.sdk import Context
from airflow.sdk.bases.notifier import BaseNotifier
from airflow.sdk.exceptions import TaskAwaitingInput

from mlcanary.escape import markdown_text
from mlcanary.lifecycle import Action, Step, after_guardrails, final_decision
from mlcanary.rollout import RolloutRef
from mlcanary.spec import RolloutSpec
from mlcanary.verdict import Verdict
from mlcanary.words import took
from mlcanary_airflow.links import report_url
from mlcanary_airflow.operators import RolloutTaskMixin
from mlcanary_airflow.triggers import GuardedHITLTrigger

PROMOTE, EXTEND, ROLL_BACK = "Promote", "Extend", "Roll back"


def _who(event: dict[str, Any], timeout: Any) -> str:
    user = event.get("responded_by_user")
    if user:
        return f"by {user.get('name') or user.get('id')}" if isinstance(user, dict) else f"by {user}"
    return f"by default: no answer within {took(timeout)}"


def question_body(what: str, candidate: str, baseline: str, evidence: list[str], choices: str, link: str) -> str:
    """The question's Markdown: who is compared, the checks that decided (a short list), what each
    answer does, and the report. Text from the data is escaped (a segment value is shown as typed)."""
    lines = "\n".join(f"- {markdown_text(e)}" for e in evidence) or "- (no checks recorded)"
    return (
        f"**Candidate `{candidate}`** against **baseline `{baseline}`**: {what}\n\n"
        f"Evidence:\n\n{lines}\n\n{choices}\n\n[Rollout report]({link})"
    )


def _assignees(spec: RolloutSpec) -> list[dict[str, str]] | None:
    return [{"id": u, "name": u} for u in spec.approval.assignees] or None


class GuardedQuestion(RolloutTaskMixin):
    """Ask the question while the guardrails keep watching the stage in force
    (:class:`~mlcanary_airflow.triggers.GuardedHITLTrigger`), instead of Airflow 3.3's unwatched
    ``awaiting_input``: the task defers, and the question is listed under Required Actions."""

    def ask(self, context: Context, rollout: RolloutRef, stage: int, reject: str, waiting_for: str) -> Any:
        op: Any = self  # a HITLOperator
        if stage < 1:  # before the first stage (a one-stage rollout's approval): no canary traffic to watch
            return HITLOperator.execute(op, context)
        try:  # Airflow's own first half: the request written, the notifiers called, the timeout set
            return HITLOperator.execute(op, context)
        except TaskAwaitingInput:  # ... then, instead of its unwatched awaiting_input, a watched deferral
            pass
        timeout = op.hitl_summary_extra["timeout_datetime"]
        hitl = dict(
            ti_id=context["task_instance"].id,
            options=op.options,
            defaults=op.defaults,
            params=op.serialized_params,
            multiple=op.multiple,
            timeout_datetime=None if timeout is None else datetime.fromisoformat(timeout),
            poke_interval=min(5.0, self.spec.guardrails.interval.total_seconds()),
        )
        op.defer(
            trigger=GuardedHITLTrigger(
                hitl=hitl,
                reject=reject,
                **self.watch(rollout, stage, waiting_for),
            ),
            method_name="execute_complete",
        )
        raise AssertionError("defer() raises")

    def breach(self, context: Context, ref: RolloutRef, event: dict[str, Any], stage: int, waiting_for: str) -> bool:
        """If the guardrails ended the question: the canary at 0 % (the trigger did it, or now)."""
        g = event.get("guardrails")
        if not g:
            return False
        reason = after_guardrails(g["status"], f"{g['reason']} (while waiting for {waiting_for})", stage).reason
        if not self.rolled_back_by_trigger(context, event.get("rolled_back")):
            self.roll_back_now(context, ref, reason)
        return True


APPROVAL, DECISION = "approval of the final stage", "a person's decision"


class ApproveFinalStageOperator(GuardedQuestion, ApprovalOperator):
    """Ask a person before the final stage; Reject (or no answer in time) rolls the canary back."""

    def __init__(self, *, spec: dict[str, Any], notifiers: list[BaseNotifier] | None = None, **kwargs: Any) -> None:
        parsed = RolloutSpec.model_validate(spec)
        final = parsed.stages[-1]
        super().__init__(
            subject=f"Roll {parsed.model} out to {final.percent:g} % (the final stage)?",
            body=(  # replaced at run time by one that names the versions and shows the evidence
                f"The candidate passed stages 1 to {len(parsed.stages) - 1} of `{parsed.dag_id}`. "
                f"Approve to move it to {final.percent:g} % for {took(final.bake)}; Reject rolls it "
                f"back to 0 %. No answer within {took(parsed.approval.timeout)} rejects."
            ),
            defaults=[ApprovalOperator.REJECT],
            response_timeout=parsed.approval.timeout,
            assigned_users=_assignees(parsed),
            notifiers=notifiers,
            **kwargs,
        )
        self.spec_data = spec

    def execute(self, context: Context) -> Any:
        rollout = self.rollout(context, Action.LOOK)  # skips when the rollout never started or ended
        stage = len(self.spec.stages) - 1
        self.decide(rollout, "ask", "waiting for approval of the final stage", stage, key="ask:approval")
        final, passed = self.spec.stages[-1], context["ti"].xcom_pull(task_ids=f"stage_{stage}.analysis") or {}
        self.subject = f"Roll {self.spec.model} {rollout.canary_version} out to {final.percent:g} % (the final stage)?"
        self.body = question_body(
            f"it passed stages 1 to {stage}; the last analysis is {passed.get('verdict', 'not recorded')}.",
            rollout.canary_version,
            rollout.baseline_version,
            passed.get("checks") or ([passed["reason"]] if passed.get("reason") else []),
            f"Approve moves it to {final.percent:g} % for {took(final.bake)}; Reject rolls it back to "
            f"0 %. No answer within {took(self.spec.approval.timeout)} rejects.",
            report_url(context["dag"].dag_id, context["run_id"]),
        )
        return self.ask(context, rollout, stage, ApprovalOperator.REJECT, APPROVAL)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        # Record first: on Reject the base class skips the final stage by raising (Airflow 3's skip).
        ref = self.ref(context)
        stage = len(self.spec.stages) - 1
        if "error" not in event and not self.breach(context, ref, event, stage, APPROVAL):
            who = _who(event, self.spec.approval.timeout)
            if event["chosen_options"] == [ApprovalOperator.APPROVE]:
                self.decide(ref, "approve", f"final stage approved {who}", stage, key="approve")
            else:
                self.roll_back_now(context, ref, f"final stage not approved: Reject {who}")
        return super().execute_complete(context, event)


class DecideOperator(GuardedQuestion, HITLBranchOperator):
    """Promote on a final PASS. Otherwise apply the policy for the verdict: ``rollback`` (or an
    ``extend`` that ran out) skips the promotion so the rollback task acts; ``ask`` waits for a person."""

    def __init__(
        self,
        *,
        spec: dict[str, Any],
        final_analysis_task_id: str,
        promote_task_id: str = "promote",
        extend_task_id: str | None = None,
        notifiers: list[BaseNotifier] | None = None,
        **kwargs: Any,
    ) -> None:
        parsed = RolloutSpec.model_validate(spec)
        options = [PROMOTE, EXTEND, ROLL_BACK] if extend_task_id else [PROMOTE, ROLL_BACK]
        super().__init__(
            subject=f"Promote the candidate of {parsed.model}?",
            body="The final analysis was not conclusive.",  # replaced by the analysis' reason at run time
            options=options,
            defaults=[ROLL_BACK],
            response_timeout=parsed.policies.ask_timeout,
            assigned_users=_assignees(parsed),
            notifiers=notifiers,
            options_mapping={PROMOTE: promote_task_id} | ({EXTEND: extend_task_id} if extend_task_id else {}),
            **kwargs,
        )
        self.spec_data = spec
        self.final_analysis_task_id = final_analysis_task_id
        self.promote_task_id = promote_task_id

    def execute(self, context: Context) -> Any:
        rollout = self.rollout(context, Action.LOOK)
        final = context["ti"].xcom_pull(task_ids=self.final_analysis_task_id) or {}
        verdict = Verdict(final.get("verdict", Verdict.INCONCLUSIVE.value))
        p = self.spec.policies
        nxt = final_decision(
            verdict, final.get("reason", "no final analysis result"), p.for_verdict(invalid=verdict is Verdict.INVALID)
        )
        stage = len(self.spec.stages)
        match nxt.step:
            case Step.PROMOTE:
                self.log.info(nxt.reason)
                return self.do_branch(context, self.promote_task_id)
            case Step.ASK:
                self.decide(rollout, "ask", nxt.reason, stage, verdict, key="ask:decide")
                self.subject = (
                    f"Promote {self.spec.model} {rollout.canary_version}? The final analysis is {verdict.value}"
                )
                extend = "Extend looks again (then decided automatically), " if EXTEND in self.options else ""
                self.body = question_body(
                    f"the final analysis is **{verdict.value}**.",
                    rollout.canary_version,
                    rollout.baseline_version,
                    final.get("checks") or [str(final.get("reason"))],
                    f"Promote makes it serve 100 %, {extend}Roll back takes it to 0 %. "
                    f"No answer within {took(p.ask_timeout)} rolls back.",
                    report_url(context["dag"].dag_id, context["run_id"]),
                )
                return self.ask(context, rollout, stage, ROLL_BACK, DECISION)  # defers, watched by the guardrails
        self.log.info(nxt.reason)
        self.roll_back_now(context, rollout.ref, nxt.reason)
        return self.do_branch(context, None)  # skip the promotion: the rollback is done

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        result = HITLOperator.execute_complete(self, context, event)
        ref = self.ref(context)
        choice = result["chosen_options"][0]
        who = f"{choice} chosen {_who(result, self.spec.policies.ask_timeout)}"
        stage = len(self.spec.stages)
        if choice == ROLL_BACK:
            if not self.breach(context, ref, event, stage, DECISION):
                self.roll_back_now(context, ref, who)
            return self.do_branch(context, None)
        self.decide(ref, {PROMOTE: "promote_chosen", EXTEND: "extend"}[choice], who, stage, key=f"answer:{choice}")
        return self.do_branch(context, self.options_mapping.get(choice))
