"""One estimator per metric kind: what a kind sums, how it compares the arms, and how it reads.

An :class:`Estimator` turns both arms' binned sums (:class:`ArmBins`) into a :class:`Comparison`:
the estimate on the test scale (log ratio for the relative kinds, a difference for the absolute
ones), its standard error, and the values it is shown as. The analysis tests it against
:meth:`Estimator.bound`; the report page plots :meth:`Estimator.point` against
:meth:`Estimator.tolerance_line`. A new kind is one subclass and one entry in :data:`ESTIMATORS`,
in the manner of Kayenta's metric classifiers and gbstats' test classes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mlcanary.spec import MetricSpec
from mlcanary.stats.auc import auc_from_bins
from mlcanary.stats.calibration import ece_from_bins, ece_standard_error
from mlcanary.stats.gate import Evidence
from mlcanary.stats.rates import LogRatio, mean_log_ratio, rate_log_ratio


@dataclass(frozen=True)
class ArmBins:
    """One version's sums for one segment (names from ``queries.BIN_MEASURES``): ``totals`` over
    every labelled row, ``bins`` per score bin (rows with a NULL score left out)."""

    totals: dict[str, float]
    bins: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.totals["n"])

    def scored(self, measure: str) -> float:
        """The sum of ``measure`` over the rows that have a score."""
        return float(self.bins[measure].sum())


@dataclass(frozen=True)
class Comparison:
    """Both arms' values as shown, and the estimate on the test scale with its standard error; ``n``
    counts the smaller arm's samples (what bounds the information)."""

    canary: float | None
    baseline: float | None
    theta: float
    se: float
    n: float

    @classmethod
    def of_ratio(cls, r: LogRatio, n: float) -> Comparison:
        return cls(r.canary, r.baseline, r.theta, r.se, n)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def change(ratio: float) -> str:
    """A ratio as the change it is (``+8.9 %``), as every reason and plot writes it."""
    return f"{100 * (ratio - 1):+.1f} %"


def difference(diff: float) -> str:
    """A difference of an absolute metric as every reason and plot writes it (``-0.0123``)."""
    return f"{diff:+.4f}"


class Estimator(ABC):
    """A metric kind. Subclasses set :attr:`relative` (through :class:`Relative` or :class:`Absolute`)
    and implement :meth:`compare`."""

    relative: ClassVar[bool]
    reads_outcomes: ClassVar[bool] = True  # the label is a 0/1 outcome: the data check wants 0/1 labels
    reference: ClassVar[float]  # "no change" on the plotted scale
    axis: ClassVar[str]

    def __init__(self, metric: MetricSpec) -> None:
        self.metric = metric

    @property
    def higher_is_better(self) -> bool:
        return self.metric.higher_is_better

    @property
    def label_only(self) -> bool:
        """Compared from the label's sums alone (so a CTR gives its standard error)."""
        return False

    def needs(self) -> tuple[str, ...]:
        """The sums the kind is computed from (the count is always there)."""
        return ("y",)

    def score_edges(self) -> set[float]:
        """Score values that must be bin edges (a decision threshold)."""
        return set()

    def tolerance(self, critical: float | None) -> float:
        """The tolerance of a segment: a critical segment's own, where the kind takes one."""
        return self.metric.tolerance

    @abstractmethod
    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison: ...

    @abstractmethod
    def bound(self, tolerance: float) -> float:
        """The tolerance on the test scale: the canary fails beyond it."""

    @abstractmethod
    def display(self, x: float) -> float:
        """A value of the test scale on the scale the reasons and plots show."""

    @abstractmethod
    def point(self, canary: float | None, baseline: float | None) -> float | None:
        """The point estimate on the shown scale, from the two values a check records."""

    def tolerance_line(self, tolerance: float | None = None) -> float:
        return self.display(self.bound(self.metric.tolerance if tolerance is None else tolerance))

    @abstractmethod
    def describe(self, where: str, cmp: Comparison, ev: Evidence, level: str, tolerance: float) -> str:
        """The reason up to its figures: metric, segment, the change, its interval, the tolerance."""


