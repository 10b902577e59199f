"""Multiple-comparison control across segments: which hypotheses to reject."""

from __future__ import annotations

from collections.abc import Sequence


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down (family-wise error): reject p_(i) while p_(i) <= alpha / (m - i + 1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    reject = [False] * m
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def benjamini_hochberg(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Benjamini-Hochberg (false discovery rate): reject the k smallest, k = max{k: p_(k) <= k alpha / m}."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    k = 0
    for rank, i in enumerate(order, start=1):
        if p_values[i] <= rank * alpha / m:
            k = rank
    reject = [False] * m
    for i in order[:k]:
        reject[i] = True
    return reject


def reject(p_values: Sequence[float], alpha: float, method: str) -> list[bool]:
    """``method``: "holm", "bh" or "none" (each p-value against alpha on its own)."""
    if method == "holm":
        return holm(p_values, alpha)
    if method == "bh":
        return benjamini_hochberg(p_values, alpha)
    if method == "none":
        return [p <= alpha for p in p_values]
    raise ValueError(f"unknown correction {method!r}")
