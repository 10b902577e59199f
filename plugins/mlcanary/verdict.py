"""Verdicts and check results: the vocabulary every tier reports in."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    PASS = "PASS"  # evidence that the canary is within tolerance
    FAIL = "FAIL"  # evidence that the canary is worse than tolerance allows
    INCONCLUSIVE = "INCONCLUSIVE"  # not enough evidence either way
    INVALID = "INVALID"  # the comparison itself cannot be trusted


@dataclass(frozen=True)
class CheckResult:
    """One check of one segment in one window, with everything needed to explain it later."""

    tier: str  # "guardrail" | "analysis"
    check: str
    segment: str  # "*" for the whole arm, else "column=value"
    verdict: Verdict
    reason: str
    window_start: datetime
    window_end: datetime
    canary_value: float | None = None
    baseline_value: float | None = None
    canary_n: int | None = None
    baseline_n: int | None = None
    threshold: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    gating: bool = True  # a FAIL of this check stops the rollout
    required: bool = True  # this check must PASS for the whole result to PASS
    histogram: tuple[list[float], list[float]] | None = None  # drift: (baseline, canary) counts per bin

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["window_start"] = self.window_start.isoformat()
        out["window_end"] = self.window_end.isoformat()
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


def combine(checks: list[CheckResult]) -> Verdict:
    """FAIL if a gating check fails; INVALID if any is invalid; PASS if every required check passes."""
    if any(c.verdict is Verdict.FAIL and c.gating for c in checks):
        return Verdict.FAIL
    if any(c.verdict is Verdict.INVALID for c in checks):
        return Verdict.INVALID
    required = [c for c in checks if c.required]
    if required and all(c.verdict is Verdict.PASS for c in required):
        return Verdict.PASS
    return Verdict.INCONCLUSIVE


def first_reason(checks: list[CheckResult], verdict: Verdict) -> str:
    """The reason of the first check that explains ``verdict``, for one-line summaries."""
    for c in checks:
        if c.verdict is verdict and (c.gating or verdict is not Verdict.FAIL):
            return c.reason
    for c in checks:
        if c.verdict is not Verdict.PASS:
            return c.reason
    return "all checks passed" if checks else "no checks configured"
