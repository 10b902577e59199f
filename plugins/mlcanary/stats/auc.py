"""AUC and its unpaired DeLong variance from score histograms (positives and negatives per bin)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AucEstimate:
    auc: float
    variance: float  # DeLong: var(V10)/m + var(V01)/n
    positives: int
    negatives: int


def auc_from_bins(positives: np.ndarray, negatives: np.ndarray) -> AucEstimate:
    """AUC = sum_k P_k (sum_{j<k} N_j + N_k / 2) / (P N), bins in increasing score order.

    Ties within a bin count one half (the trapezoidal AUC on the bin edges). DeLong (1988) placements
    from the same bins: a positive in bin k has V10 = (N_{<k} + N_k/2) / N, a negative in bin k has
    V01 = (P_{>k} + P_k/2) / P; the variance is var(V10)/P + var(V01)/N with (count - 1) denominators
    (pROC's ``delong.unpaired``). NaN when an arm has no positives or no negatives.
    """
    p = np.asarray(positives, dtype=float)
    q = np.asarray(negatives, dtype=float)
    m, n = p.sum(), q.sum()
    if m < 2 or n < 2:
        return AucEstimate(float("nan"), float("nan"), int(m), int(n))
    neg_below = np.cumsum(q) - q
    pos_above = p.sum() - np.cumsum(p)
    v10 = (neg_below + q / 2) / n  # placement of each positive, per bin
    v01 = (pos_above + p / 2) / m  # placement of each negative, per bin
    auc = float((p * v10).sum() / m)
    var10 = float((p * (v10 - auc) ** 2).sum() / (m - 1))
    var01 = float((q * (v01 - auc) ** 2).sum() / (n - 1))
    return AucEstimate(auc, var10 / m + var01 / n, int(m), int(n))
