"""Anytime-valid count tests (error budget, error-rate ratio, sample ratio mismatch) against independent
oracles: numerical integration of the mixtures, simulation of repeated looks, scipy's chi-square, savvi."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import integrate, stats

from mlcanary.stats.counts import (
    anytime_exceeds_rate_ratio,
    anytime_exceeds_share,
    default_share_prior,
    exceeds_share,
    share_e_value,
    srm_p_value,
)

LOOKS = 40  # a 20-minute bake polled every 30 s


def mixture_by_quad(bad: int, n: int, share: float, prior: tuple[float, float]) -> float:
    """E = ∫ LR(p) dπ(p) over Beta(a, b) truncated to (share, 1), integrated numerically."""
    a, b = prior
    mass = stats.beta.sf(share, a, b)

    def f(p: float) -> float:
        return (p / share) ** bad * ((1 - p) / (1 - share)) ** (n - bad) * stats.beta.pdf(p, a, b) / mass

    peak = min(max(share, (bad + a - 1) / (n + a + b - 2)), 1.0)
    points = [peak] if share < peak < 1 else None
    return integrate.quad(f, share, 1, points=points, limit=500, epsabs=0, epsrel=1e-12)[0]


def log_mixture_by_quad(bad: int, n: int, share: float, prior: tuple[float, float]) -> float:
    """log E for large n: the log integrand shifted by its maximum, integrated around its peak."""
    a, b = prior
    log_mass = stats.beta.logsf(share, a, b)

    def g(p: float) -> float:
        return (
            bad * math.log(p / share)
            + (n - bad) * (math.log1p(-p) - math.log1p(-share))
            + stats.beta.logpdf(p, a, b)
            - log_mass
        )

    phat = bad / n
    if phat > share:
        peak, width = phat, math.sqrt(phat * (1 - phat) / n)
    else:  # the integrand falls from p = share: over 1 / slope, or its curvature's scale if flatter
        slope = (n - bad) / (1 - share) - bad / share
        peak, width = share, math.sqrt(share * (1 - share) / n)
        if slope > 0:
            width = min(width, 1 / slope)
    lo, hi = max(share, peak - 60 * width), min(1.0, peak + 60 * width)
    top = max(g(peak), g(lo), g(hi))
    inner = integrate.quad(lambda p: math.exp(g(p) - top), lo, hi, points=[peak] if lo < peak < hi else None)
    return top + math.log(inner[0])


def beta_with(mean: float, sd: float) -> tuple[float, float]:
    nu = mean * (1 - mean) / sd**2 - 1
    return mean * nu, (1 - mean) * nu


def first_rejecting(n: int, reject: Callable[[int], bool]) -> int:
    """Smallest bad count in 0..n that ``reject`` accepts (n + 1 if none), assuming monotonicity."""
    lo, hi = 0, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if reject(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def critical_counts(
    per_look: int,
    looks: int,
    share: float,
    alpha: float,
    test: Callable[[int, int, float], float] = anytime_exceeds_share,
) -> np.ndarray:
    """Per look t (cumulative n = per_look * t), the smallest bad count with p <= alpha."""
    out = []
    for t in range(1, looks + 1):
        n = per_look * t
        c = first_rejecting(n, lambda bad, n=n: test(bad, n, share) <= alpha)
        if 0 < c <= n:  # the p-value is monotone in the count: the search found the boundary
            assert test(c, n, share) <= alpha < test(c - 1, n, share)
        out.append(c)
    return np.array(out)


def ever_rejects(
    rng: np.random.Generator, p: float, per_look: int, crit: np.ndarray, runs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated cumulative failures at each look: whether a run ever reaches the critical count, and when."""
    bad = np.cumsum(rng.binomial(per_look, p, (runs, len(crit))), axis=1)
    hit = bad >= crit
    ever = hit.any(axis=1)
    return ever, np.where(ever, hit.argmax(axis=1) + 1, 0)


