"""Count tests for the fast guardrails: is the canary's share of bad requests beyond what is allowed?"""

from __future__ import annotations

import math

from scipy import special, stats


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


# Anytime-valid versions, for counts accumulated since a stage started: one test per stage, not per poll.


def _check_share(share: float, what: str = "share") -> None:
    if not 0.0 < share < 1.0:  # also rejects NaN
        raise ValueError(f"{what} must be strictly between 0 and 1, got {share!r}")


def _check_counts(bad: float, n: float) -> None:
    if not 0 <= bad <= n:
        raise ValueError(f"counts must satisfy 0 <= bad <= n, got bad={bad!r}, n={n!r}")


def default_share_prior(share: float) -> tuple[float, float]:
    """The Beta(a, b) that :func:`share_e_value` mixes over (before truncating it to (share, 1)).

    Mean ``share + d`` and standard deviation ``d`` with d = min(share, (1 - share) / 2): mean 2 x share
    and sd share for shares up to 1/3 (e.g. Beta(3.9, 191.1) for a 1 % budget), and halfway between
    the share and 1 above, where 2 x share would not be a probability.
    """
    _check_share(share)
    d = min(share, (1.0 - share) / 2.0)
    mean = share + d
    nu = mean * (1.0 - mean) / (d * d) - 1.0  # a + b; > 0 since d² < mean (1 - mean) for every share
    return mean * nu, (1.0 - mean) * nu


