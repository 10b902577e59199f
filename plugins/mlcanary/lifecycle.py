"""A rollout's life as a small state machine: its states, what each state allows, whose split a step
may change, and the next step after each piece of evidence.

Pure functions, no database and no Airflow. :mod:`mlcanary.rollout` carries out the traffic steps they
allow; the operators map a :class:`Next` to defer, fail, skip or return.

::

    running ──(a rollback is decided)──► rolling_back ──(canary at 0 %, read back)──► rolled_back ─► released
       │  └────────────────────────(canary at 0 %, read back)─────────────────────────┘
       └──(candidate at 100 %, read back)──► promoted ─► released
    running / rolling_back ──(the final split still gives the canary traffic, or is unknown)──► rollback_failed
    promoted ──(the final split is not the candidate's, or is unknown)──► split_mismatch
    rollback_failed / split_mismatch ──(rolled back and read back: a retry, the watchdog, mlcanary abort)──► rolled_back

A rollout holds its model's lock from its start until it is released, and only a rollout that
holds the lock changes traffic. ``rollback_failed`` and ``split_mismatch`` keep the lock: the next
rollout of that model is refused until the split is known to be safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from mlcanary.routers.base import Split
from mlcanary.verdict import Verdict
from mlcanary.words import took


class Status(StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"  # a rollback is decided; only the rollback may still change traffic
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"
    ROLLBACK_FAILED = "rollback_failed"  # the canary may still have traffic: locked, everyone alerted
    SPLIT_MISMATCH = "split_mismatch"  # promoted, but the platform reports another split: locked
    FAILED = "failed"  # rows written before this state machine: ended without a decision

    @property
    def ended(self) -> bool:
        return self in (Status.ROLLED_BACK, Status.PROMOTED, Status.FAILED)

    @property
    def needs_a_person(self) -> bool:
        return self in (Status.ROLLBACK_FAILED, Status.SPLIT_MISMATCH)


class Action(StrEnum):
    SHIFT = "shift traffic"
    LOOK = "keep watching"  # a guardrail bake, an analysis look, a question to a person
    PROMOTE = "promote"
    ROLL_BACK = "roll back"
    FINISH = "finish"  # read the final split back, release the lock if it is safe


ALLOWED: dict[Status, frozenset[Action]] = {
    Status.RUNNING: frozenset(Action),
    Status.ROLLING_BACK: frozenset({Action.ROLL_BACK, Action.FINISH}),
    Status.ROLLBACK_FAILED: frozenset({Action.ROLL_BACK, Action.FINISH}),
    Status.SPLIT_MISMATCH: frozenset({Action.ROLL_BACK, Action.FINISH}),
    Status.ROLLED_BACK: frozenset({Action.ROLL_BACK, Action.FINISH}),  # until released: confirm it, or redo it
    Status.PROMOTED: frozenset({Action.FINISH}),
    Status.FAILED: frozenset(),
}


def refusal(status: Status, holds_lock: bool, action: Action) -> str | None:
    """Why a rollout in ``status`` may not take ``action`` (None: it may)."""
    if not holds_lock:
        return f"this rollout is {status} and no longer holds its model's lock: it may not {action}"
    if action not in ALLOWED[status]:
        return f"this rollout is {status}: it may not {action} any more"
    return None


def describe(split: Split | None) -> str:
    """``v1 90 %, v2 10 % (set by <rollout>)``: a split as the audit rows and messages show it."""
    if split is None:
        return "no split"
    canary = f", {split.canary_version} {split.canary_percent:g} %" if split.canary_version else ""
    owner = f" (set by {split.owner})" if split.owner else ""
    return f"{split.baseline_version} {split.share(split.baseline_version):g} %{canary}{owner}"


def serves_alone(split: Split | None, version: str) -> bool:
    """Whether ``version`` gets all the traffic under ``split``."""
    return split is not None and abs(split.share(version) - 100.0) < 0.01


def start_refusal(current: Split | None, canary: str, baseline: str | None) -> str | None:
    """Why a rollout of ``canary`` against ``baseline`` (None: whatever serves) may not start on ``current``.

    The baseline is the version serving when the rollout starts, and a leftover canary blocks a start.
    """
    if current is None:
        if baseline is None:
            return "the router reports no split for this model, so there is no baseline: pass baseline_version"
        return None
    if current.canary_version and current.canary_percent > 0:
        left = f"left by {current.owner}" if current.owner else "left by an unknown owner"
        return (
            f"a canary still has traffic: {describe(current)}, {left}; roll it back first "
            f"(mlcanary abort --rollout {current.owner or 'ID'} --reason ...)"
        )
    if baseline is not None and baseline != current.baseline_version:
        return (
            f"baseline {baseline} was asked for, but the router reports {current.baseline_version} serving "
            f"({describe(current)}): leave the baseline empty, or name the version that serves"
        )
    if canary == current.baseline_version:
        return f"the candidate {canary} already serves all the traffic"
    return None


def step_refusal(
    before: Split | None, rollout_id: str, baseline: str, canary: str, *, first: bool, last_percent: float = 0.0
) -> str | None:
    """Compare-and-set: why this rollout may not change ``before`` (None: it may).

    A rollout changes only the split it set (``before.owner`` is this rollout, with its two versions).
    Its first step may also start from its baseline serving alone, whoever set that split. A split of
    its own at 0 % while it last recorded ``last_percent`` > 0 was rolled back (by a trigger whose
    records were lost): no step brings that canary back.
    """
    if (
        before is not None
        and before.owner == rollout_id
        and {before.baseline_version, before.canary_version}
        <= {
            baseline,
            canary,
            None,
        }
    ):
        if last_percent > 0 and before.share(canary) == 0.0:
            return (
                f"the canary is at 0 % though this rollout last set {last_percent:g} %: it was rolled back "
                "(its records were lost); nothing is changed"
            )
        return None
    if first and (before is None or (before.baseline_version == baseline and serves_alone(before, baseline))):
        return None
    return f"the router reports {describe(before)}, which this rollout did not set: it changes nothing"


def rollback_refusal(before: Split | None, rollout_id: str, baseline: str, canary: str) -> str | None:
    """Why the canary of this rollout may not be set to 0 % over ``before`` (None: it may, or it is there).

    Rolling back never touches a split another rollout set, and never puts the baseline back once the
    candidate serves alone (it was promoted).
    """
    if before is None:
        return "the router reports no split for this model: there is no canary to roll back"
    if before.share(canary) == 0.0:
        return None  # nothing to do: the canary has no traffic
    if serves_alone(before, canary) and before.baseline_version == canary:
        return f"{canary} serves alone as the baseline (it was promoted): rolling back would put {baseline} back"
    if before.owner != rollout_id:
        return f"the router reports {describe(before)}, which this rollout did not set: it changes nothing"
    return None


@dataclass(frozen=True)
class FinalState:
    status: Status
    safe: bool  # the split is known and is what the outcome says: the lock may be released
    problem: str | None = None  # why not (for the alert)


def final_state(status: Status, split: Split | None, read_error: str | None, canary: str, dry_run: bool) -> FinalState:
    """What the split read back at the end means for a rollout in ``status``."""
    if dry_run:
        ended = status if status in (Status.PROMOTED, Status.ROLLED_BACK) else Status.ROLLED_BACK
        return FinalState(ended, True)
    if read_error is not None:
        problem = f"the final split could not be read ({read_error})"
        return FinalState(
            Status.SPLIT_MISMATCH if status is Status.PROMOTED else Status.ROLLBACK_FAILED, False, problem
        )
    share = 0.0 if split is None else split.share(canary)
    if status is Status.PROMOTED:
        if abs(share - 100.0) < 0.01:
            return FinalState(Status.PROMOTED, True)
        return FinalState(
            Status.SPLIT_MISMATCH, False, f"{canary} was promoted, but the platform reports {describe(split)}"
        )
    if share == 0.0:
        return FinalState(Status.ROLLED_BACK, True)
    return FinalState(Status.ROLLBACK_FAILED, False, f"the canary still has traffic: {describe(split)}")


def stale_reason(status: Status, run_state: str | None) -> str | None:
    """Why a rollout holding its lock must be finished by someone other than its own run (None: it
    need not). ``run_state`` is its Airflow run's state, None when the run is gone (deleted).

    A rollout whose run is queued or running is its own run's to finish; one that waits for a person
    (``rollback_failed``, ``split_mismatch``) was announced already and is left for ``mlcanary abort``.
    """
    if status.needs_a_person:
        return None
    if run_state is None:
        return "its Airflow run was deleted before the rollout finished"
    if run_state in ("success", "failed"):
        return f"its Airflow run ended ({run_state}) before the rollout finished"
    return None  # queued, running, or a state this version does not know: never act on a doubt


# --- the next step after each piece of evidence ------------------------------------------------


class Step(StrEnum):
    PROCEED = "proceed"  # this task is done; the DAG goes on
    LOOK_AGAIN = "look again"  # wait one analysis interval, then look again
    ROLL_BACK = "roll back"
    PROMOTE = "promote"
    ASK = "ask"  # a person chooses Promote, Extend or Roll back


@dataclass(frozen=True)
class Next:
    step: Step
    action: str  # the decision recorded in the audit table: advance, confirm, extend, rollback, promote, ask
    reason: str


def after_guardrails(status: str, reason: str, stage: int) -> Next:
    """A stage's watch ended ``healthy``, or with a breach, no data, errors, its deadline, or failing
    background analysis looks."""
    if status == "healthy":
        return Next(Step.PROCEED, "baked", f"stage {stage} healthy: {reason}")
    if status == "analysis_fail":  # the slow tier, looking in the background during the watch
        return Next(Step.ROLL_BACK, "rollback", f"analysis stage {stage}: {reason}")
    return Next(Step.ROLL_BACK, "rollback", f"guardrails stage {stage} {status}: {reason}")


def after_look(
    verdict: Verdict,
    reason: str,
    *,
    final: bool,
    policy: str,
    fails: int,
    consecutive_fails: int,
    waited: timedelta,
    interval: timedelta,
    max_extension: timedelta,
    advance_on: str = "pass_or_inconclusive",
) -> Next:
    """After one analysis look.

    - FAIL: look again until ``consecutive_fails`` looks in a row have failed, then roll back;
    - INVALID under the policy ``rollback``: roll back, at any stage;
    - at the last stage, INCONCLUSIVE (or INVALID) under ``extend``: look again while the extension
      (``waited`` since the first look, plus one more interval) stays within ``max_extension``;
    - at an earlier stage under ``advance_on: pass``, anything but PASS: look again the same way,
      and roll back once ``max_extension`` is spent;
    - otherwise proceed (at the last stage, the decision applies the policy).
    """
    if verdict is Verdict.FAIL:
        if fails + 1 < consecutive_fails:
            return Next(Step.LOOK_AGAIN, "confirm", f"failing look {fails + 1} of {consecutive_fails}: {reason}")
        return Next(Step.ROLL_BACK, "rollback", f"analysis: {reason}")
    if verdict is Verdict.INVALID and policy == "rollback":
        return Next(Step.ROLL_BACK, "rollback", f"analysis: comparison invalid: {reason}")
    more, again = waited + interval <= max_extension, f"looking again in {took(interval)}: {reason}"
    if final and verdict is not Verdict.PASS and policy == "extend" and more:
        return Next(Step.LOOK_AGAIN, "extend", f"{verdict.value}, policy extend: {again}")
    if not final and verdict is not Verdict.PASS and advance_on == "pass":
        if more:
            return Next(Step.LOOK_AGAIN, "extend", f"{verdict.value}, advance_on pass: {again}")
        still = f"still {verdict.value} after {took(max_extension)} (advance_on pass)"
        return Next(Step.ROLL_BACK, "rollback", f"analysis: {still}: {reason}")
    return Next(Step.PROCEED, "looked", reason)


def final_decision(verdict: Verdict, reason: str, policy: str) -> Next:
    """After the last stage: promote on PASS, else the spec's policy for the verdict."""
    if verdict is Verdict.PASS:
        return Next(Step.PROMOTE, "promote", f"final analysis PASS: {reason}")
    if policy == "ask":
        return Next(Step.ASK, "ask", f"final analysis {verdict.value}, asking a person: {reason}")
    how = "policy extend: max_extension reached" if policy == "extend" else f"policy {policy}"
    return Next(Step.ROLL_BACK, "rollback", f"final analysis {verdict.value} ({how}): {reason}")