class Relative(Estimator):
    """Compared as canary / baseline: a log ratio, the tolerance a fraction of the baseline."""

    relative = True
    reference = 1.0
    axis = "canary / baseline"

    def tolerance(self, critical: float | None) -> float:
        return self.metric.tolerance if critical is None else critical

    def bound(self, tolerance: float) -> float:
        return math.log(1 - tolerance) if self.higher_is_better else math.log(1 + tolerance)

    def display(self, x: float) -> float:
        return math.exp(x)

    def point(self, canary: float | None, baseline: float | None) -> float | None:
        if canary is None or baseline is None or not baseline:
            return None
        return canary / baseline

    def describe(self, where: str, cmp: Comparison, ev: Evidence, level: str, tolerance: float) -> str:
        moved = "fell" if cmp.theta < 0 else "rose"
        before = cmp.canary if cmp.baseline is None else cmp.baseline
        return (
            f"{self.metric.name}{where} {moved} {_fmt(before)} → {_fmt(cmp.canary)} "
            f"({change(math.exp(cmp.theta))}, {level} {change(math.exp(ev.low))} … {change(math.exp(ev.high))}), "
            f"tolerance {100 * tolerance:g} %"
        )


class Absolute(Estimator):
    """Compared as canary − baseline, the tolerance in the metric's own unit."""

    relative = False
    reference = 0.0
    axis = "canary − baseline"
    label: ClassVar[str]

    def bound(self, tolerance: float) -> float:
        return -tolerance if self.higher_is_better else tolerance

    def display(self, x: float) -> float:
        return x

    def shown(self, value: float | None) -> float | None:
        """A recorded value as the reason shows it."""
        return value

    def point(self, canary: float | None, baseline: float | None) -> float | None:
        c, b = self.shown(canary), self.shown(baseline)
        return None if c is None or b is None else c - b

    def describe(self, where: str, cmp: Comparison, ev: Evidence, level: str, tolerance: float) -> str:
        return (
            f"{self.metric.name}{where}: {self.label} {_fmt(self.shown(cmp.baseline))} → "
            f"{_fmt(self.shown(cmp.canary))} (difference {difference(cmp.theta)}, {level} {difference(ev.low)} … "
            f"{difference(ev.high)}), tolerance {tolerance:g}"
        )


class Rate(Relative):
    """The mean of the 0/1 label (CTR, conversion): Katz log rate ratio, :func:`rate_log_ratio`."""

    @property
    def label_only(self) -> bool:
        return True

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        r = rate_log_ratio(can.totals["y"], can.n, base.totals["y"], base.n)
        return Comparison.of_ratio(r, min(can.n, base.n))


@dataclass(frozen=True)
class MeanSource:
    """Where a mean's sum and sum of squares are, and whether only scored rows count."""

    total: str
    square: str
    scored_only: bool


class Mean(Relative):
    """The mean of ``value`` (the label, the score, |score − label|, (score − label)²): delta-method
    log ratio of means, :func:`mean_log_ratio`."""

    SOURCES: ClassVar[dict[str, MeanSource]] = {
        "label": MeanSource("y", "y2", scored_only=False),
        "score": MeanSource("s", "s2", scored_only=True),
        "abs_error": MeanSource("ad", "d2", scored_only=True),
        "squared_error": MeanSource("d2", "d4", scored_only=True),
    }
    reads_outcomes = False

    @property
    def source(self) -> MeanSource:
        return self.SOURCES[self.metric.value]

    @property
    def label_only(self) -> bool:
        return self.metric.value == "label"

    def needs(self) -> tuple[str, ...]:
        return (self.source.total, self.source.square)

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        src = self.source

        def moments(arm: ArmBins) -> tuple[int, float, float]:
            if src.scored_only:
                return int(arm.scored("n")), arm.scored(src.total), arm.scored(src.square)
            return arm.n, arm.totals[src.total], arm.totals[src.square]

        (n_c, s_c, q_c), (n_b, s_b, q_b) = moments(can), moments(base)
        return Comparison.of_ratio(mean_log_ratio(n_c, s_c, q_c, n_b, s_b, q_b), min(n_c, n_b))