def margin(alpha: float, runs: int) -> float:
    return 3 * math.sqrt(alpha * (1 - alpha) / runs)


# ---- the error budget: share_e_value / anytime_exceeds_share


@pytest.mark.parametrize(
    ("bad", "n", "share", "prior"),
    [
        (0, 10, 0.01, None),
        (3, 100, 0.01, None),
        (10, 300, 0.01, None),
        (0, 1000, 0.01, None),
        (30, 1000, 0.01, None),
        (5, 5, 0.01, None),
        (12, 200, 0.05, None),
        (40, 100, 0.3, None),
        (70, 100, 0.5, None),
        (99, 100, 0.9, None),
        (7, 300, 0.01, (1.0, 1.0)),  # a uniform prior
        (7, 300, 0.01, (20.0, 500.0)),
    ],
)
def test_share_e_value_is_the_numerically_integrated_mixture(
    bad: int, n: int, share: float, prior: tuple[float, float] | None
) -> None:
    want = mixture_by_quad(bad, n, share, prior or default_share_prior(share))
    assert share_e_value(bad, n, share, prior=prior) == pytest.approx(want, rel=1e-8)
    assert anytime_exceeds_share(bad, n, share, prior=prior) == pytest.approx(min(1.0, 1 / want), rel=1e-8)


def test_default_prior_has_mean_twice_the_share_and_sd_the_share() -> None:
    for share in (1e-4, 0.001, 0.01, 0.05, 0.2, 1 / 3):
        a, b = default_share_prior(share)
        assert stats.beta.mean(a, b) == pytest.approx(2 * share)
        assert stats.beta.std(a, b) == pytest.approx(share)
    for share in (0.5, 0.9, 0.999):  # above 1/3: halfway to 1, still a proper Beta
        a, b = default_share_prior(share)
        assert a > 0 and b > 0
        assert stats.beta.mean(a, b) == pytest.approx((1 + share) / 2)


@pytest.mark.parametrize("bad", [0, 50_000, 99_000, 100_000, 100_500, 101_000, 103_000])
def test_share_e_value_is_stable_at_ten_million_requests(bad: int) -> None:
    """n = 10 M against a 1 % budget: the log evidence equals a log-space integration, including far
    below the budget where the incomplete beta underflows (E is tiny, not 0) and where E overflows."""
    n, share = 10_000_000, 0.01
    e = share_e_value(bad, n, share)
    want = log_mixture_by_quad(bad, n, share, default_share_prior(share))
    assert 0 < e < math.inf
    assert math.log(e) == pytest.approx(want, rel=1e-6, abs=1e-6)
    if bad <= share * n:  # at or below the budget the likelihood ratio is <= 1 for every p > share
        assert e <= 1 and anytime_exceeds_share(bad, n, share) == 1.0


def test_share_e_value_overflow_and_extremes_are_clean() -> None:
    n = 10_000_000
    assert share_e_value(120_000, n, 0.01) == math.inf  # log E ~ 1.9e3
    assert anytime_exceeds_share(120_000, n, 0.01) == 0.0
    assert anytime_exceeds_share(n, n, 0.01) == 0.0
    assert share_e_value(0, n, 0.01) > 0  # tiny, but not an underflowed 0 (log E ~ -12.4)
    for share in (1e-9, 1 - 1e-9):
        for bad, k in ((0, 10), (10, 10), (3, 10)):
            p = anytime_exceeds_share(bad, k, share)
            assert 0.0 <= p <= 1.0


