"""Ratio and count statistics against independent oracles (statsmodels, brute force) and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats import rates as sm_rates
from statsmodels.stats.proportion import confint_proportions_2indep

from mlcanary.stats.counts import exceeds_rate_ratio, exceeds_share
from mlcanary.stats.gate import weigh
from mlcanary.stats.rates import LogRatio, mean_log_ratio, rate_log_ratio


def interval(r: LogRatio, alpha: float = 0.05) -> tuple[float, float]:
    """The fixed-horizon interval of canary/baseline as the analysis builds it (``weigh`` on the log ratio)."""
    ev = weigh(r.theta, r.se, 0.0, True, alpha, n=1)
    return math.exp(ev.low), math.exp(ev.high)


@pytest.mark.parametrize(
    ("x_c", "n_c", "x_b", "n_b", "alpha"),
    [
        (1880, 100_000, 40_000, 2_000_000, 0.05),
        (30, 400, 90, 1000, 0.05),
        (5, 50, 500, 1000, 0.025),
        (900, 1000, 870, 1000, 0.1),
    ],
)
def test_rate_ratio_matches_statsmodels_log_interval(x_c: int, n_c: int, x_b: int, n_b: int, alpha: float) -> None:
    low, high = confint_proportions_2indep(x_c, n_c, x_b, n_b, compare="ratio", method="log", alpha=2 * alpha)
    r = rate_log_ratio(x_c, n_c, x_b, n_b)
    assert interval(r, alpha) == pytest.approx((low, high), rel=1e-9)
    assert math.exp(r.theta) == pytest.approx((x_c / n_c) / (x_b / n_b))


def test_rate_ratio_research_example() -> None:
    # statistics.md §3.1: baseline 2.00 %, canary 1.88 %: significantly lower, but the 95 % upper bound
    # of the ratio is above 0.95, so "more than 5 % worse" is not shown.
    low, high = interval(rate_log_ratio(1880, 100_000, 40_000, 2_000_000), 0.025)
    assert high < 1.0
    assert low < 0.95 < high


def test_rate_ratio_zero_counts_and_empty_arms() -> None:
    r = rate_log_ratio(0, 1000, 200, 1000)
    assert r.canary == 0 and math.isfinite(interval(r)[1]) and interval(r)[1] < 0.05
    assert all(math.isnan(v) for v in vars(rate_log_ratio(0, 0, 10, 100)).values())


def test_mean_ratio_equals_a_raw_data_delta_method() -> None:
    rng = np.random.default_rng(3)
    c = rng.gamma(2.0, 3.0, 5000)
    b = rng.gamma(2.0, 2.8, 20000)
    r = mean_log_ratio(len(c), c.sum(), (c * c).sum(), len(b), b.sum(), (b * b).sum())
    se = math.sqrt(c.var(ddof=1) / (len(c) * c.mean() ** 2) + b.var(ddof=1) / (len(b) * b.mean() ** 2))
    z = 1.6448536269514722
    assert math.exp(r.theta) == pytest.approx(c.mean() / b.mean())
    low, high = interval(r)
    assert low == pytest.approx(c.mean() / b.mean() * math.exp(-z * se), rel=1e-9)
    assert high == pytest.approx(c.mean() / b.mean() * math.exp(z * se), rel=1e-9)


def test_mean_ratio_of_binary_values_is_the_rate_interval() -> None:
    rng = np.random.default_rng(4)
    c, b = (rng.uniform(size=4000) < 0.2).astype(float), (rng.uniform(size=9000) < 0.25).astype(float)
    m = interval(mean_log_ratio(len(c), c.sum(), c.sum(), len(b), b.sum(), b.sum()))
    r = interval(rate_log_ratio(c.sum(), len(c), b.sum(), len(b)))
    assert m == pytest.approx(r, rel=2e-3)


def test_mean_ratio_degenerate_inputs_are_nan() -> None:
    assert math.isnan(mean_log_ratio(1, 1.0, 1.0, 10, 5.0, 5.0).theta)
    assert math.isnan(interval(mean_log_ratio(10, 0.0, 0.0, 10, 5.0, 5.0))[0])


@pytest.mark.parametrize("kind", ["rate", "mean"])
def test_interval_coverage_by_simulation(kind: str) -> None:
    """Each one-sided bound must hold at least ~1 - alpha of the time (2,000 simulated comparisons)."""
    rng = np.random.default_rng(11)
    alpha, runs, misses_low, misses_high = 0.05, 2000, 0, 0
    for _ in range(runs):
        if kind == "rate":
            p_c, p_b, n_c, n_b = 0.18, 0.2, 3000, 12000
            x_c, x_b = rng.binomial(n_c, p_c), rng.binomial(n_b, p_b)
            r, truth = rate_log_ratio(x_c, n_c, x_b, n_b), p_c / p_b
        else:
            c, b = rng.exponential(5.5, 2000), rng.exponential(5.0, 8000)
            r = mean_log_ratio(len(c), c.sum(), (c * c).sum(), len(b), b.sum(), (b * b).sum())
            truth = 5.5 / 5.0
        low, high = interval(r, alpha)
        misses_low += low > truth
        misses_high += high < truth
    # binomial(2000, 0.05): mean 100, sd 9.7 -> allow 0.05 +- ~3.5 sd
    for misses in (misses_low, misses_high):
        assert 0.033 < misses / runs < 0.068, (kind, misses_low, misses_high)


@pytest.mark.parametrize(("bad", "n", "share"), [(3, 100, 0.01), (0, 50, 0.02), (9, 300, 0.02), (900, 30_000, 0.02)])
def test_error_budget_p_value_is_the_binomial_tail(bad: int, n: int, share: float) -> None:
    """Brute force: P(X >= bad) summed term by term from the binomial pmf (in logs, for large n)."""

    def log_pmf(k: int) -> float:
        return (
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * math.log(share)
            + (n - k) * math.log1p(-share)
        )

    tail = math.fsum(math.exp(log_pmf(k)) for k in range(bad, n + 1))
    assert exceeds_share(bad, n, share) == pytest.approx(min(tail, 1.0), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(
    ("bad_c", "n_c", "bad_b", "n_b", "ratio"),
    [(12, 1000, 20, 10_000, 2.0), (3, 500, 10, 5000, 1.5), (40, 2000, 40, 2000, 1.0), (1, 200, 0, 2000, 2.0)],
)
def test_rate_ratio_test_matches_statsmodels_exact_conditional(
    bad_c: int, n_c: int, bad_b: int, n_b: int, ratio: float
) -> None:
    want = sm_rates.test_poisson_2indep(
        bad_c, n_c, bad_b, n_b, value=ratio, method="exact-cond", alternative="larger"
    ).pvalue
    assert exceeds_rate_ratio(bad_c, n_c, bad_b, n_b, ratio) == pytest.approx(want, rel=1e-9)


def test_count_tests_hold_their_level_by_simulation() -> None:
    """A canary exactly at its error budget, or exactly at the allowed ratio, fails a poll at most
    alpha of the time (2,000 simulated polls each)."""
    rng = np.random.default_rng(11)
    alpha, n, budget = 0.01, 2000, 0.01
    at_budget = np.mean([exceeds_share(int(x), n, budget) <= alpha for x in rng.binomial(n, budget, 2000)])
    assert at_budget <= alpha
    n_c, n_b, rate_b, ratio = 2000, 18_000, 0.005, 2.0
    fails = [
        exceeds_rate_ratio(int(c), n_c, int(b), n_b, ratio) <= alpha
        for c, b in zip(rng.binomial(n_c, ratio * rate_b, 2000), rng.binomial(n_b, rate_b, 2000), strict=True)
    ]
    assert np.mean(fails) <= alpha
    # and they have power: 3 % errors against a 1 % budget fail nearly every poll
    assert np.mean([exceeds_share(int(x), n, budget) <= alpha for x in rng.binomial(n, 0.03, 500)]) > 0.99
