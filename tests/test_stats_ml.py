"""AUC, calibration, drift, multiple comparisons and sequential inference against independent oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from mlcanary.stats.auc import auc_from_bins
from mlcanary.stats.calibration import ece_from_bins
from mlcanary.stats.drift import EPSILON, drift
from mlcanary.stats.gate import weigh
from mlcanary.stats.multiple import benjamini_hochberg, holm
from mlcanary.stats.sequential import anytime_p_value, cs_multiplier


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.8)))
    return y, s


def _hist(y: np.ndarray, s: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.searchsorted(edges, s, side="right")
    k = len(edges) + 1
    return np.bincount(b, weights=y, minlength=k), np.bincount(b, weights=1 - y, minlength=k)


def _delong_raw(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """DeLong placements on the raw scores (pROC's delong.unpaired), by brute force."""
    pos, neg = s[y == 1], s[y == 0]
    cmp = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = cmp.mean(axis=1), cmp.mean(axis=0)
    return float(v10.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_auc_from_bins_is_exact_when_every_score_has_its_bin() -> None:
    y, s = _scores(1500, 1)
    s = np.round(s, 2)  # ties, as in real scores
    edges = np.unique(s)[1:]
    est = auc_from_bins(*_hist(y, s, edges))
    auc, var = _delong_raw(y, s)
    assert est.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert est.auc == pytest.approx(auc, abs=1e-12)
    assert est.variance == pytest.approx(var, rel=1e-9)


def test_auc_from_100_quantile_bins_is_within_the_research_bound() -> None:
    y, s = _scores(200_000, 2)
    edges = np.quantile(s, np.linspace(0.01, 0.99, 99))
    pos, neg = _hist(y, s, edges)
    est = auc_from_bins(pos, neg)
    exact = roc_auc_score(y, s)
    bound = float((pos * neg).sum() / (2 * pos.sum() * neg.sum()))
    assert abs(est.auc - exact) <= bound
    assert abs(est.auc - exact) < 0.001  # 100 quantile bins: binning error below the 0.02 gate by far
    assert math.sqrt(est.variance) == pytest.approx(math.sqrt(_delong_raw(y[:20000], s[:20000])[1] / 10), rel=0.15)


def test_auc_degenerate_arm_is_nan() -> None:
    assert math.isnan(auc_from_bins(np.array([0, 0]), np.array([5, 5])).auc)


def test_ece_matches_calibration_curve_bins() -> None:
    y, s = _scores(20_000, 3)
    edges = np.quantile(s, np.linspace(0.1, 0.9, 9))
    b = np.searchsorted(edges, s, side="right")
    n = np.bincount(b, minlength=10)
    ece = ece_from_bins(n, np.bincount(b, weights=s, minlength=10), np.bincount(b, weights=y, minlength=10))
    # calibration_curve with strategy="quantile" uses right-closed bins on the same quantiles; rebuild its ECE
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="quantile")
    bins_sk = np.searchsorted(np.quantile(s, np.linspace(0, 1, 11))[1:-1], s, side="left")
    counts_sk = np.bincount(bins_sk, minlength=10)
    oracle = float(np.sum(counts_sk[counts_sk > 0] / len(s) * np.abs(prob_true - prob_pred)))
    assert ece == pytest.approx(oracle, abs=2e-3)  # the two differ only in ties at the edges
    miscal = 1 / (1 + np.exp(-(np.log(s / (1 - s)) + 0.85)))
    ece_bad = ece_from_bins(n, np.bincount(b, weights=miscal, minlength=10), np.bincount(b, weights=y, minlength=10))
    assert ece_bad > ece + 0.1


def test_psi_kl_js_by_brute_force() -> None:
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(size=50_000), rng.normal(0.3, 1.1, size=20_000)
    edges = np.quantile(ref, np.linspace(0.1, 0.9, 9))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=10)
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=10)
    got = drift(r, c)
    p, q = r / r.sum(), c / c.sum()
    assert got.psi == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-6)
    assert got.kl == pytest.approx(stats.entropy(q, p), rel=1e-6)
    m = (p + q) / 2
    assert got.js == pytest.approx((stats.entropy(q, m) + stats.entropy(p, m)) / 2, rel=1e-6)
    assert 0.05 < got.psi < 0.5
    same = drift(r, np.bincount(np.searchsorted(edges, rng.normal(size=20_000), side="right"), minlength=10))
    assert same.psi < 0.01


def test_empty_bins_use_the_documented_epsilon() -> None:
    got = drift(np.array([50, 50, 0]), np.array([40, 40, 20]))
    p = np.array([0.5, 0.5, EPSILON]) / (1 + EPSILON)
    q = np.array([0.4, 0.4, 0.2])
    assert got.psi == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-9)
    assert math.isnan(drift(np.zeros(3), np.ones(3)).psi)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_holm_and_bh_match_statsmodels(alpha: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # multipletests runs a full gc.collect() per call: over a whole suite's heap, 1.2 s each (127 s
    # for this test in a CI run); the collection changes no result
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    rng = np.random.default_rng(5)
    vectors = [[0.001, 0.008, 0.012, 0.03, 0.04, 0.2, 0.5]] + [list(rng.uniform(0, 0.1, 12)) for _ in range(50)]
    for p in vectors:
        assert holm(p, alpha) == list(multipletests(p, alpha, method="holm")[0])
        assert benjamini_hochberg(p, alpha) == list(multipletests(p, alpha, method="fdr_bh")[0])
    # research/statistics.md §3.4: Holm rejects 2, BH 3 of this vector at 0.05
    assert sum(holm(vectors[0], 0.05)) == 2 and sum(benjamini_hochberg(vectors[0], 0.05)) == 3


def test_anytime_p_value_is_the_sequence_boundary() -> None:
    for n in (100, 5000, 1e6):
        z = cs_multiplier(n, 0.05, 10_000)
        assert z > stats.norm.ppf(0.95)
        assert anytime_p_value(z, n, 0.05, 10_000) == pytest.approx(0.05, rel=1e-9)
        assert anytime_p_value(z * 1.01, n, 0.05, 10_000) < 0.05 < anytime_p_value(z * 0.99, n, 0.05, 10_000)
    assert anytime_p_value(-1, 100, 0.05, 1000) == 1.0


def test_confidence_sequence_covers_at_every_look_by_simulation() -> None:
    """A/A with 40 looks per run: the sequence's miss rate at ANY look stays under alpha; the fixed
    interval's, checked at every look, does not."""
    rng = np.random.default_rng(6)
    runs, looks, batch, p_true, alpha = 400, 40, 500, 0.1, 0.05
    miss_cs = miss_fixed = 0
    for _ in range(runs):
        x = np.cumsum(rng.binomial(batch, p_true, looks))
        n = batch * np.arange(1, looks + 1)
        hit_cs = hit_fixed = False
        for xi, ni in zip(x, n, strict=True):
            theta = xi / ni - p_true
            se = math.sqrt(p_true * (1 - p_true) / ni)
            seq = weigh(theta, se, 0.0, True, alpha, ni, n_star=5000)
            fixed = weigh(theta, se, 0.0, True, alpha, ni)
            hit_cs |= seq.high < 0
            hit_fixed |= fixed.high < 0
        miss_cs += hit_cs
        miss_fixed += hit_fixed
    assert miss_cs / runs <= alpha
    assert miss_fixed / runs > 2 * alpha  # peeking at a fixed interval inflates the error