def test_edge_cases_and_invalid_arguments() -> None:
    assert share_e_value(0, 0, 0.01) == 1.0
    assert anytime_exceeds_share(0, 0, 0.01) == 1.0
    assert anytime_exceeds_rate_ratio(0, 0, 0, 0, 2.0) == 1.0
    assert anytime_exceeds_rate_ratio(0, 1000, 0, 1000, 2.0) == 1.0
    assert anytime_exceeds_rate_ratio(5, 1000, 0, 0, 2.0) == 1.0
    assert srm_p_value(0, 0, 0.1) == 1.0
    for share in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="share must be strictly between 0 and 1"):
            anytime_exceeds_share(1, 10, share)
        with pytest.raises(ValueError, match="share must be strictly between 0 and 1"):
            share_e_value(0, 0, share)
        with pytest.raises(ValueError, match="canary_share must be strictly between 0 and 1"):
            srm_p_value(10, 90, share)
    with pytest.raises(ValueError, match="0 <= bad <= n"):
        anytime_exceeds_share(11, 10, 0.01)
    with pytest.raises(ValueError, match="0 <= bad <= n"):
        anytime_exceeds_share(-1, 10, 0.01)
    with pytest.raises(ValueError, match="prior"):
        anytime_exceeds_share(1, 10, 0.01, prior=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio must be positive"):
        anytime_exceeds_rate_ratio(1, 10, 1, 10, 0.0)
    with pytest.raises(ValueError, match="k must be positive"):
        srm_p_value(10, 90, 0.1, k=0)


@pytest.mark.parametrize(("per_look", "alpha"), [(900, 0.01), (50, 0.01), (300, 0.1)])
def test_anytime_share_holds_its_level_over_40_looks(per_look: int, alpha: float) -> None:
    """At exactly the budget, cumulative counts tested at each of 40 looks: the fraction of runs that
    EVER reach p <= alpha stays below alpha; the per-poll exact test on the same looks does not."""
    share, runs = 0.01, 20_000
    rng = np.random.default_rng(per_look)
    ever, _ = ever_rejects(rng, share, per_look, critical_counts(per_look, LOOKS, share, alpha), runs)
    assert ever.mean() <= alpha + margin(alpha, runs)
    # the check has teeth: the fixed-horizon exact binomial test, repeated at every look, breaks it
    naive, _ = ever_rejects(rng, share, per_look, critical_counts(per_look, LOOKS, share, alpha, exceeds_share), runs)
    assert naive.mean() > alpha + margin(alpha, runs)


def test_anytime_share_has_power_at_2x_and_5x_the_budget() -> None:
    """The default guardrail's traffic (900 canary requests per 30 s poll, 40 polls): a canary at 2x
    the 1 % budget is caught in nearly every run within a few polls; at 5x nearly always at the first."""
    share, alpha, per_look, runs = 0.01, 0.01, 900, 4000
    rng = np.random.default_rng(5)
    crit = critical_counts(per_look, LOOKS, share, alpha)
    ever, first = ever_rejects(rng, 2 * share, per_look, crit, runs)
    assert ever.mean() >= 0.99
    assert np.median(first[ever]) <= 3
    ever, first = ever_rejects(rng, 5 * share, per_look, crit, runs)
    assert ever.mean() == 1.0
    assert np.mean(first == 1) >= 0.95
    # and with little traffic (the demo's 30 canary requests/s, 12 looks of 3 s): 5x within 360 requests
    crit = critical_counts(30, 12, share, alpha)
    ever, _ = ever_rejects(rng, 5 * share, 30, crit, runs)
    assert ever.mean() >= 0.85


def test_default_prior_is_faster_than_a_flat_one_at_2x() -> None:
    """The reason for the default prior: at 2x the budget it needs fewer requests than a uniform prior."""
    share, alpha, per_look, runs = 0.01, 0.01, 100, 2000
    rng = np.random.default_rng(8)
    bad = np.cumsum(rng.binomial(per_look, 2 * share, (runs, 200)), axis=1)

    def median_looks(prior: tuple[float, float] | None) -> float:
        crit = np.array(
            [
                first_rejecting(
                    per_look * t, lambda x, t=t: anytime_exceeds_share(x, per_look * t, share, prior=prior) <= alpha
                )
                for t in range(1, 201)
            ]
        )
        hit = bad >= crit
        return float(np.median(np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 201)))

    assert median_looks(None) < 0.8 * median_looks((1.0, 1.0))
    assert median_looks(None) <= median_looks(beta_with(4 * share, 2 * share))


