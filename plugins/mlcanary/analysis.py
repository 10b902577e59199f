"""Slow ML analysis: baseline vs canary on label-complete data, overall and per segment.

Every check tests the canary against the spec's tolerance, not against the point estimate:
- FAIL: the interval lies beyond the tolerance (after the multiple-comparison correction across the
  metric's segments);
- PASS: the interval lies within the tolerance;
- INCONCLUSIVE: the interval straddles the tolerance, or there are too few samples;
- INVALID: the arms' inputs differ (drift); the comparison itself cannot be trusted.

The interval is an anytime-valid confidence sequence unless the spec turns ``sequential`` off.
All numbers come from three warehouse statements: the bin edges (baseline quantiles of the score
and the drift features), the drift histograms of both arms, and one GROUP BY over (version, segment
columns, score bin) with the sums the metrics need. pandas and numpy only see the aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Connection, Engine

from mlcanary.spec import AnalysisSpec, MetricSpec, RolloutSpec
from mlcanary.stats.auc import auc_from_bins
from mlcanary.stats.calibration import ece_from_bins, ece_standard_error
from mlcanary.stats.drift import drift
from mlcanary.stats.gate import Evidence, weigh
from mlcanary.stats.multiple import reject
from mlcanary.stats.rates import LogRatio, mean_log_ratio, rate_log_ratio
from mlcanary.tables import predictions_table
from mlcanary.verdict import CheckResult, Verdict, combine, first_reason
from mlcanary.warehouse import queries
from mlcanary.warehouse.queries import OVERALL

_SCORE = "(score)"  # the score's key among the binned columns: no feature name can look like this


@dataclass(frozen=True)
class AnalysisWindow:
    start: datetime
    end: datetime  # rows before this moment count ...
    label_asof: datetime  # ... with the labels observed by this moment

    @classmethod
    def ending_at(cls, spec: RolloutSpec, now: datetime, not_before: datetime | None = None) -> AnalysisWindow:
        """The spec's window of label-complete data as of ``now``: it ends one label delay ago."""
        end = now - spec.analysis.label_delay
        start = end - spec.analysis.window
        if not_before is not None:
            start = max(start, not_before)
        return cls(start=start, end=max(end, start), label_asof=now)


@dataclass(frozen=True)
class AnalysisResult:
    verdict: Verdict
    reason: str
    baseline_version: str
    canary_version: str
    window: AnalysisWindow
    checks: list[CheckResult]
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "baseline_version": self.baseline_version,
            "canary_version": self.canary_version,
            "window_start": self.window.start.isoformat(),
            "window_end": self.window.end.isoformat(),
            "label_asof": self.window.label_asof.isoformat(),
            "flags": self.flags,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class _Arm:
    """One version's bins for one segment: arrays over the score bins (NULL scores excluded)."""

    totals: dict[str, float]  # the sums over every row, NULL scores included
    bins: dict[str, np.ndarray]  # per score bin, bins -1 (NULL score) excluded


@dataclass(frozen=True)
class _Comparison:
    """A metric's comparison as the tests need it: theta and SE on the test scale, and the bound."""

    canary: float | None
    baseline: float | None
    theta: float
    se: float
    bound: float
    n: float
    to_display: Callable[[float], float]  # test scale -> the scale the reason shows
    unit: str  # "relative" or "absolute"


@dataclass(frozen=True)
class Aggregates:
    """What a look is computed from: the score's bin edges, each drift feature's histograms (baseline,
    canary), and the sums per version, segment and score bin (:data:`queries.BIN_MEASURES`)."""

    score_edges: list[float]
    features: dict[str, tuple[np.ndarray, np.ndarray]]
    segments: pd.DataFrame


def analyze(
    conn: Connection,
    spec: RolloutSpec,
    baseline_version: str,
    canary_version: str,
    window: AnalysisWindow,
) -> AnalysisResult:
    """Run every metric of the spec, overall and per segment, and the drift checks."""
    a = spec.analysis
    table = _table(spec)
    span = (window.start, window.end)
    edges = queries.quantile_edges(
        conn, table, spec.model, baseline_version, *span, _binned(spec, table), a.edge_sample
    )
    score_edges = _score_edges(spec, edges)
    features = _histograms(conn, spec, baseline_version, canary_version, window, edges)
    segments = _sums(conn, spec, table, [baseline_version, canary_version], window, score_edges)
    return evaluate(spec, baseline_version, canary_version, window, Aggregates(score_edges, features, segments))


