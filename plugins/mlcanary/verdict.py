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


def deciding(checks: list[CheckResult], verdict: Verdict) -> CheckResult | None:
    """The check that decided ``verdict`` as :func:`combine` reached it: the first gating FAIL, the
    first INVALID, or, for INCONCLUSIVE, the first required check that has not passed (a
    non-required one only when no check is required)."""
    if verdict is Verdict.INCONCLUSIVE:
        candidates = [c for c in checks if c.required] or checks
        return next((c for c in candidates if c.verdict is not Verdict.PASS), None)
    for c in checks:
        if c.verdict is verdict and (c.gating or verdict is not Verdict.FAIL):
            return c
    return next((c for c in checks if c.verdict is not Verdict.PASS), None)


def first_reason(checks: list[CheckResult], verdict: Verdict) -> str:
    """The reason of the check that decided ``verdict`` (:func:`deciding`), for one-line summaries."""
    c = deciding(checks, verdict)
    if c is not None:
        return c.reason
    if not checks:
        return "no checks configured"
    if verdict is Verdict.INCONCLUSIVE:
        return "every check passed, but none is required to (no critical metric): nothing can decide a PASS"
    return "all checks passed"
