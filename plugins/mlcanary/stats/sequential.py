"""Anytime-valid inference: an asymptotic confidence sequence for an estimate with a standard error.

Waudby-Smith, Arnold, Wu, Ramdas, Howard (2023), "Time-uniform central limit theory and asymptotic
confidence sequences", arXiv 2103.06476, as GrowthBook implements it: the fixed-horizon z becomes

    z_n = sqrt( 2 (n rho² + 1) / (n rho²) * ln( sqrt(n rho² + 1) / alpha ) ),
    rho² = ( -2 ln alpha + ln(-2 ln alpha + 1) ) / n_star,

so that theta_hat +- z_n * SE covers theta at every n at once with probability >= 1 - alpha
(asymptotically). ``n_star`` is the sample size at which the sequence is tightest.
"""

from __future__ import annotations

import math


def _rho2(alpha: float, n_star: float) -> float:
    return (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / n_star


def cs_multiplier(n: float, alpha: float, n_star: float) -> float:
    """The z that replaces the fixed-horizon z_{1-alpha} after ``n`` observations."""
    if n <= 0:
        return math.inf
    a = n * _rho2(alpha, n_star)
    return math.sqrt(2 * (a + 1) / a * math.log(math.sqrt(a + 1) / alpha))


def anytime_p_value(t: float, n: float, alpha: float, n_star: float) -> float:
    """One-sided anytime-valid p-value for a standardised distance ``t`` = (theta_hat - bound) / SE.

    The smallest level at which the sequence (with rho tuned for ``alpha``) excludes the bound:
    sqrt(n rho² + 1) * exp(-t² n rho² / (2 (n rho² + 1))), and 1 when ``t`` points the other way.
    """
    if t == math.inf:
        return 0.0
    if n <= 0 or not t > 0:
        return 1.0
    a = n * _rho2(alpha, n_star)
    return min(1.0, math.sqrt(a + 1) * math.exp(-t * t * a / (2 * (a + 1))))