def _log_upper_tail_cf(a: float, b: float, x: float) -> float:
    """log P(Beta(a, b) > x) by the continued fraction of I_{1-x}(b, a) (Numerical Recipes §6.4, betacf)
    in logs, for the far upper tail where ``betaincc`` underflows (it converges fast there)."""
    aa, bb, y = b, a, 1.0 - x  # I_{1-x}(b, a) = P(Beta(a, b) > x)
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = aa + bb, aa + 1.0, aa - 1.0
    c, d = 1.0, 1.0 - qab * y / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for num in (
            m * (bb - m) * y / ((qam + m2) * (aa + m2)),
            -(aa + m) * (qab + m) * y / ((aa + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            step = d * c
            h *= step
        if abs(step - 1.0) < eps:
            break
    return aa * math.log(y) + bb * math.log(x) - math.log(aa) - float(special.betaln(aa, bb)) + math.log(h)


def _log_upper_tail(a: float, b: float, x: float) -> float:
    """log P(Beta(a, b) > x), exact where the regularized incomplete beta is representable."""
    tail = float(special.betaincc(a, b, x))
    if tail > 1e-250:
        return math.log(tail)
    return _log_upper_tail_cf(a, b, x)


def _log_share_e(bad: float, n: float, share: float, prior: tuple[float, float] | None) -> float:
    _check_share(share)
    _check_counts(bad, n)
    a, b = default_share_prior(share) if prior is None else prior
    if not (a > 0 and b > 0):
        raise ValueError(f"prior must be Beta(a, b) with a, b > 0, got {prior!r}")
    if n == 0:
        return 0.0
    good = n - bad
    return (
        float(special.betaln(a + bad, b + good))
        - float(special.betaln(a, b))
        + _log_upper_tail(a + bad, b + good, share)
        - _log_upper_tail(a, b, share)
        - bad * math.log(share)
        - good * math.log1p(-share)
    )


def share_e_value(bad: int, n: int, share: float, *, prior: tuple[float, float] | None = None) -> float:
    """Anytime-valid evidence against H0: P(bad) <= ``share`` from cumulative counts (an e-value).

    The mixture likelihood ratio E = ∫ (p/share)^bad ((1-p)/(1-share))^(n-bad) dπ(p) over a Beta(a, b)
    prior truncated to (share, 1), in closed form B(a+bad, b+n-bad) Ī_share(a+bad, b+n-bad) /
    (B(a, b) Ī_share(a, b) share^bad (1-share)^(n-bad)) with Ī the upper regularized incomplete beta,
    in logs (Robbins 1970 mixtures; Howard, Ramdas et al. 2021, "Time-uniform, nonparametric,
    nonasymptotic confidence sequences", Ann. Stat.). Each p > share gives a likelihood ratio that
    is a nonnegative supermartingale under any P(bad) <= share, so the mixture is one too, and by
    Ville's inequality P(E ever >= 1/alpha) <= alpha however often it is looked at.

    ``prior`` is the Beta(a, b) before truncation; by default :func:`default_share_prior`, mean 2 x share
    and sd share: its mass sits on 1.5x-5x the budget, where the guardrail must be fast (the time to
    detect a rate r is governed by the prior density near r). Simulated at a 1 % budget, it needs
    about 0.6x the requests of a uniform prior at 2x the budget, and at 3x-10x within 30 requests of
    the best of seven priors tried.
    1.0 when n is 0; ``inf`` past ~1e308 (use :func:`anytime_exceeds_share` for the p-value).
    """
    log_e = _log_share_e(bad, n, share, prior)
    return math.inf if log_e > 709.0 else math.exp(log_e)


def anytime_exceeds_share(bad: int, n: int, share: float, *, prior: tuple[float, float] | None = None) -> float:
    """Anytime-valid p-value of H0: P(bad) <= ``share``: min(1, 1/E) with E = :func:`share_e_value`.

    P(this p-value is ever <= alpha) <= alpha under H0 (Ville), so a stage may test its cumulative
    counts at every poll and fail on the first p <= alpha. 1.0 when n is 0.
    """
    return math.exp(-max(0.0, _log_share_e(bad, n, share, prior)))


def anytime_exceeds_rate_ratio(
    bad_c: int, n_c: int, bad_b: int, n_b: int, ratio: float, *, prior: tuple[float, float] | None = None
) -> float:
    """Anytime-valid p-value of H0: rate_c / rate_b <= ``ratio``, from cumulative counts of both arms.

    As :func:`exceeds_rate_ratio`: given m = bad_c + bad_b failures, each is the canary's with
    probability pi0 = ratio n_c / (ratio n_c + n_b) at most under H0 (the conditional test for two
    Poisson rates), so p = min(1, 1/E) with E = :func:`share_e_value` (bad_c, m, pi0). Valid while the
    canary's share of the traffic is constant (one stage); 1.0 when there is nothing to test.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio!r}")
    if min(bad_c, bad_b, n_c, n_b) < 0 or bad_c > n_c or bad_b > n_b:
        raise ValueError(f"counts must satisfy 0 <= bad <= n, got {bad_c!r}/{n_c!r} and {bad_b!r}/{n_b!r}")
    m = bad_c + bad_b
    if n_c <= 0 or n_b <= 0 or m <= 0:
        return 1.0
    pi0 = ratio * n_c / (ratio * n_c + n_b)
    return anytime_exceeds_share(bad_c, m, pi0, prior=prior)


def srm_p_value(canary: int, baseline: int, canary_share: float, k: float = 100.0) -> float:
    """Anytime-valid sample-ratio-mismatch p-value: are the arms' request counts off the configured split?

    The Dirichlet-multinomial mixture Bayes factor of Lindon & Malek (2022, "Anytime-valid inference
    for multinomial count data", NeurIPS), two arms, as savvi's ``Multinomial(alpha, theta_0, k)``:
    BF = B(k theta0 + x) / B(k theta0) / prod theta0_i^x_i (B the multivariate beta function), in logs;
    p = min(1, 1/BF) on cumulative counts. It is valid at every look; a caller that looks repeatedly
    may keep the running minimum (savvi's ``infer``). 1.0 without requests.
    """
    _check_share(canary_share, "canary_share")
    if not k > 0:
        raise ValueError(f"k must be positive, got {k!r}")
    if canary < 0 or baseline < 0:
        raise ValueError(f"counts must be nonnegative, got canary={canary!r}, baseline={baseline!r}")
    if canary + baseline == 0:
        return 1.0
    t_c, t_b = canary_share, 1.0 - canary_share
    log_bf = (
        float(special.betaln(k * t_c + canary, k * t_b + baseline))
        - float(special.betaln(k * t_c, k * t_b))
        - canary * math.log(t_c)
        - baseline * math.log(t_b)
    )
    return math.exp(-max(0.0, log_bf))