# ---- the error-rate ratio against the baseline


@pytest.mark.parametrize(
    ("bad_c", "n_c", "bad_b", "n_b", "ratio"),
    [(12, 1000, 20, 10_000, 2.0), (3, 500, 10, 5000, 1.5), (40, 2000, 40, 2000, 1.0), (9, 2000, 30, 18_000, 2.0)],
)
def test_anytime_rate_ratio_is_the_conditional_mixture(
    bad_c: int, n_c: int, bad_b: int, n_b: int, ratio: float
) -> None:
    pi0 = ratio * n_c / (ratio * n_c + n_b)
    want = mixture_by_quad(bad_c, bad_c + bad_b, pi0, default_share_prior(pi0))
    assert anytime_exceeds_rate_ratio(bad_c, n_c, bad_b, n_b, ratio) == pytest.approx(min(1.0, 1 / want), rel=1e-8)


def test_anytime_rate_ratio_holds_its_level_and_has_power_over_40_looks() -> None:
    """Canary at exactly ratio x the baseline's error rate (10 % of the traffic), cumulative counts at 40
    looks: it ever fails at most alpha of the runs; at 3x the allowed ratio it fails almost always."""
    alpha, ratio, rate_b, runs = 0.01, 2.0, 0.005, 20_000
    per_c, per_b = 300, 2700
    rng = np.random.default_rng(21)

    def simulate(rate_c: float) -> np.ndarray:
        bad_c = np.cumsum(rng.binomial(per_c, rate_c, (runs, LOOKS)), axis=1)
        bad_b = np.cumsum(rng.binomial(per_b, rate_b, (runs, LOOKS)), axis=1)
        m = bad_c + bad_b
        top = int(m.max())
        # per look t and total m, the smallest canary count that fails (the p-value rises as bad_c falls)
        crit = np.full((LOOKS, top + 1), top + 1)
        for t in range(LOOKS):
            n_c, n_b = per_c * (t + 1), per_b * (t + 1)
            for total in np.unique(m[:, t]):
                total = int(total)
                crit[t, total] = first_rejecting(
                    total,
                    lambda x, total=total, n_c=n_c, n_b=n_b: (
                        anytime_exceeds_rate_ratio(x, n_c, total - x, n_b, ratio) <= alpha
                    ),
                )
        return (bad_c >= crit[np.arange(LOOKS), m]).any(axis=1)

    assert simulate(ratio * rate_b).mean() <= alpha + margin(alpha, runs)
    runs = 2000
    assert simulate(3 * ratio * rate_b).mean() >= 0.95


# ---- sample ratio mismatch


def srm_by_quad(canary: int, baseline: int, share: float, k: float = 100.0) -> float:
    """The Bayes factor ∫ Beta(θ; k share, k (1 - share)) (θ/share)^c ((1-θ)/(1-share))^b dθ, numerically."""
    a, b = k * share, k * (1 - share)

    def f(t: float) -> float:
        return (t / share) ** canary * ((1 - t) / (1 - share)) ** baseline * stats.beta.pdf(t, a, b)

    peak = (canary + a - 1) / (canary + baseline + a + b - 2)
    bf = integrate.quad(f, 0, 1, points=[peak] if 0 < peak < 1 else None, limit=500, epsabs=0, epsrel=1e-12)[0]
    return min(1.0, 1 / bf)


@pytest.mark.parametrize(
    ("canary", "baseline", "share"), [(5, 95, 0.1), (20, 80, 0.1), (0, 50, 0.1), (60, 40, 0.5), (30, 270, 0.1)]
)
def test_srm_is_the_numerically_integrated_bayes_factor(canary: int, baseline: int, share: float) -> None:
    assert srm_p_value(canary, baseline, share) == pytest.approx(srm_by_quad(canary, baseline, share), rel=1e-8)