def _sums(
    conn: Connection,
    spec: RolloutSpec,
    table: queries.MappedTable,
    versions: list[str],
    window: AnalysisWindow,
    score_edges: list[float],
    extra: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """The sums the spec's metrics need per version, segment and score bin (and ``extra`` keys)."""
    a = spec.analysis
    return queries.binned_frame(
        conn,
        table,
        spec.model,
        versions,
        window.start,
        window.end,
        window.label_asof,
        a.segments,
        score_edges,
        _measures(spec),
        sample_rows=a.edge_sample,
        max_values=a.max_segment_values,
        extra=extra,
    )


def _table(spec: RolloutSpec) -> queries.MappedTable:
    return predictions_table(spec, extra=[*spec.analysis.segments, *spec.analysis.drift.features])


def _binned(spec: RolloutSpec, table: queries.MappedTable) -> dict[str, tuple[Any, int]]:
    """The values whose bin edges are baseline quantiles: the drift features and the score."""
    a = spec.analysis
    return {f: (table.col(f), a.drift.bins) for f in a.drift.features} | {_SCORE: (table.col("score"), a.score_bins)}


def _score_edges(spec: RolloutSpec, edges: dict[str, list[float]]) -> list[float]:
    """The score's quantile edges (taken out of ``edges``) with every precision/recall threshold added."""
    thresholds = {m.threshold for m in spec.analysis.metrics if m.kind in ("precision", "recall")}
    return sorted(set(edges.pop(_SCORE)) | thresholds)


def _measures(spec: RolloutSpec) -> list[str]:
    return sorted({m for metric in spec.analysis.metrics for m in (*_needs(metric), *_checks_of(metric))})


def _histograms(
    conn: Connection,
    spec: RolloutSpec,
    baseline_version: str,
    canary_version: str,
    window: AnalysisWindow,
    edges: dict[str, list[float]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Input drift on each arm's most recent rows: PSI noise is about bins / sample size."""
    a = spec.analysis
    if not a.drift.features:
        return {}
    table = _table(spec)
    hist = queries.sample_histograms(
        conn,
        table,
        spec.model,
        [baseline_version, canary_version],
        window.start,
        window.end,
        {f: (table.col(f), edges[f]) for f in a.drift.features},
        a.edge_sample,
    )
    return {
        f: (np.array(hist[(baseline_version, f)], dtype=float), np.array(hist[(canary_version, f)], dtype=float))
        for f in a.drift.features
    }


def evaluate(
    spec: RolloutSpec, baseline_version: str, canary_version: str, window: AnalysisWindow, agg: Aggregates
) -> AnalysisResult:
    """The verdict of one look from its aggregates: the data checks, every metric per segment, drift."""
    a = spec.analysis
    score_edges, segments = agg.score_edges, agg.segments
    folded = sorted(set(segments.loc[segments.value == queries.OTHER, "column"]))
    arms_of = {baseline_version: "baseline", canary_version: "canary"}
    broken = _data_checks(spec, _table(spec), segments, arms_of, window)
    if broken:  # sums of broken data mean nothing, and NaN ones crash the statistics: no comparison at all
        return AnalysisResult(Verdict.INVALID, broken[0].reason, baseline_version, canary_version, window, broken, [])
    arms = _arms(segments, len(score_edges))
    groups = sorted({(c, v) for _, c, v in arms} | {(OVERALL, OVERALL)}, key=lambda g: (g[0] != OVERALL, g))
    critical = {(c.column, c.value): c.tolerance for c in a.critical_segments}
    groups += [g for g in critical if g not in groups]
    checks: list[CheckResult] = []
    flags: list[str] = []
    for metric in a.metrics:
        mine = [
            _check(
                spec,
                metric,
                column,
                value,
                score_edges,
                window,
                arms.get((baseline_version, column, value)),
                arms.get((canary_version, column, value)),
                critical.get((column, value)),
            )
            for column, value in groups
        ]
        mine = _correct(mine, a.alpha, a.correction)
        checks += [c for c, _ in mine]
        flags += _simpson(metric, [c for c, _ in mine])
    flags += [
        f"segment column {c} has more than {a.max_segment_values} values: the {a.max_segment_values} most frequent "
        f"are compared one by one, the rest as {c}={queries.OTHER}"
        for c in folded
    ]
    checks += _drift_checks(spec, agg.features, segments, baseline_version, canary_version, score_edges, window)
    verdict = combine(checks)
    reason = first_reason(checks, verdict)
    if flags:
        reason += "; " + flags[0]
    return AnalysisResult(verdict, reason, baseline_version, canary_version, window, checks, flags)


class LookCube:
    """The sums of many looks from one scan: per version, segment and score bin as :func:`analyze`
    sums them, and per time slot of the rows (``ts``) and of their labels (``label_ts``) on a grid
    of ``slot`` seconds from ``start``. A look whose window and label time lie on the grid adds up
    its slots and gets exactly the sums a scan of its window would (if the window ends a label delay
    before the label time, as every look's does); the bin edges, the segments kept
    and the drift features' edges are taken once, from the baseline's most recent rows of the span.

    A row's label key is the slot its label arrived by, or (for a label that arrived within a label
    delay and a slot of the row) the first slot any look that counts the row can have: so the cube
    grows with the late labels only, not with every pair of slots.
    """

    def __init__(
        self,
        engine: Engine,
        start: datetime,
        slot: int,
        score_edges: list[float],
        feature_edges: dict[str, list[float]],
        cube: pd.DataFrame,
        measures: list[str],
    ) -> None:
        self.engine, self.start, self.slot, self.measures = engine, start, slot, measures
        self.score_edges, self.feature_edges, self.cube = score_edges, feature_edges, cube

    @classmethod
    def build(
        cls,
        engine: Engine,
        spec: RolloutSpec,
        baseline_version: str,
        canary_version: str,
        start: datetime,
        end: datetime,
        slot: int,
    ) -> LookCube:
        a, table = spec.analysis, _table(spec)
        lead = int(a.label_delay.total_seconds()) // slot + 1  # every look that counts the row counts this label
        with engine.connect() as conn:
            edges = queries.quantile_edges(
                conn, table, spec.model, baseline_version, start, end, _binned(spec, table), a.edge_sample
            )
            score_edges = _score_edges(spec, edges)
            keys = queries.slot_keys(table, start, end, slot, lead, conn.dialect.name)
            span = AnalysisWindow(start, end, end)
            cube = _sums(conn, spec, table, [baseline_version, canary_version], span, score_edges, keys)
        return cls(engine, start, slot, score_edges, edges, cube, _measures(spec))

    def _index(self, t: datetime) -> int:
        k, rest = divmod((t - self.start).total_seconds(), self.slot)
        if rest:
            raise ValueError(f"{t} is not on the cube's grid of {self.slot} s from {self.start}")
        return int(k)

    def aggregates(
        self, spec: RolloutSpec, baseline_version: str, canary_version: str, window: AnalysisWindow
    ) -> Aggregates:
        first, stop, asof = self._index(window.start), self._index(window.end), self._index(window.label_asof)
        if first < stop and window.end > window.label_asof - spec.analysis.label_delay:
            raise ValueError("the cube answers looks whose window ends a label delay before its label time")
        c = self.cube
        mine = c[(c.ts_slot >= first) & (c.ts_slot < stop) & (c.label_slot <= asof)]
        segments = mine.groupby(["version", "column", "value", "bin"], as_index=False, sort=False)[
            list(queries.BIN_MEASURES)
        ].sum()
        with self.engine.connect() as conn:
            features = _histograms(conn, spec, baseline_version, canary_version, window, self.feature_edges)
        return Aggregates(list(self.score_edges), features, segments)

    def analyze(
        self, spec: RolloutSpec, baseline_version: str, canary_version: str, window: AnalysisWindow
    ) -> AnalysisResult:
        agg = self.aggregates(spec, baseline_version, canary_version, window)
        return evaluate(spec, baseline_version, canary_version, window, agg)


def _arms(segments: pd.DataFrame, n_edges: int) -> dict[tuple[str, str, str], _Arm]:
    """Every (version, column, value)'s sums and per-bin sums, in one vectorised pass (a segment
    column with 50 values makes 100 arms: a groupby loop per arm cost more than the scan)."""
    if segments.empty:
        return {}
    codes, keys = pd.factorize(pd.MultiIndex.from_frame(segments[["version", "column", "value"]]))
    measures = list(queries.BIN_MEASURES)
    values = segments[measures].to_numpy(dtype=float)
    totals = np.zeros((len(keys), len(measures)))
    np.add.at(totals, codes, values)
    b = segments["bin"].to_numpy(dtype=int)
    scored = b >= 0
    bins = np.zeros((len(keys), n_edges + 1, len(measures)))
    np.add.at(bins, (codes[scored], b[scored]), values[scored])
    return {
        tuple(key): _Arm(
            {m: float(totals[i, j]) for j, m in enumerate(measures)},
            {m: bins[i, :, j] for j, m in enumerate(measures)},
        )
        for i, key in enumerate(keys)
    }


_SUMS = {
    "label": ("y", "y2", False),
    "score": ("s", "s2", True),
    "abs_error": ("ad", "d2", True),
    "squared_error": ("d2", "d4", True),
}


_BINARY_LABELS = ("rate", "precision", "recall", "auc", "calibration", "ece")


def _checks_of(metric: MetricSpec) -> tuple[str, ...]:
    """The data checks (of :data:`queries.DATA_CHECKS`) a metric needs: finite labels and scores,
    and labels in {0, 1} for the kinds that read the label as an outcome."""
    return queries.DATA_CHECKS if metric.kind in _BINARY_LABELS else ("y_nonfinite", "s_nonfinite")


_DATA_RULES = {
    "y_nonfinite": ("label", "NaN or infinite"),
    "s_nonfinite": ("score", "NaN or infinite"),
    "y_not01": ("label", "neither 0 nor 1 ({kinds} need 0/1 labels)"),
}


def _data_checks(
    spec: RolloutSpec,
    table: queries.MappedTable,
    segments: pd.DataFrame,
    arms: dict[str, str],
    window: AnalysisWindow,
) -> list[CheckResult]:
    """An INVALID check for each rule the label-complete rows of an arm break, with how many broke it."""
    overall = segments[segments.column == OVERALL].groupby("version")[["n", *queries.DATA_CHECKS]].sum()
    kinds = ", ".join(sorted({m.kind for m in spec.analysis.metrics if m.kind in _BINARY_LABELS}))
    out = []
    for version, arm in arms.items():
        if version not in overall.index:
            continue
        row = overall.loc[version]
        for measure, (column, rule) in _DATA_RULES.items():
            bad = int(row[measure])
            if bad:
                physical = f"{table.table.name}.{table.columns.get(column, column)}"
                out.append(
                    CheckResult(
                        tier="analysis",
                        check="data",
                        segment=OVERALL,
                        verdict=Verdict.INVALID,
                        reason=f"data check: {physical} of {version} ({arm}): {bad:,} of {int(row['n']):,} "
                        f"labelled rows {rule.format(kinds=kinds)}",
                        window_start=window.start,
                        window_end=window.end,
                    )
                )
    return out


def _needs(metric: MetricSpec) -> tuple[str, ...]:
    """The sums (of :data:`queries.BIN_MEASURES`) a metric is computed from; the count is always there."""
    if metric.kind == "mean":
        return _SUMS[metric.value][:2]
    if metric.kind in ("calibration", "ece"):
        return ("y", "s", "d2")
    return ("y",)


def _compare(metric: MetricSpec, tolerance: float, edges: list[float], base: _Arm, can: _Arm) -> _Comparison:
    """The metric for both arms, as an estimate on its test scale with a standard error."""
    if metric.relative:
        bound = math.log(1 - tolerance) if metric.better_up else math.log(1 + tolerance)
        if metric.kind == "rate":
            r = rate_log_ratio(can.totals["y"], int(can.totals["n"]), base.totals["y"], int(base.totals["n"]))
            n = min(can.totals["n"], base.totals["n"])
        elif metric.kind == "mean":
            s, q, scored = _SUMS[metric.value]

            def moments(arm: _Arm) -> tuple[int, float, float]:
                if scored:
                    return int(arm.bins["n"].sum()), float(arm.bins[s].sum()), float(arm.bins[q].sum())
                return int(arm.totals["n"]), arm.totals[s], arm.totals[q]

            (n_c, s_c, q_c), (n_b, s_b, q_b) = moments(can), moments(base)
            r, n = mean_log_ratio(n_c, s_c, q_c, n_b, s_b, q_b), min(n_c, n_b)
        else:  # precision / recall at the threshold: bins from the threshold's edge up are "positive"
            first = edges.index(metric.threshold) + 1

            def counts(arm: _Arm) -> tuple[float, float]:
                tp = float(arm.bins["y"][first:].sum())
                denominator = arm.bins["n"][first:].sum() if metric.kind == "precision" else arm.bins["y"].sum()
                return tp, float(denominator)

            (x_c, d_c), (x_b, d_b) = counts(can), counts(base)
            r, n = rate_log_ratio(x_c, int(d_c), x_b, int(d_b)), min(d_c, d_b)
        return _ratio(r, bound, n)
    if metric.kind == "auc":
        c = auc_from_bins(can.bins["y"], can.bins["n"] - can.bins["y"])
        b = auc_from_bins(base.bins["y"], base.bins["n"] - base.bins["y"])
        return _Comparison(
            c.auc,
            b.auc,
            c.auc - b.auc,
            math.sqrt(c.variance + b.variance),
            -tolerance,
            min(can.bins["n"].sum(), base.bins["n"].sum()),
            lambda x: x,
            "absolute",
        )
    if metric.kind == "calibration":  # how much further the canary's mean score is from its mean label

        def citl(arm: _Arm) -> tuple[float, float, float]:
            n = arm.bins["n"].sum()
            if n < 2:
                return math.nan, math.nan, n
            gap = (arm.bins["s"].sum() - arm.bins["y"].sum()) / n
            var = max(arm.bins["d2"].sum() / n - gap * gap, 0.0) * n / (n - 1)
            return gap, var / n, n

        (g_c, v_c, n_c), (g_b, v_b, n_b) = citl(can), citl(base)
        return _Comparison(
            g_c, g_b, abs(g_c) - abs(g_b), math.sqrt(v_c + v_b), tolerance, min(n_c, n_b), lambda x: x, "absolute"
        )

    # ece
    def ece(arm: _Arm) -> tuple[float, float]:
        bins = arm.bins
        diff_sum = bins["s"] - bins["y"]
        return ece_from_bins(bins["n"], bins["s"], bins["y"]), ece_standard_error(bins["n"], diff_sum, bins["d2"])

    (e_c, se_c), (e_b, se_b) = ece(can), ece(base)
    return _Comparison(
        e_c,
        e_b,
        e_c - e_b,
        math.sqrt(se_c**2 + se_b**2),
        tolerance,
        min(can.bins["n"].sum(), base.bins["n"].sum()),
        lambda x: x,
        "absolute",
    )


def _ratio(r: LogRatio, bound: float, n: float) -> _Comparison:
    return _Comparison(r.canary, r.baseline, r.theta, r.se, bound, n, math.exp, "relative")


def _check(
    spec: RolloutSpec,
    metric: MetricSpec,
    column: str,
    value: str,
    edges: list[float],
    window: AnalysisWindow,
    base: _Arm | None,
    can: _Arm | None,
    critical_tolerance: float | None,
) -> tuple[CheckResult, Evidence | None]:
    a = spec.analysis
    overall = column == OVERALL
    segment = OVERALL if overall else f"{column}={value}"
    where = "" if overall else f" for {segment}"
    tolerance = critical_tolerance if (critical_tolerance is not None and metric.relative) else metric.tolerance
    n_b = int(base.totals["n"]) if base else 0
    n_c = int(can.totals["n"]) if can else 0
    common = dict(
        tier="analysis",
        check=metric.name,
        segment=segment,
        window_start=window.start,
        window_end=window.end,
        canary_n=n_c,
        baseline_n=n_b,
        gating=metric.critical,
        required=metric.critical and (overall or critical_tolerance is not None),
    )
    if base is None or can is None or min(n_b, n_c) < a.min_samples:
        reason = (
            f"{metric.name}{where}: too few labelled samples (canary {n_c:,}, baseline {n_b:,}; "
            f"minimum {a.min_samples:,})"
        )
        return CheckResult(verdict=Verdict.INCONCLUSIVE, reason=reason, **common), None
    cmp = _compare(metric, tolerance, edges, base, can)
    threshold = cmp.to_display(cmp.bound)
    values = dict(canary_value=_finite(cmp.canary), baseline_value=_finite(cmp.baseline), threshold=threshold)
    if not (math.isfinite(cmp.theta) and math.isfinite(cmp.se)):
        reason = f"{metric.name}{where}: cannot be compared (a mean is zero, or an arm lacks positives or negatives)"
        return CheckResult(verdict=Verdict.INCONCLUSIVE, reason=reason, **common, **values), None
    ev = weigh(
        cmp.theta, cmp.se, cmp.bound, metric.better_up, a.alpha, cmp.n, a.sequential_n_star if a.sequential else None
    )
    result = CheckResult(
        verdict=Verdict.PASS if ev.p_within <= a.alpha else Verdict.INCONCLUSIVE,
        reason="",
        ci_low=cmp.to_display(ev.low),
        ci_high=cmp.to_display(ev.high),
        **common,
        **values,
    )
    return replace(result, reason=_reason(metric, where, cmp, ev, tolerance, n_c, n_b, a, result.verdict)), ev


def _reason(
    metric: MetricSpec,
    where: str,
    cmp: _Comparison,
    ev: Evidence,
    tolerance: float,
    n_c: int,
    n_b: int,
    a: AnalysisSpec,
    verdict: Verdict,
) -> str:
    kind = "CS" if a.sequential else "CI"
    level = f"{100 * (1 - 2 * a.alpha):g} % {kind}"
    outcome = {
        Verdict.PASS: "within tolerance",
        Verdict.FAIL: "worse than tolerance",
        Verdict.INCONCLUSIVE: "not yet conclusive",
    }[verdict]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    if cmp.unit == "relative":
        moved = "fell" if cmp.theta < 0 else "rose"
        change = (
            f"{moved} {fmt(cmp.canary if cmp.baseline is None else cmp.baseline)} → {fmt(cmp.canary)} "
            f"({_rel(math.exp(cmp.theta))}, {level} {_rel(math.exp(ev.low))} … {_rel(math.exp(ev.high))})"
        )
        tol = f"tolerance {100 * tolerance:g} %"
        return f"{metric.name}{where} {change}, {tol}, n={n_c:,} canary / {n_b:,} baseline: {outcome}"
    else:
        label = {"auc": "AUC", "calibration": "|mean score - mean label|", "ece": "ECE"}[metric.kind]
        base_v = abs(cmp.baseline) if metric.kind == "calibration" else cmp.baseline
        can_v = abs(cmp.canary) if metric.kind == "calibration" else cmp.canary
        change = (
            f"{label} {fmt(base_v)} → {fmt(can_v)} (difference {cmp.theta:+.4f}, {level} "
            f"{ev.low:+.4f} … {ev.high:+.4f})"
        )
        tol = f"tolerance {tolerance:g}"
    return f"{metric.name}{where}: {change}, {tol}, n={n_c:,} canary / {n_b:,} baseline: {outcome}"


def _correct(
    checks: list[tuple[CheckResult, Evidence | None]], alpha: float, method: str
) -> list[tuple[CheckResult, Evidence | None]]:
    """FAIL where the correction across this metric's segments rejects 'not worse than tolerance'."""
    tested = [i for i, (_, ev) in enumerate(checks) if ev is not None]
    rejected = reject([checks[i][1].p_worse for i in tested], alpha, method)  # type: ignore[union-attr]
    out = list(checks)
    for i, bad in zip(tested, rejected, strict=True):
        if bad:
            check, ev = out[i]
            out[i] = (
                replace(check, verdict=Verdict.FAIL, reason=check.reason.rsplit(": ", 1)[0] + ": worse than tolerance"),
                ev,
            )
    return out


def _point(metric: MetricSpec, check: CheckResult) -> float | None:
    """The check's point estimate on the scale of its threshold (a ratio, or a difference)."""
    c, b = check.canary_value, check.baseline_value
    if c is None or b is None:
        return None
    if metric.relative:
        return c / b if b else None
    return abs(c) - abs(b) if metric.kind == "calibration" else c - b


def _simpson(metric: MetricSpec, checks: list[CheckResult]) -> list[str]:
    """Flag an aggregate that improves while a segment's point estimate is beyond the tolerance."""
    overall = next((c for c in checks if c.segment == OVERALL), None)
    point = None if overall is None else _point(metric, overall)
    if point is None:
        return []
    neutral = 1.0 if metric.relative else 0.0
    if not (point > neutral if metric.better_up else point < neutral):
        return []
    worse = []
    for c in checks:
        p = _point(metric, c)
        beyond = (
            p is not None and c.threshold is not None and (p < c.threshold if metric.better_up else p > c.threshold)
        )
        if c.segment != OVERALL and beyond:
            worse.append(f"{c.segment} ({c.verdict.value})")
    if worse:
        return [f"{metric.name} improves overall while {', '.join(worse)} degrades beyond tolerance"]
    return []


def _drift_checks(
    spec: RolloutSpec,
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    segments: pd.DataFrame,
    baseline_version: str,
    canary_version: str,
    score_edges: list[float],
    window: AnalysisWindow,
) -> list[CheckResult]:
    d = spec.analysis.drift
    out = []

    def counts(rows: pd.DataFrame, version: str, size: int) -> np.ndarray:
        mine = rows[(rows.version == version) & (rows.bin >= 0)]
        arr = np.zeros(size)
        np.add.at(arr, mine.bin.to_numpy(dtype=int), mine.n.to_numpy(dtype=float))
        return arr

    for feature, (ref, cur) in features.items():
        out.append(
            _drift_check(
                f"input_drift_{feature}",
                f"input {feature}",
                ref,
                cur,
                d.input_threshold,
                Verdict.INVALID,
                True,
                window,
                spec.analysis.min_samples,
                "the arms' inputs differ: the traffic split is biased, comparison invalid",
            )
        )
    if d.output != "off":
        overall = segments[segments.column == OVERALL]
        ref = counts(overall, baseline_version, len(score_edges) + 1)
        cur = counts(overall, canary_version, len(score_edges) + 1)
        groups = _merge_to_quantiles(ref, d.bins)
        ref_m, cur_m = np.bincount(groups, ref, d.bins), np.bincount(groups, cur, d.bins)
        out.append(
            _drift_check(
                "output_drift",
                "score",
                ref_m,
                cur_m,
                d.output_threshold,
                Verdict.FAIL,
                d.output == "fail",
                window,
                spec.analysis.min_samples,
                "the canary's scores are distributed differently",
            )
        )
    return out


def _merge_to_quantiles(reference: np.ndarray, bins: int) -> np.ndarray:
    """Group fine bins into ``bins`` groups of about equal reference mass (reference deciles for 10)."""
    total = reference.sum()
    if total == 0:
        return np.zeros(len(reference), dtype=int)
    before = (np.cumsum(reference) - reference) / total
    return np.minimum((before * bins).astype(int), bins - 1)


def _drift_check(
    check: str,
    what: str,
    ref: np.ndarray,
    cur: np.ndarray,
    threshold: float,
    bad: Verdict,
    gating: bool,
    window: AnalysisWindow,
    min_samples: int,
    meaning: str,
) -> CheckResult:
    result = drift(ref, cur)
    base = dict(
        tier="analysis",
        check=check[:63],
        segment=OVERALL,
        window_start=window.start,
        window_end=window.end,
        canary_n=int(cur.sum()),
        baseline_n=int(ref.sum()),
        threshold=threshold,
        canary_value=_finite(result.psi),
        baseline_value=_finite(result.kl),
        gating=gating,
        required=False,
        histogram=(ref.tolist(), cur.tolist()),
    )
    if min(ref.sum(), cur.sum()) < min_samples or not math.isfinite(result.psi):
        return CheckResult(
            verdict=Verdict.INCONCLUSIVE,
            reason=f"{what} drift: too few samples "
            f"(canary {int(cur.sum()):,}, baseline {int(ref.sum()):,}; minimum {min_samples:,})",
            **base,
        )
    figures = f"PSI {result.psi:.3f}, KL {result.kl:.3f}, JS {result.js:.3f}"
    if max(result.psi, result.kl) > threshold:
        return CheckResult(
            verdict=bad, reason=f"{what} drift between the arms: {figures} > {threshold:g}: {meaning}", **base
        )
    return CheckResult(verdict=Verdict.PASS, reason=f"{what} drift between the arms: {figures}", **base)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _rel(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f} %"