class _AtThreshold(Relative):
    """A share of rows at the decision threshold: the bins from the threshold's edge up are positive."""

    def score_edges(self) -> set[float]:
        return {self.metric.threshold}

    @abstractmethod
    def counts(self, arm: ArmBins, first: int) -> tuple[float, float]:
        """Successes and trials of the share, the positive bins starting at ``first``."""

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        first = edges.index(self.metric.threshold) + 1
        (x_c, d_c), (x_b, d_b) = self.counts(can, first), self.counts(base, first)
        return Comparison.of_ratio(rate_log_ratio(x_c, int(d_c), x_b, int(d_b)), min(d_c, d_b))


class Precision(_AtThreshold):
    """True positives / predicted positives at the threshold."""

    def counts(self, arm: ArmBins, first: int) -> tuple[float, float]:
        return float(arm.bins["y"][first:].sum()), float(arm.bins["n"][first:].sum())


class Recall(_AtThreshold):
    """True positives / positives at the threshold."""

    def counts(self, arm: ArmBins, first: int) -> tuple[float, float]:
        return float(arm.bins["y"][first:].sum()), arm.scored("y")


class Auc(Absolute):
    """AUC from the score bins, unpaired DeLong variance (:func:`auc_from_bins`); a drop fails."""

    label = "AUC"

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        c = auc_from_bins(can.bins["y"], can.bins["n"] - can.bins["y"])
        b = auc_from_bins(base.bins["y"], base.bins["n"] - base.bins["y"])
        n = min(can.scored("n"), base.scored("n"))
        return Comparison(c.auc, b.auc, c.auc - b.auc, math.sqrt(c.variance + b.variance), n)


class _CalibrationError(Absolute):
    """A calibration error: lower is better whatever the spec says, from the sums of the score, the
    label and the squared gap."""

    @property
    def higher_is_better(self) -> bool:
        return False

    def needs(self) -> tuple[str, ...]:
        return ("y", "s", "d2")


class Calibration(_CalibrationError):
    """Calibration in the large: how much further the canary's mean score is from its mean label,
    |mean(s − y)|; the variance of the mean of d = s − y on each arm."""

    label = "|mean score - mean label|"

    def shown(self, value: float | None) -> float | None:
        return None if value is None else abs(value)

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        def gap(arm: ArmBins) -> tuple[float, float, float]:
            n = arm.scored("n")
            if n < 2:
                return math.nan, math.nan, n
            mean = (arm.scored("s") - arm.scored("y")) / n
            var = max(arm.scored("d2") / n - mean * mean, 0.0) * n / (n - 1)
            return mean, var / n, n

        (g_c, v_c, n_c), (g_b, v_b, n_b) = gap(can), gap(base)
        return Comparison(g_c, g_b, abs(g_c) - abs(g_b), math.sqrt(v_c + v_b), min(n_c, n_b))


class Ece(_CalibrationError):
    """Expected calibration error over the equal-mass score bins (:func:`ece_from_bins`)."""

    label = "ECE"

    def compare(self, base: ArmBins, can: ArmBins, edges: list[float]) -> Comparison:
        def ece(arm: ArmBins) -> tuple[float, float]:
            b = arm.bins
            return ece_from_bins(b["n"], b["s"], b["y"]), ece_standard_error(b["n"], b["s"] - b["y"], b["d2"])

        (e_c, se_c), (e_b, se_b) = ece(can), ece(base)
        n = min(can.scored("n"), base.scored("n"))
        return Comparison(e_c, e_b, e_c - e_b, math.sqrt(se_c**2 + se_b**2), n)


ESTIMATORS: dict[str, type[Estimator]] = {
    "rate": Rate,
    "mean": Mean,
    "precision": Precision,
    "recall": Recall,
    "auc": Auc,
    "calibration": Calibration,
    "ece": Ece,
}


def estimator(metric: MetricSpec) -> Estimator:
    """The estimator of ``metric``'s kind."""
    return ESTIMATORS[metric.kind](metric)
