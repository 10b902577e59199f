"""Fast guardrails: the canary's SLOs over a short sliding window, optionally against the baseline.

Each poll measures both arms through a :class:`~mlcanary.sources.MetricSource` and checks:

- ``success_rate``: a count test against the error budget (1 - ``success_rate_min``): PASS when the
  observed rate in the window meets the SLO; FAIL when it does not and the canary's failures exceed
  the budget significantly (level ``alpha``); otherwise INCONCLUSIVE: the stage holds, it does not bake;
- ``p99_latency_ms``, ``cpu``, ``memory``: the window's value against its limit;
- with ``baseline`` checks: ``error_rate_vs_baseline`` (the conditional test of the two error rates'
  ratio) and ``p99_latency_vs_baseline`` (the canary's requests slower than the baseline's P99 times
  the allowed ratio, against the 1 % a P99 allows), each FAIL only when significant;
- with ``canary_percent`` (the split in force) and the baseline: ``sample_ratio``, the arms' request
  counts against the configured split (:func:`~mlcanary.stats.counts.srm_p_value`, level
  ``srm_alpha``, and at least ``srm_min_deviation`` off): a mismatch makes the comparison INVALID.

Error control. With ``since`` (the moment the stage's split was applied; the trigger passes it) the
count tests use the stage's cumulative counts, ``[since, at)``, counted once more per arm
(``MetricSource.request_counts``), and the anytime-valid tests of
:mod:`mlcanary.stats.counts`: the probability that a stage whose canary sits exactly at its SLO ever
fails a test is at most ``alpha`` however many polls the stage takes (Ville's inequality; see
``bench/guardrail_false_alarms.py``), for each of the count tests. The window still decides PASS and
drives the limit checks and the values shown. Given ``window_alpha`` as well (the trigger passes
``alpha / 2`` over the watch's polls), each count test also tests the window alone at that level,
and the stage's at ``alpha / 2``: a canary that turns bad late in a long stage is caught by its
window at once, not after the stage's good counts are outweighed. Without ``since`` (the command line, old callers) each
poll tests the window alone with the exact tests, as before: ``alpha`` then holds per poll, not per
stage.

Too few requests in the window (or no resource samples) is no evidence: that check is INCONCLUSIVE
and the result lists it in ``missing``; it never passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mlcanary.sources.base import ArmHealth, MetricSource
from mlcanary.spec import GuardrailSpec, RolloutSpec
from mlcanary.stats.counts import (
    anytime_exceeds_rate_ratio,
    anytime_exceeds_share,
    exceeds_rate_ratio,
    exceeds_share,
    srm_p_value,
)
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
    # With ``since``: the stage's cumulative counts, [stage_start, window_end), that the count tests used.
    stage_start: datetime | None = None
    stage_canary: ArmHealth | None = None
    stage_baseline: ArmHealth | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "canary": self.canary.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "stage_start": None if self.stage_start is None else self.stage_start.isoformat(),
            "stage_canary": None if self.stage_canary is None else self.stage_canary.to_dict(),
            "stage_baseline": None if self.stage_baseline is None else self.stage_baseline.to_dict(),
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


def _counts(bad: int, n: int) -> tuple[int, int]:
    """Counts a test accepts: 0 <= bad <= n (a Prometheus source may round them apart)."""
    n = max(0, int(n))
    return min(max(0, int(bad)), n), n


def _fails(p_stage: float, p_window: float | None, g: GuardrailSpec, window_alpha: float | None) -> bool:
    """The FAIL rule with the stage's counts: the anytime test on the stage at ``alpha``; or, given
    ``window_alpha``, that test at ``alpha / 2`` or the window's exact test at ``window_alpha``
    (the other half of ``alpha`` spread over the watch's polls: Bonferroni), so a canary that turns
    bad late in a long stage is caught by its window at once. Either way at most ``alpha`` per watch."""
    if window_alpha is None or p_window is None:
        return p_stage <= g.alpha
    return p_stage <= g.alpha / 2 or p_window <= window_alpha


def error_budget_verdict(
    g: GuardrailSpec,
    failures: int,
    requests: int,
    stage_failures: int | None = None,
    stage_requests: int | None = None,
    window_alpha: float | None = None,
) -> tuple[Verdict, float | None]:
    """The ``success_rate`` rule of one poll, and its p-value (None when no test was needed).

    INCONCLUSIVE below ``min_requests`` in the window; PASS when the window's success rate meets
    ``success_rate_min``; otherwise FAIL when the failures exceed the error budget at level ``alpha``,
    else INCONCLUSIVE. The test is on the window's counts (exact binomial, per poll) or, given the
    stage's cumulative counts, on those (anytime-valid: ``alpha`` holds for the whole stage).
    """
    assert g.success_rate_min is not None
    if requests < g.min_requests:
        return Verdict.INCONCLUSIVE, None
    if 1 - failures / requests >= g.success_rate_min:
        return Verdict.PASS, None
    budget = 1 - g.success_rate_min
    if stage_requests is None:
        p = exceeds_share(failures, requests, budget)
        return (Verdict.FAIL if p <= g.alpha else Verdict.INCONCLUSIVE), p
    p = anytime_exceeds_share(*_counts(stage_failures or 0, stage_requests), budget)
    p_window = None if window_alpha is None else exceeds_share(failures, requests, budget)
    return (Verdict.FAIL if _fails(p, p_window, g, window_alpha) else Verdict.INCONCLUSIVE), p


def _absolute(
    lim: _Limit, arm: ArmHealth, g: GuardrailSpec, stage: ArmHealth | None = None, window_alpha: float | None = None
) -> _Outcome:
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
    verdict, p = error_budget_verdict(
        g,
        arm.failures,
        n,
        None if stage is None else stage.failures,
        None if stage is None else stage.requests,
        window_alpha,
    )
    budget = _fmt(1 - lim.limit, "%")
    if stage is None:
        evidence = f"n={n:,}, {arm.failures:,} failed; p={p:.2g} against the {budget} error budget"
    else:
        bad, total = _counts(stage.failures, stage.requests)
        evidence = (
            f"window n={n:,}{_window_p(exceeds_share(arm.failures, n, 1 - lim.limit), window_alpha)}; "
            f"stage so far: n={total:,}, {bad:,} failed; anytime p={p:.2g} against the {budget} error budget"
        )
    if verdict is Verdict.FAIL:
        return _Outcome(Verdict.FAIL, f"{said} ({evidence})", value, n)
    return _Outcome(Verdict.INCONCLUSIVE, f"{said} but not significantly ({evidence}): holding", value, n)


def _stage_counts(source: MetricSource, version: str, start: datetime, end: datetime) -> ArmHealth:
    requests, failures = source.request_counts(version, start, end)
    return ArmHealth(requests, failures, None, 0, None, None)


def evaluate_guardrails(
    source: MetricSource,
    spec: RolloutSpec,
    canary_version: str,
    at: datetime,
    baseline_version: str | None = None,
    *,
    since: datetime | None = None,
    canary_percent: float | None = None,
    window_alpha: float | None = None,
) -> GuardrailResult:
    """Check the canary over ``[at - window, at)`` against the spec's limits (and the baseline); the
    window never reaches back before ``since`` (the stage's shift: no stage is judged on the traffic
    of the one before).

    With ``since`` the count tests (error budget, error rate and latency against the baseline) test
    the stage's cumulative counts ``[since, at)`` with anytime-valid p-values, so ``alpha`` bounds the
    chance that a stage at its SLO ever fails; without it, each poll tests its window (``alpha`` per
    poll). ``canary_percent`` is the canary's share of traffic in force (0-100): with the baseline
    (and ``guardrails.srm`` on) the ``sample_ratio`` check tests the arms' request counts (the
    stage's, else the window's) against it; a mismatch makes the result INVALID. No such check at
    0 or 100 %, where there is no split to test.
    """
    g = spec.guardrails
    start, end = at - g.window, at
    if since is not None and since > start:
        start = min(since, end)
    canary = source.measure(canary_version, start, end)
    baseline = source.measure(baseline_version, start, end) if baseline_version else None
    problems = [*canary.problems, *(baseline.problems if baseline else ())]
    if problems:  # numbers from broken data mean nothing: INVALID, naming each broken rule
        checks = [
            CheckResult(
                tier="guardrail",
                check="data",
                segment="*",
                verdict=Verdict.INVALID,
                reason=f"data check: {problem}",
                window_start=start,
                window_end=end,
            )
            for problem in problems
        ]
        return GuardrailResult(Verdict.INVALID, checks[0].reason, start, end, canary, baseline, checks)
    stage_start: datetime | None = None
    stage_canary = stage_baseline = None
    if since is not None:
        stage_start = min(since, end)
        if stage_start == start:  # the stage is younger than the window: the same counts
            stage_canary, stage_baseline = canary, baseline
        else:
            stage_canary = _stage_counts(source, canary_version, stage_start, end)
            stage_baseline = _stage_counts(source, baseline_version, stage_start, end) if baseline_version else None
    relative = g.baseline if baseline is not None else None
    checks: list[CheckResult] = []
    missing: list[str] = []

    def add(
        check: str,
        outcome: _Outcome,
        threshold: float,
        baseline_value: float | None,
        baseline_n: int | None,
        window_start: datetime = start,
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
                window_start=window_start,
                window_end=end,
                canary_value=outcome.value,
                baseline_value=baseline_value,
                canary_n=outcome.n,
                baseline_n=baseline_n,
                threshold=threshold,
            )
        )

    for lim in _limits(g):
        outcome = _absolute(lim, canary, g, stage_canary, window_alpha)
        theirs = None if baseline is None else _absolute(lim, baseline, g, stage_baseline, window_alpha)
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
        both = None if stage_canary is None or stage_baseline is None else (stage_canary, stage_baseline)
        if relative.error_rate_ratio_max is not None:
            add(
                "error_rate_vs_baseline",
                _error_ratio(canary, baseline, relative.error_rate_ratio_max, g, both, window_alpha),
                relative.error_rate_ratio_max,
                None if baseline.success_rate is None else 1 - baseline.success_rate,
                baseline.requests,
            )
        if relative.p99_latency_ratio_max is not None:
            outcome = _latency_ratio(
                source,
                canary_version,
                start,
                end,
                canary,
                baseline,
                relative.p99_latency_ratio_max,
                g,
                None if stage_start is None or stage_canary is None else (stage_start, stage_canary),
                window_alpha,
            )
            add(
                "p99_latency_vs_baseline",
                outcome,
                relative.p99_latency_ratio_max,
                baseline.p99_latency_ms,
                baseline.requests,
            )
    if canary_percent is not None and baseline is not None and g.srm and 0 < canary_percent < 100:
        ours, theirs_arm = (canary, baseline) if stage_canary is None else (stage_canary, stage_baseline)
        assert theirs_arm is not None
        outcome = _sample_ratio(ours, theirs_arm, canary_percent, g, stage_start is not None)
        add(
            "sample_ratio",
            outcome,
            canary_percent / 100,
            None,
            theirs_arm.requests,
            start if stage_start is None else stage_start,
        )
    verdict = combine(checks)
    reason = (
        "healthy: " + "; ".join(c.reason for c in checks) if verdict is Verdict.PASS else first_reason(checks, verdict)
    )
    return GuardrailResult(
        verdict, reason, start, end, canary, baseline, checks, missing, stage_start, stage_canary, stage_baseline
    )


def _rate(bad: int, n: int) -> float | None:
    return bad / n if n else None


def _error_ratio(
    canary: ArmHealth,
    baseline: ArmHealth,
    ratio: float,
    g: GuardrailSpec,
    stage: tuple[ArmHealth, ArmHealth] | None = None,
    window_alpha: float | None = None,
) -> _Outcome:
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
    if stage is None:
        base_rate = baseline.failures / n_b
        p = exceeds_rate_ratio(canary.failures, n_c, baseline.failures, n_b, ratio)
        said = (
            f"error_rate_vs_baseline: canary {_fmt(rate, '%')} vs baseline {_fmt(base_rate, '%')} "
            f"(limit {ratio:g}x; {canary.failures:,}/{n_c:,} vs {baseline.failures:,}/{n_b:,} failed, p={p:.2g})"
        )
    else:
        bad_c, s_c = _counts(stage[0].failures, stage[0].requests)
        bad_b, s_b = _counts(stage[1].failures, stage[1].requests)
        p = anytime_exceeds_rate_ratio(bad_c, s_c, bad_b, s_b, ratio)
        p_window = exceeds_rate_ratio(canary.failures, n_c, baseline.failures, n_b, ratio)
        said = (
            f"error_rate_vs_baseline: stage so far canary {_fmt(_rate(bad_c, s_c), '%')} vs baseline "
            f"{_fmt(_rate(bad_b, s_b), '%')} (limit {ratio:g}x; {bad_c:,}/{s_c:,} vs {bad_b:,}/{s_b:,} failed, "
            f"anytime p={p:.2g}; window {_fmt(rate, '%')} of {n_c:,}{_window_p(p_window, window_alpha)})"
        )
        if _fails(p, p_window, g, window_alpha):
            return _Outcome(Verdict.FAIL, f"{said}: worse than the baseline", rate, n_c)
        return _Outcome(Verdict.PASS, f"{said}: not worse than allowed", rate, n_c)
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
    stage: tuple[datetime, ArmHealth] | None = None,
    window_alpha: float | None = None,
) -> _Outcome:
    """The canary's requests slower than ``ratio`` x the baseline's P99 in the window, against 1 %.

    With ``stage`` (its start and the canary's cumulative counts) the count is the stage's requests
    slower than that limit, tested with :func:`anytime_exceeds_share`. The limit moves with the
    baseline's P99 in the current window, so this is an approximation of an anytime-valid test: exact
    while the baseline's P99 holds still, and the earlier requests are judged by today's limit.
    """
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
    head = (
        f"p99_latency_vs_baseline: canary P99 {_fmt(canary.p99_latency_ms, 'ms')} vs baseline "
        f"{_fmt(baseline.p99_latency_ms, 'ms')}; "
    )
    if stage is None:
        slower = source.slower_than(version, start, end, limit)
        p = exceeds_share(slower, n_c, 0.01)
        said = (
            f"{head}{_fmt(slower / n_c, '%')} of {n_c:,} canary requests slower than "
            f"{_fmt(limit, 'ms')} ({ratio:g}x the baseline P99; a P99 allows 1.00 %, p={p:.2g})"
        )
    else:
        stage_start, stage_canary = stage
        slower, total = _counts(source.slower_than(version, stage_start, end, limit), stage_canary.requests)
        p = anytime_exceeds_share(slower, total, 0.01)
        p_window = None
        if window_alpha is not None:
            p_window = exceeds_share(source.slower_than(version, start, end, limit), n_c, 0.01)
        said = (
            f"{head}stage so far: {_fmt(_rate(slower, total), '%')} of {total:,} canary requests slower than "
            f"{_fmt(limit, 'ms')} ({ratio:g}x the baseline's current P99; a P99 allows 1.00 %, anytime p={p:.2g}"
            f"{_window_p(p_window, window_alpha)})"
        )
        if _fails(p, p_window, g, window_alpha):
            return _Outcome(Verdict.FAIL, f"{said}: slower than the baseline", canary.p99_latency_ms, n_c)
        return _Outcome(Verdict.PASS, f"{said}: not slower than allowed", canary.p99_latency_ms, n_c)
    if p <= g.alpha:
        return _Outcome(Verdict.FAIL, f"{said}: slower than the baseline", canary.p99_latency_ms, n_c)
    return _Outcome(Verdict.PASS, f"{said}: not slower than allowed", canary.p99_latency_ms, n_c)


def _sample_ratio(canary: ArmHealth, baseline: ArmHealth, percent: float, g: GuardrailSpec, stage: bool) -> _Outcome:
    """The arms' request counts against the configured split: INVALID on a significant mismatch.

    At least ``min_requests`` requests in both arms together: the test is valid at any count, and
    asking each arm for the minimum would blind it to the worst mismatch, an arm that gets nothing.
    The deviation is relative to the smaller configured share (the canary's below 50 %): 10 % of
    10 % is 1 point either way, so a 90/10 split whose 10 % arm gets 9 % is as far off as a 10/90 one.
    """
    c, b = max(0, canary.requests), max(0, baseline.requests)
    total = c + b
    configured = percent / 100
    where = "stage so far" if stage else "window"
    if total < g.min_requests:
        return _Outcome(
            Verdict.INCONCLUSIVE,
            f"sample_ratio: no data: {total} requests ({where}) < minimum {g.min_requests}",
            None,
            c,
            True,
        )
    observed = c / total
    p = srm_p_value(c, b, configured)
    deviation = abs(observed - configured) / min(configured, 1 - configured)
    said = (
        f"configured {percent:g} %, observed {100 * observed:.1f} % of {total:,} requests ({where}; anytime p={p:.2g})"
    )
    if p <= g.srm_alpha and deviation >= g.srm_min_deviation:
        return _Outcome(Verdict.INVALID, f"traffic split mismatch: {said}", observed, c)
    if p <= g.srm_alpha:
        return _Outcome(
            Verdict.PASS,
            f"traffic split as configured: {said}; off by {100 * deviation:.1f} % relative, "
            f"below the {100 * g.srm_min_deviation:g} % that counts as a mismatch",
            observed,
            c,
        )
    return _Outcome(Verdict.PASS, f"traffic split as configured: {said}", observed, c)


def _window_p(p: float | None, window_alpha: float | None) -> str:
    return "" if p is None or window_alpha is None else f", window p={p:.2g} (level {window_alpha:.2g})"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f} %" if unit == "%" else f"{value:.1f} ms"