@pytest.mark.parametrize(
    ("canary", "baseline", "share", "mismatch"),
    [
        (1000, 19_000, 0.1, True),  # a 10 % split observed as 5 %
        (10_000, 190_000, 0.1, True),
        (2000, 18_000, 0.1, False),  # exactly the split
        (2030, 17_970, 0.1, False),  # 0.75 sd off
        (5050, 4950, 0.5, False),  # 1 sd off
        (4500, 5500, 0.5, True),
    ],
)
def test_srm_agrees_with_chisquare_on_clear_cases(canary: int, baseline: int, share: float, mismatch: bool) -> None:
    total = canary + baseline
    chi = stats.chisquare([canary, baseline], [share * total, (1 - share) * total]).pvalue
    p = srm_p_value(canary, baseline, share)
    if mismatch:
        assert chi < 1e-6 and p < 1e-3
    else:
        assert chi > 0.3 and p > 0.3
        assert p >= chi  # the anytime-valid test is the more cautious one


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_srm_holds_its_level_with_repeated_looks(share: float) -> None:
    """Requests split exactly as configured, 300 per look, 40 looks: the fraction of runs where the SRM
    p-value is ever <= alpha stays below alpha; a chi-square repeated at every look does not."""
    alpha, per_look, runs = 0.01, 300, 20_000
    rng = np.random.default_rng(int(100 * share))
    canary = np.cumsum(rng.binomial(per_look, share, (runs, LOOKS)), axis=1)
    lows, highs, chi_lows, chi_highs = [], [], [], []
    for t in range(1, LOOKS + 1):
        total = per_look * t
        mode = round(share * total)
        assert srm_p_value(mode, total - mode, share) > alpha
        for test, lo_out, hi_out in (
            (lambda c, total=total: srm_p_value(c, total - c, share) <= alpha, lows, highs),
            (
                lambda c, total=total: (
                    stats.chisquare([c, total - c], [share * total, (1 - share) * total]).pvalue <= alpha
                ),
                chi_lows,
                chi_highs,
            ),
        ):
            # both rejection regions are two tails around the expected count (log BF is convex in c)
            hi_out.append(mode + first_rejecting(total - mode, lambda d, test=test, mode=mode: test(mode + d)))
            lo_out.append(mode - first_rejecting(mode, lambda d, test=test, mode=mode: test(mode - d)))
    ever = ((canary <= np.array(lows)) | (canary >= np.array(highs))).any(axis=1)
    assert ever.mean() <= alpha + margin(alpha, runs)
    naive = ((canary <= np.array(chi_lows)) | (canary >= np.array(chi_highs))).any(axis=1)
    assert naive.mean() > alpha + margin(alpha, runs)


def test_srm_matches_savvi_multinomial() -> None:
    """savvi's Multinomial (Lindon & Malek's construction), fed per-poll increments: its p-value (1 / the
    Bayes factor it multiplies up poll by poll) equals ours on the cumulative counts at every look.
    (savvi 0.3.1 imports matplotlib without declaring it; its ``infer()`` also solves a confidence set
    with cvxpy, which is not compared here.)"""
    multinomial = pytest.importorskip("savvi.multinomial")
    rng = np.random.default_rng(4)
    for share, observed in ((0.1, 0.1), (0.1, 0.085), (0.5, 0.47), (0.05, 0.05), (0.1, 0.07)):
        m = multinomial.Multinomial(0.01, theta_0=np.array([1 - share, share]), k=100)
        canary = baseline = 0
        for _ in range(LOOKS):
            c = int(rng.binomial(300, observed))
            m.update(np.array([300 - c, c]))
            canary, baseline = canary + c, baseline + 300 - c
            theirs = min(1.0, float(m.calculate_p_value()))
            assert srm_p_value(canary, baseline, share) == pytest.approx(theirs, rel=1e-9, abs=1e-300)
        if observed != share:  # the mismatched splits end far below any alpha
            assert srm_p_value(canary, baseline, share) < 1e-3
