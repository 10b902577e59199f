"""Fast guardrails: the canary's SLOs over a short sliding window, optionally against the baseline.

Each poll measures both arms through a :class:`~mlcanary.sources.MetricSource` and checks:

- ``success_rate``: a count test against the error budget (1 - ``success_rate_min``): FAIL when the
  canary's failures exceed the budget significantly (exact binomial, level ``alpha``); PASS when the
  observed rate meets the SLO; otherwise INCONCLUSIVE: the stage holds, it does not bake;
- ``p99_latency_ms``, ``cpu``, ``memory``: the value against its limit;
- with ``baseline`` checks: ``error_rate_vs_baseline`` (the exact conditional test of the two error
  rates' ratio) and ``p99_latency_vs_baseline`` (the canary's requests slower than the baseline's
  P99 times the allowed ratio, against the 1 % a P99 allows), each FAIL only when significant.

Too few requests (or no resource samples) is no evidence: that check is INCONCLUSIVE and the result
lists it in ``missing``; it never passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mlcanary.sources.base import ArmHealth, MetricSource
from mlcanary.spec import GuardrailSpec, RolloutSpec
from mlcanary.stats.counts import exceeds_rate_ratio, exceeds_share
from mlcanary.verdict import CheckResult, Verdict, combine, first_reason


@dataclass(frozen=True)
class GuardrailResult:
    verdict: Verdict
    reason: str
    window_start: datetime
    window_end: datetime
    canary: ArmHealth
    baseline: ArmHealth | None
    checks: list[CheckResult]
    missing: list[str] = field(default_factory=list)  # checks without enough evidence: no data

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "canary": self.canary.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "missing": self.missing,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class _Limit:
    name: str
    limit: float
    upper: bool  # the value must stay below the limit (else: at or above it)
    unit: str  # "%" or "ms"
    samples: str  # which count is the evidence: "requests" or "resource_samples"


@dataclass(frozen=True)
class _Outcome:
    verdict: Verdict
    reason: str
    value: float | None
    n: int
    no_data: bool = False


def _limits(g: GuardrailSpec) -> list[_Limit]:
    wanted = [
        ("success_rate", g.success_rate_min, False, "%", "requests"),
        ("p99_latency_ms", g.p99_latency_ms_max, True, "ms", "requests"),
        ("cpu", g.cpu_max, True, "%", "resource_samples"),
        ("memory", g.memory_max, True, "%", "resource_samples"),
    ]
    return [
        _Limit(name, limit, upper, unit, samples) for name, limit, upper, unit, samples in wanted if limit is not None
    ]


def _absolute(lim: _Limit, arm: ArmHealth, g: GuardrailSpec) -> _Outcome:
    value: float | None = getattr(arm, lim.name)
    n: int = getattr(arm, lim.samples)
    if lim.samples == "requests" and n < g.min_requests:
        return _Outcome(
            Verdict.INCONCLUSIVE, f"{lim.name}: no data: {n} requests < minimum {g.min_requests}", value, n, True
        )
    if value is None or n == 0:
        what = "no resource samples" if lim.samples == "resource_samples" else "no latency values"
        return _Outcome(Verdict.INCONCLUSIVE, f"{lim.name}: no data: {what}", value, n, True)
    ok = value < lim.limit if lim.upper else value >= lim.limit
    sign = ("<" if ok else ">=") if lim.upper else (">=" if ok else "<")
    said = f"{lim.name} {_fmt(value, lim.unit)} {sign} {_fmt(lim.limit, lim.unit)}"
    if ok:
        return _Outcome(Verdict.PASS, f"{said} (n={n:,})", value, n)
    if lim.name != "success_rate":
        return _Outcome(Verdict.FAIL, f"{said} (n={n:,})", value, n)
    budget = 1 - lim.limit
    p = exceeds_share(arm.failures, n, budget)
    evidence = f"n={n:,}, {arm.failures:,} failed; p={p:.2g} against the {_fmt(budget, '%')} error budget"
    if p <= g.alpha:
        return _Outcome(Verdict.FAIL, f"{said} ({evidence})", value, n)
    return _Outcome(Verdict.INCONCLUSIVE, f"{said} but not significantly ({evidence}): holding", value, n)


def evaluate_guardrails(
    source: MetricSource,
    spec: RolloutSpec,
    canary_version: str,
    at: datetime,
    baseline_version: str | None = None,
    *,
    since: datetime | None = None,
) -> GuardrailResult:
    """Check the canary over ``[at - window, at)`` against the spec's limits (and the baseline); the
    window never reaches back before ``since`` (the stage's shift: no stage is judged on the traffic
    of the one before)."""
    g = spec.guardrails
    start, end = at - g.window, at
    if since is not None and since > start:
        start = min(since, end)
    canary = source.measure(canary_version, start, end)
    baseline = source.measure(baseline_version, start, end) if baseline_version else None
    relative = g.baseline if baseline is not None else None
    checks: list[CheckResult] = []
    missing: list[str] = []

    def add(
        check: str, outcome: _Outcome, threshold: float, baseline_value: float | None, baseline_n: int | None
    ) -> None:
        if outcome.no_data:
            missing.append(check)
        checks.append(
            CheckResult(
                tier="guardrail",
                check=check,
                segment="*",
                verdict=outcome.verdict,
                reason=outcome.reason,
                window_start=start,
                window_end=end,
                canary_value=outcome.value,
                baseline_value=baseline_value,
                canary_n=outcome.n,
                baseline_n=baseline_n,
                threshold=threshold,
            )
        )

    for lim in _limits(g):
        outcome = _absolute(lim, canary, g)
        theirs = None if baseline is None else _absolute(lim, baseline, g)
        shared = outcome.verdict is Verdict.FAIL and theirs is not None and theirs.verdict is Verdict.FAIL
        if shared and relative and relative.excuse_shared_breach:
            assert theirs is not None
            outcome = _Outcome(
                Verdict.INCONCLUSIVE,
                f"{outcome.reason}, shared with the baseline ({_fmt(theirs.value, lim.unit)}, n={theirs.n:,}): "
                "not the canary's doing, holding",
                outcome.value,
                outcome.n,
            )
        add(
            lim.name, outcome, lim.limit, None if theirs is None else theirs.value, None if theirs is None else theirs.n
        )
    if relative:  # set only when the baseline was measured
        assert baseline is not None
        if relative.error_rate_ratio_max is not None:
            add(
                "error_rate_vs_baseline",
                _error_ratio(canary, baseline, relative.error_rate_ratio_max, g),
                relative.error_rate_ratio_max,
                None if baseline.success_rate is None else 1 - baseline.success_rate,
                baseline.requests,
            )
        if relative.p99_latency_ratio_max is not None:
            outcome = _latency_ratio(
                source, canary_version, start, end, canary, baseline, relative.p99_latency_ratio_max, g
            )
            add(
                "p99_latency_vs_baseline",
                outcome,
                relative.p99_latency_ratio_max,
                baseline.p99_latency_ms,
                baseline.requests,
            )
    verdict = combine(checks)
    reason = (
        "healthy: " + "; ".join(c.reason for c in checks) if verdict is Verdict.PASS else first_reason(checks, verdict)
    )
    return GuardrailResult(verdict, reason, start, end, canary, baseline, checks, missing)


def _error_ratio(canary: ArmHealth, baseline: ArmHealth, ratio: float, g: GuardrailSpec) -> _Outcome:
    n_c, n_b = canary.requests, baseline.requests
    rate = None if not n_c else canary.failures / n_c
    if min(n_c, n_b) < g.min_requests:
        return _Outcome(
            Verdict.INCONCLUSIVE,
            f"error_rate_vs_baseline: no data: {n_c} canary / {n_b} baseline requests < minimum {g.min_requests}",
            rate,
            n_c,
            True,
        )
    assert rate is not None
    base_rate = baseline.failures / n_b
    p = exceeds_rate_ratio(canary.failures, n_c, baseline.failures, n_b, ratio)
    said = (
        f"error_rate_vs_baseline: canary {_fmt(rate, '%')} vs baseline {_fmt(base_rate, '%')} "
        f"(limit {ratio:g}x; {canary.failures:,}/{n_c:,} vs {baseline.failures:,}/{n_b:,} failed, p={p:.2g})"
    )
    if p <= g.alpha:
        return _Outcome(Verdict.FAIL, f"{said}: worse than the baseline", rate, n_c)
    return _Outcome(Verdict.PASS, f"{said}: not worse than allowed", rate, n_c)


def _latency_ratio(
    source: MetricSource,
    version: str,
    start: datetime,
    end: datetime,
    canary: ArmHealth,
    baseline: ArmHealth,
    ratio: float,
    g: GuardrailSpec,
) -> _Outcome:
    n_c = canary.requests
    if min(n_c, baseline.requests) < g.min_requests or baseline.p99_latency_ms is None:
        return _Outcome(
            Verdict.INCONCLUSIVE,
            f"p99_latency_vs_baseline: no data: {n_c} canary / {baseline.requests} baseline requests "
            f"< minimum {g.min_requests}",
            canary.p99_latency_ms,
            n_c,
            True,
        )
    limit = ratio * baseline.p99_latency_ms
    slower = source.slower_than(version, start, end, limit)
    p = exceeds_share(slower, n_c, 0.01)
    said = (
        f"p99_latency_vs_baseline: canary P99 {_fmt(canary.p99_latency_ms, 'ms')} vs baseline "
        f"{_fmt(baseline.p99_latency_ms, 'ms')}; {_fmt(slower / n_c, '%')} of {n_c:,} canary requests slower than "
        f"{_fmt(limit, 'ms')} ({ratio:g}x the baseline P99; a P99 allows 1.00 %, p={p:.2g})"
    )
    if p <= g.alpha:
        return _Outcome(Verdict.FAIL, f"{said}: slower than the baseline", canary.p99_latency_ms, n_c)
    return _Outcome(Verdict.PASS, f"{said}: not slower than allowed", canary.p99_latency_ms, n_c)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f} %" if unit == "%" else f"{value:.1f} ms"
