"""Count tests for the fast guardrails: is the canary's share of bad requests beyond what is allowed?"""

from __future__ import annotations

from scipy import stats


def exceeds_share(bad: int, n: int, share: float) -> float:
    """One-sided exact binomial p-value of H0: P(bad) <= ``share``, i.e. P(X >= bad), X ~ Bin(n, share).

    Used for the error budget (failures against 1 - success_rate_min) and for the canary's requests
    slower than the baseline's P99 times the allowed ratio (against 1 %). 1.0 when n is 0.
    """
    if n <= 0 or bad <= 0:
        return 1.0
    return float(stats.binomtest(int(bad), int(n), share, alternative="greater").pvalue)


def exceeds_rate_ratio(bad_c: int, n_c: int, bad_b: int, n_b: int, ratio: float) -> float:
    """One-sided p-value of H0: rate_c / rate_b <= ``ratio``, conditional on the total bad count.

    Given m = bad_c + bad_b, bad_c ~ Bin(m, pi0) with pi0 = ratio n_c / (ratio n_c + n_b) under H0
    (the exact conditional test for two Poisson rates; statsmodels' ``test_poisson_2indep``,
    method ``exact-cond``). 1.0 when there is nothing to test.
    """
    m = bad_c + bad_b
    if n_c <= 0 or n_b <= 0 or m <= 0 or bad_c <= 0:
        return 1.0
    pi0 = ratio * n_c / (ratio * n_c + n_b)
    return float(stats.binomtest(int(bad_c), int(m), pi0, alternative="greater").pvalue)
