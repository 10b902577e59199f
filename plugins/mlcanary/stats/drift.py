"""Distribution drift between two binned distributions (counts per bin, same bins for both)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPSILON = 1e-4  # floor for an empty bin's share, then the shares are renormalised


@dataclass(frozen=True)
class Drift:
    psi: float
    kl: float  # KL(current || reference)
    js: float  # Jensen-Shannon divergence, natural log (0 ... ln 2)


def _shares(counts: np.ndarray) -> np.ndarray:
    p = np.asarray(counts, dtype=float) / max(float(np.sum(counts)), 1.0)
    p = np.maximum(p, EPSILON)
    return p / p.sum()


def drift(reference: np.ndarray, current: np.ndarray) -> Drift:
    """PSI = sum (c - r) ln(c / r); KL = sum c ln(c / r); JS = (KL(c||m) + KL(r||m)) / 2, m = (c + r) / 2.

    Bins are the reference's quantiles with open outer bins; empty bins get the share ``EPSILON``
    (1e-4) before renormalising, a fixed convention (Evidently's data-dependent epsilon makes PSI
    explode on outliers; see research/statistics.md). NaN when either side has no counts.
    """
    if np.sum(reference) == 0 or np.sum(current) == 0:
        nan = float("nan")
        return Drift(nan, nan, nan)
    r, c = _shares(reference), _shares(current)
    m = (r + c) / 2
    kl = float(np.sum(c * np.log(c / r)))
    js = float((np.sum(c * np.log(c / m)) + np.sum(r * np.log(r / m))) / 2)
    return Drift(float(np.sum((c - r) * np.log(c / r))), kl, js)
