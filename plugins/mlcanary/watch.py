"""The guardrail watch of one stage as a pure state machine: its counters, and when it ends.

The trigger feeds it one poll (or one source error) at a time with two clocks: a monotonic reading,
which alone advances the bake, and the wall clock, which alone decides the absolute deadline. A clock
that steps forward or back therefore neither finishes a bake early nor holds it back, and a
deadline is the same moment on every triggerer.

The slow tier looks alongside (:func:`after_look`): every ``analysis.interval`` the trigger runs the
analysis in the background, and ``consecutive_fails`` failing looks in a row end the watch at once.

The counters (:class:`WatchState`) are plain data that travel with the watch: the trigger stores
them after every poll, so a trigger restarted or moved to another triggerer goes on from them. A
monotonic reading means nothing in another process, so the first poll after a restart starts a
new healthy stretch (the bake loses at most one interval, never gains).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from mlcanary.spec import GuardrailSpec
from mlcanary.verdict import Verdict


class End(StrEnum):
    HEALTHY = "healthy"  # healthy polls have covered the bake
    BREACH = "breach"  # consecutive_breaches failing polls in a row
    NO_DATA = "no_data"  # no_data_limit polls in a row without enough data, policy fail
    ERROR = "error"  # error_limit source errors in a row: fail closed
    INVALID = "invalid"  # the comparison is invalid (a traffic split mismatch) and the policy is rollback
    TIMEOUT = "timeout"  # the absolute deadline passed first
    ANALYSIS = "analysis_fail"  # consecutive_fails background analysis looks in a row failed


@dataclass(frozen=True)
class WatchState:
    polls: int = 0
    healthy_seconds: float = 0.0  # monotonic seconds between consecutive healthy polls
    breaches: int = 0
    no_data: int = 0
    errors: int = 0
    reason: str = "no poll yet"
    last_healthy_at: float | None = None  # monotonic reading of the last healthy poll, this process only
    looks: int = 0  # background analysis looks
    look_fails: int = 0  # failing looks in a row

    def to_dict(self) -> dict[str, Any]:
        """What travels: everything but the process-local monotonic reading."""
        return {k: v for k, v in asdict(self).items() if k != "last_healthy_at"}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WatchState:
        if not data:
            return cls()
        kept = ("polls", "healthy_seconds", "breaches", "no_data", "errors", "reason", "looks", "look_fails")
        return cls(**{k: data[k] for k in kept if k in data})


@dataclass(frozen=True)
class Ended:
    end: End
    reason: str


def after_poll(
    state: WatchState,
    g: GuardrailSpec,
    verdict: Verdict,
    reason: str,
    missing: list[str],
    monotonic: float,
    bake_seconds: float,
    invalid_rolls_back: bool = False,
) -> tuple[WatchState, Ended | None]:
    """One poll's verdict: FAIL counts a breach, PASS extends the healthy stretch, anything else
    (no data, not yet significant, invalid) interrupts it; ``missing`` lists the checks without
    data. INVALID ends the watch at once when the spec's invalid policy is ``rollback``."""
    polls = state.polls + 1
    no_data = state.no_data + 1 if missing else 0
    if verdict is Verdict.FAIL:
        new = replace(state, polls=polls, breaches=state.breaches + 1, no_data=no_data, errors=0, reason=reason)
        new = replace(new, last_healthy_at=None)
        if new.breaches >= g.consecutive_breaches:
            return new, Ended(End.BREACH, reason)
    elif verdict is Verdict.PASS:
        healthy = state.healthy_seconds
        if state.last_healthy_at is not None:
            healthy += max(0.0, monotonic - state.last_healthy_at)
        new = replace(state, polls=polls, healthy_seconds=healthy, breaches=0, no_data=no_data, errors=0)
        new = replace(new, reason=reason, last_healthy_at=monotonic)
        if healthy >= bake_seconds:
            return new, Ended(End.HEALTHY, reason)
    else:
        new = replace(state, polls=polls, breaches=0, no_data=no_data, errors=0, reason=reason, last_healthy_at=None)
        if verdict is Verdict.INVALID and invalid_rolls_back:
            return new, Ended(End.INVALID, reason)
    if no_data >= g.no_data_limit and g.no_data_policy == "fail":
        return new, Ended(
            End.NO_DATA, f"{no_data} polls in a row without enough data ({', '.join(missing)}); policy fail: {reason}"
        )
    return new, None


def after_error(state: WatchState, g: GuardrailSpec, error: str) -> tuple[WatchState, Ended | None, float]:
    """A metric-source error (or a poll that took too long): fail closed after ``error_limit`` in a
    row; otherwise retry after 1, 2, 4 ... seconds, never later than the next interval."""
    errors = state.errors + 1
    reason = f"metric source error {errors} of {g.error_limit} in a row: {error}"
    new = replace(state, polls=state.polls + 1, errors=errors, reason=reason, last_healthy_at=None)
    retry = min(g.interval.total_seconds(), 2.0 ** (errors - 1))
    return new, (Ended(End.ERROR, reason) if errors >= g.error_limit else None), retry


def past_deadline(state: WatchState, next_poll_wall: float, deadline_wall: float, bake_seconds: float) -> Ended | None:
    """The next poll would come after the absolute deadline (wall clock): end now."""
    if next_poll_wall <= deadline_wall:
        return None
    return Ended(
        End.TIMEOUT,
        f"deadline passed with {state.healthy_seconds:.0f} s of {bake_seconds:.0f} s baked healthy; "
        f"last poll: {state.reason}",
    )


def after_look(
    state: WatchState, verdict: Verdict, reason: str, consecutive_fails: int
) -> tuple[WatchState, Ended | None]:
    """One background analysis look: FAIL counts, anything else resets the count; ``consecutive_fails``
    in a row end the watch (the stage's own gate look after the bake decides everything else)."""
    fails = state.look_fails + 1 if verdict is Verdict.FAIL else 0
    new = replace(state, looks=state.looks + 1, look_fails=fails)
    if fails >= consecutive_fails:
        return new, Ended(End.ANALYSIS, f"failing look {fails} of {consecutive_fails} during the bake: {reason}")
    return new, None
