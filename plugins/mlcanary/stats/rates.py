"""Comparing two rates (CTR, conversion, recall) or two means (prediction error) by their ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LogRatio:
    """log(canary / baseline) with its standard error."""

    canary: float
    baseline: float
    theta: float
    se: float


_NAN = float("nan")


def rate_log_ratio(x_c: float, n_c: int, x_b: float, n_b: int) -> LogRatio:
    """Katz: SE of log(p_c/p_b) = sqrt(1/x_c - 1/n_c + 1/x_b - 1/n_b) (Katz et al. 1978).

    With a zero count, 0.5 is added to each count and 1 to each n (Haldane-Anscombe). Empty arms: NaN.
    """
    if n_c <= 0 or n_b <= 0:
        return LogRatio(_NAN, _NAN, _NAN, _NAN)
    p_c, p_b = x_c / n_c, x_b / n_b
    if x_c == 0 or x_b == 0:
        x_c, x_b, n_c, n_b = x_c + 0.5, x_b + 0.5, n_c + 1, n_b + 1
    se = math.sqrt(max(1 / x_c - 1 / n_c + 1 / x_b - 1 / n_b, 0.0))
    return LogRatio(p_c, p_b, math.log((x_c / n_c) / (x_b / n_b)), se)


def mean_log_ratio(n_c: int, sum_c: float, sumsq_c: float, n_b: int, sum_b: float, sumsq_b: float) -> LogRatio:
    """Delta method: SE of log(m_c/m_b) = sqrt(s_c²/(n_c m_c²) + s_b²/(n_b m_b²)), s² with n - 1.

    For 0/1 values this is the Katz SE of :func:`rate_log_ratio`. Needs positive means, else NaN.
    """
    if n_c < 2 or n_b < 2:
        return LogRatio(_NAN, _NAN, _NAN, _NAN)
    m_c, m_b = sum_c / n_c, sum_b / n_b
    if m_c <= 0 or m_b <= 0:
        return LogRatio(m_c, m_b, _NAN, _NAN)
    var_c = max(sumsq_c - n_c * m_c * m_c, 0.0) / (n_c - 1)
    var_b = max(sumsq_b - n_b * m_b * m_b, 0.0) / (n_b - 1)
    se = math.sqrt(var_c / (n_c * m_c * m_c) + var_b / (n_b * m_b * m_b))
    return LogRatio(m_c, m_b, math.log(m_c / m_b), se)
