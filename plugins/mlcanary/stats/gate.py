"""Turning an estimate into evidence against a tolerance bound: an interval and two p-values."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from mlcanary.stats.sequential import anytime_p_value, cs_multiplier


@dataclass(frozen=True)
class Evidence:
    low: float  # interval on the test scale: each side is a one-sided alpha bound
    high: float
    p_worse: float  # small: the estimate is beyond the bound on the bad side (-> FAIL)
    p_within: float  # small: the estimate is within the bound (-> PASS)


def weigh(
    theta: float,
    se: float,
    bound: float,
    higher_is_better: bool,
    alpha: float,
    n: float,
    n_star: float | None = None,
) -> Evidence:
    """Test ``theta`` (standard error ``se``) against ``bound`` from both sides.

    Fixed horizon (``n_star`` None): theta +- z_{1-alpha} SE and normal tail p-values.
    Sequential: the two-sided asymptotic confidence sequence at level 2 alpha (so each side is a
    one-sided alpha bound, valid at every ``n`` at once) and its anytime-valid p-values halved, so
    that looking every interval does not inflate the error rates. ``n`` and ``n_star`` count the
    samples of the smaller arm (the canary), which bounds the information.
    """
    if not (math.isfinite(theta) and math.isfinite(se)) or se < 0:
        nan = float("nan")
        return Evidence(nan, nan, 1.0, 1.0)
    z = cs_multiplier(n, 2 * alpha, n_star) if n_star else float(stats.norm.ppf(1 - alpha))
    t_worse = (
        ((bound - theta) if higher_is_better else (theta - bound)) / se
        if se > 0
        else (math.inf if (theta < bound if higher_is_better else theta > bound) else -math.inf)
    )

    def p(t: float) -> float:
        if n_star:
            return anytime_p_value(t, n, 2 * alpha, n_star) / 2
        return float(stats.norm.sf(t))

    return Evidence(theta - z * se, theta + z * se, p(t_worse), p(-t_worse))
