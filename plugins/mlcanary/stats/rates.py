"""Comparing two rates (CTR, conversion, error rate) by their ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class RateRatio:
    canary_rate: float
    baseline_rate: float
    ratio: float  # canary / baseline
    ci_low: float  # two-sided 1 - 2*alpha interval: each bound is a one-sided alpha test
    ci_high: float


def rate_ratio(x_c: float, n_c: int, x_b: float, n_b: int, alpha: float = 0.05) -> RateRatio:
    """Ratio of two proportions with the Katz log interval.

    log(p_c/p_b) +- z_{1-alpha} sqrt(1/x_c - 1/n_c + 1/x_b - 1/n_b) (Katz et al. 1978; statsmodels
    ``confint_proportions_2indep(compare="ratio", method="log")``). With a zero count, 0.5 is added to
    each count and 1 to each n (Haldane-Anscombe). Empty arms give NaN.
    """
    nan = float("nan")
    if n_c <= 0 or n_b <= 0:
        return RateRatio(nan, nan, nan, nan, nan)
    p_c, p_b = x_c / n_c, x_b / n_b
    if x_c == 0 or x_b == 0:
        x_c, x_b, n_c, n_b = x_c + 0.5, x_b + 0.5, n_c + 1, n_b + 1
    log_ratio = math.log((x_c / n_c) / (x_b / n_b))
    se = math.sqrt(max(1 / x_c - 1 / n_c + 1 / x_b - 1 / n_b, 0.0))
    z = stats.norm.ppf(1 - alpha)
    ratio = p_c / p_b if p_b > 0 else math.exp(log_ratio)
    return RateRatio(p_c, p_b, ratio, math.exp(log_ratio - z * se), math.exp(log_ratio + z * se))


def mean_ratio(
    n_c: int, sum_c: float, sumsq_c: float, n_b: int, sum_b: float, sumsq_b: float, alpha: float = 0.05
) -> RateRatio:
    """Ratio of two means (e.g. mean absolute error) from count, sum and sum of squares.

    Delta method on the log ratio: log(m_c/m_b) +- z_{1-alpha} sqrt(s_c²/(n_c m_c²) + s_b²/(n_b m_b²)),
    with s² the sample variance (n - 1). For 0/1 values this is the Katz interval of
    :func:`rate_ratio`. Needs positive means; otherwise NaN.
    """
    nan = float("nan")
    if n_c < 2 or n_b < 2:
        return RateRatio(nan, nan, nan, nan, nan)
    m_c, m_b = sum_c / n_c, sum_b / n_b
    if m_c <= 0 or m_b <= 0:
        return RateRatio(m_c, m_b, nan, nan, nan)
    var_c = max(sumsq_c - n_c * m_c * m_c, 0.0) / (n_c - 1)
    var_b = max(sumsq_b - n_b * m_b * m_b, 0.0) / (n_b - 1)
    se = math.sqrt(var_c / (n_c * m_c * m_c) + var_b / (n_b * m_b * m_b))
    z = stats.norm.ppf(1 - alpha)
    log_ratio = math.log(m_c / m_b)
    return RateRatio(m_c, m_b, m_c / m_b, math.exp(log_ratio - z * se), math.exp(log_ratio + z * se))
