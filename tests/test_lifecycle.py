"""The rollout state machine on its own: what each state allows, whose split a step may change, what
the final split means, and the next step after each piece of evidence. Pure functions: no database."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import base_spec
from mlcanary.lifecycle import (
    ALLOWED,
    Action,
    Status,
    Step,
    after_guardrails,
    after_look,
    final_decision,
    final_state,
    refusal,
    rollback_refusal,
    stale_reason,
    start_refusal,
    step_refusal,
)
from mlcanary.routers.base import Split
from mlcanary.spec import parse_spec
from mlcanary.verdict import Verdict
from mlcanary.watch import End, Ended, WatchState, after_poll
from mlcanary.watch import after_look as watch_after_look

ME = "rollout__r/run-1"


def split(baseline: str, canary: str | None, percent: float, owner: str | None = ME) -> Split:
    return Split("m", baseline, canary, percent, owner)


@pytest.mark.parametrize("status", list(Status))
def test_only_a_running_rollout_shifts_traffic_and_only_a_lock_holder_acts(status: Status) -> None:
    for action in Action:
        allowed = refusal(status, True, action) is None
        assert allowed == (action in ALLOWED[status])
        assert refusal(status, False, action) is not None  # no lock, no action at all
    assert (refusal(status, True, Action.SHIFT) is None) == (status is Status.RUNNING)
    assert (refusal(status, True, Action.PROMOTE) is None) == (status is Status.RUNNING)


def test_a_rollback_stays_possible_until_the_lock_is_released() -> None:
    for status in (Status.RUNNING, Status.ROLLING_BACK, Status.ROLLBACK_FAILED, Status.SPLIT_MISMATCH):
        assert refusal(status, True, Action.ROLL_BACK) is None
    assert "rolling_back: it may not keep watching" in str(refusal(Status.ROLLING_BACK, True, Action.LOOK))


def test_the_start_checks_what_serves() -> None:
    assert start_refusal(split("v1", None, 0, None), "v2", None) is None
    assert start_refusal(split("v1", "v0", 0.0, "old"), "v2", "v1") is None  # a rolled-back canary at 0 %
    assert "baseline v1 was asked for, but the router reports v2 serving" in str(
        start_refusal(split("v2", None, 0), "v3", "v1")
    )
    assert "left by rollout__old/7" in str(start_refusal(split("v1", "v5", 50, "rollout__old/7"), "v2", None))
    assert "left by an unknown owner" in str(start_refusal(split("v1", "v5", 5, None), "v2", None))
    assert "pass baseline_version" in str(start_refusal(None, "v2", None))
    assert start_refusal(None, "v2", "v1") is None  # the router has nothing yet: the trigger names it


def test_a_step_is_a_compare_and_set_on_owner_and_versions() -> None:
    assert step_refusal(split("v1", "v2", 10), ME, "v1", "v2", first=False) is None
    assert step_refusal(split("v2", None, 0), ME, "v1", "v2", first=False) is None  # mid-promotion, its own
    assert step_refusal(split("v1", "v2", 10, "other"), ME, "v1", "v2", first=False) is not None
    assert step_refusal(split("v1", "v3", 10), ME, "v1", "v2", first=False) is not None  # someone else's canary
    assert step_refusal(split("v1", None, 0, "earlier"), ME, "v1", "v2", first=True) is None  # starts from v1 alone
    assert step_refusal(split("v1", None, 0, "earlier"), ME, "v1", "v2", first=False) is not None
    assert step_refusal(split("v3", None, 0, "earlier"), ME, "v1", "v2", first=True) is not None
    assert step_refusal(None, ME, "v1", "v2", first=True) is None


def test_a_canary_rolled_back_behind_the_rollouts_back_is_not_brought_back() -> None:
    """The trigger set the canary to 0 % and its records were lost (the row still says 10 %): no
    step (a person's Approve, a promotion) may bring it back; the 0 % of a first step may start."""
    why = step_refusal(split("v1", "v2", 0), ME, "v1", "v2", first=False, last_percent=10)
    assert why is not None and "rolled back" in why and "10 %" in why
    assert step_refusal(split("v1", "v2", 10), ME, "v1", "v2", first=False, last_percent=10) is None
    assert step_refusal(split("v2", None, 0), ME, "v1", "v2", first=False, last_percent=60) is None  # promoting
    assert step_refusal(split("v1", None, 0, "earlier"), ME, "v1", "v2", first=True, last_percent=0) is None


def test_a_rollback_never_touches_another_split_nor_puts_an_old_model_back() -> None:
    assert rollback_refusal(split("v1", "v2", 30), ME, "v1", "v2") is None
    assert rollback_refusal(split("v1", "v2", 0.0, "someone"), ME, "v1", "v2") is None  # nothing to do
    assert "did not set" in str(rollback_refusal(split("v1", "v2", 30, "someone"), ME, "v1", "v2"))
    assert "would put v1 back" in str(rollback_refusal(split("v2", None, 0), ME, "v1", "v2"))
    assert rollback_refusal(split("v1", "v2", 100), ME, "v1", "v2") is None  # a promotion half done


def test_the_final_split_decides_whether_the_lock_is_released() -> None:
    assert final_state(Status.ROLLED_BACK, split("v1", "v2", 0), None, "v2", False).safe
    unsafe = final_state(Status.ROLLING_BACK, split("v1", "v2", 30), None, "v2", False)
    assert unsafe.status is Status.ROLLBACK_FAILED and not unsafe.safe and "still has traffic" in str(unsafe.problem)
    assert final_state(Status.RUNNING, split("v1", "v2", 0), None, "v2", False).status is Status.ROLLED_BACK
    assert final_state(Status.PROMOTED, split("v2", None, 0), None, "v2", False).safe
    reverted = final_state(Status.PROMOTED, split("v1", None, 0, "revert"), None, "v2", False)
    assert reverted.status is Status.SPLIT_MISMATCH and not reverted.safe
    unknown = final_state(Status.ROLLED_BACK, None, "ConnectError", "v2", False)
    assert unknown.status is Status.ROLLBACK_FAILED and "could not be read" in str(unknown.problem)
    fixed = final_state(Status.SPLIT_MISMATCH, split("v1", "v2", 0), None, "v2", False)
    assert fixed.safe and fixed.status is Status.ROLLED_BACK  # rolled back after the mismatch
    assert final_state(Status.RUNNING, split("v1", None, 0), None, "v2", True).safe  # a dry run changed nothing


def test_stale_locks() -> None:
    assert stale_reason(Status.RUNNING, "running") is None
    assert stale_reason(Status.RUNNING, "queued") is None
    assert "deleted" in str(stale_reason(Status.RUNNING, None))
    assert "ended (success)" in str(stale_reason(Status.RUNNING, "success"))
    assert stale_reason(Status.ROLLBACK_FAILED, None) is None  # waits for a person, announced already
    assert stale_reason(Status.RUNNING, "DagRunState.RUNNING") is None  # a state it does not know: no action


def test_guardrails_proceed_only_when_healthy() -> None:
    assert after_guardrails("healthy", "ok", 1).step is Step.PROCEED
    for status in ("breach", "no_data", "error", "timeout"):
        nxt = after_guardrails(status, "why", 2)
        assert nxt.step is Step.ROLL_BACK and nxt.reason == f"guardrails stage 2 {status}: why"
    nxt = after_guardrails("analysis_fail", "failing look 2 of 2 during the bake: ctr -20 %", 1)
    assert nxt.step is Step.ROLL_BACK
    assert nxt.reason == "analysis stage 1: failing look 2 of 2 during the bake: ctr -20 %"


def test_background_looks_end_the_watch_after_consecutive_fails_in_a_row() -> None:
    state = WatchState(polls=7, healthy_seconds=30.0)
    state, ended = watch_after_look(state, Verdict.FAIL, "ctr down", consecutive_fails=2)
    assert ended is None and (state.looks, state.look_fails) == (1, 1)
    state, ended = watch_after_look(state, Verdict.INCONCLUSIVE, "few rows", consecutive_fails=2)
    assert ended is None and state.look_fails == 0  # the streak is broken
    state, _ = watch_after_look(state, Verdict.FAIL, "ctr down", consecutive_fails=2)
    state, ended = watch_after_look(state, Verdict.FAIL, "ctr down more", consecutive_fails=2)
    assert ended == Ended(End.ANALYSIS, "failing look 2 of 2 during the bake: ctr down more")
    assert (state.polls, state.healthy_seconds, state.looks) == (7, 30.0, 4)  # the bake is the polls' business
    travelled = WatchState.from_dict(state.to_dict())  # the counters travel with a restarted trigger
    assert (travelled.looks, travelled.look_fails) == (4, 2)
    assert (
        WatchState.from_dict(
            {"polls": 3, "healthy_seconds": 1.0, "breaches": 0, "no_data": 0, "errors": 0, "reason": "r"}
        ).looks
        == 0
    )  # counters saved before looks existed
    _, ended = watch_after_look(WatchState(), Verdict.FAIL, "x", consecutive_fails=1)
    assert ended is not None and ended.end is End.ANALYSIS


def test_polls_keep_the_looks_counters() -> None:
    g = parse_spec(base_spec()).guardrails
    state = WatchState(looks=3, look_fails=1)
    for verdict in (Verdict.PASS, Verdict.INCONCLUSIVE, Verdict.FAIL):
        new, _ = after_poll(state, g, verdict, "r", [], 1.0, 100.0)
        assert (new.looks, new.look_fails) == (3, 1), verdict


def _look(verdict: Verdict, **kw: object) -> Step:
    args: dict = dict(
        final=False,
        policy="rollback",
        fails=0,
        consecutive_fails=1,
        waited=timedelta(0),
        interval=timedelta(minutes=1),
        max_extension=timedelta(minutes=5),
    )
    return after_look(verdict, "r", **(args | kw)).step


def test_after_a_look() -> None:
    assert _look(Verdict.FAIL) is Step.ROLL_BACK
    assert _look(Verdict.FAIL, consecutive_fails=3, fails=1) is Step.LOOK_AGAIN
    assert _look(Verdict.FAIL, consecutive_fails=3, fails=2) is Step.ROLL_BACK
    assert _look(Verdict.INVALID) is Step.ROLL_BACK
    assert _look(Verdict.INVALID, policy="ask") is Step.PROCEED
    assert _look(Verdict.INCONCLUSIVE) is Step.PROCEED  # not the last stage
    assert _look(Verdict.INCONCLUSIVE, final=True, policy="extend") is Step.LOOK_AGAIN
    assert _look(Verdict.INCONCLUSIVE, final=True, policy="extend", waited=timedelta(minutes=4, seconds=1)) is (
        Step.PROCEED
    )  # one more interval would pass max_extension
    assert _look(Verdict.PASS, final=True, policy="extend") is Step.PROCEED


def test_advance_on_pass_holds_a_stage_until_it_passes() -> None:
    pass_only = dict(advance_on="pass")
    assert _look(Verdict.PASS, **pass_only) is Step.PROCEED
    assert _look(Verdict.INCONCLUSIVE, **pass_only) is Step.LOOK_AGAIN
    assert _look(Verdict.INVALID, policy="ask", **pass_only) is Step.LOOK_AGAIN
    assert _look(Verdict.INVALID, **pass_only) is Step.ROLL_BACK  # the invalid policy first
    late = _look(Verdict.INCONCLUSIVE, waited=timedelta(minutes=4, seconds=1), **pass_only)
    assert late is Step.ROLL_BACK  # max_extension spent without a PASS
    nxt = after_look(
        Verdict.INCONCLUSIVE,
        "few rows",
        final=False,
        policy="rollback",
        fails=0,
        consecutive_fails=1,
        waited=timedelta(minutes=5),
        interval=timedelta(minutes=1),
        max_extension=timedelta(minutes=5),
        advance_on="pass",
    )
    assert nxt.reason == "analysis: still INCONCLUSIVE after 5 min (advance_on pass): few rows"
    # the last stage is the policies' to decide, whatever advance_on says
    assert _look(Verdict.INCONCLUSIVE, final=True, **pass_only) is Step.PROCEED


def test_the_final_decision() -> None:
    assert final_decision(Verdict.PASS, "ok", "rollback").step is Step.PROMOTE
    assert final_decision(Verdict.INCONCLUSIVE, "few", "ask").step is Step.ASK
    nxt = final_decision(Verdict.INCONCLUSIVE, "few samples", "extend")
    assert nxt.step is Step.ROLL_BACK
    assert nxt.reason == "final analysis INCONCLUSIVE (policy extend: max_extension reached): few samples"
