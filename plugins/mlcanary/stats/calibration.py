"""Calibration from per-bin sums: expected calibration error and calibration-in-the-large."""

from __future__ import annotations

import math

import numpy as np


def ece_from_bins(n: np.ndarray, score_sum: np.ndarray, label_sum: np.ndarray) -> float:
    """ECE = sum_k (n_k / N) |mean score_k - mean label_k| over non-empty bins (Naeini et al. 2015).

    With the bins equal-mass on the baseline's scores this is the equal-mass ECE; the bins where
    ``n_k`` is 0 are dropped, as scikit-learn's ``calibration_curve`` drops them.
    """
    n = np.asarray(n, dtype=float)
    keep = n > 0
    total = n[keep].sum()
    if total == 0:
        return float("nan")
    gap = np.abs(np.asarray(score_sum)[keep] - np.asarray(label_sum)[keep]) / n[keep]
    return float((n[keep] / total * gap).sum())


def ece_standard_error(n: np.ndarray, diff_sum: np.ndarray, diff_sq_sum: np.ndarray) -> float:
    """Approximate SE of the ECE: sqrt(sum_k (n_k/N)² var_k / n_k), var_k the variance of score - label.

    A first-order (delta) approximation that treats |gap_k| as gap_k; it ignores the upward bias of
    ECE at small n, which is why ECE is gated as a difference against the baseline.
    """
    n = np.asarray(n, dtype=float)
    keep = n > 1
    total = n[keep].sum()
    if total == 0:
        return float("nan")
    nk = n[keep]
    mean = np.asarray(diff_sum)[keep] / nk
    var = np.maximum(np.asarray(diff_sq_sum)[keep] / nk - mean**2, 0.0) * nk / (nk - 1)
    return float(math.sqrt(((nk / total) ** 2 * var / nk).sum()))
