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
