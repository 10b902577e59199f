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
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Connection, Engine

from mlcanary.metrics import ArmBins, Estimator, estimator
from mlcanary.spec import MetricSpec, RolloutSpec
from mlcanary.stats.drift import drift
from mlcanary.stats.gate import Evidence, weigh
from mlcanary.stats.multiple import reject
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
    thresholds = {t for m in spec.analysis.metrics for t in estimator(m).score_edges()}
    return sorted(set(edges.pop(_SCORE)) | thresholds)


def _measures(spec: RolloutSpec) -> list[str]:
    return sorted({m for metric in spec.analysis.metrics for m in (*estimator(metric).needs(), *_checks_of(metric))})


def _histograms(
    conn: Connection,
    spec: RolloutSpec,
    baseline_version: str,
    canary_version: str,
    window: AnalysisWindow,
    edges: dict[str, list[float]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Input drift over the whole window: each arm's counts per feature bin (baseline deciles)."""
    a = spec.analysis
    if not a.drift.features:
        return {}
    table = _table(spec)
    hist = queries.window_histograms(
        conn,
        table,
        spec.model,
        [baseline_version, canary_version],
        window.start,
        window.end,
        {f: (table.col(f), edges[f]) for f in a.drift.features},
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
    for est in map(estimator, a.metrics):
        mine = _metric_checks(
            spec,
            est,
            [
                _Segment(
                    column,
                    value,
                    arms.get((baseline_version, column, value)),
                    arms.get((canary_version, column, value)),
                )
                for column, value in groups
            ],
            critical,
            score_edges,
            window,
        )
        checks += mine
        flags += _simpson(est, mine)
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


def _arms(segments: pd.DataFrame, n_edges: int) -> dict[tuple[str, str, str], ArmBins]:
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
        tuple(key): ArmBins(
            {m: float(totals[i, j]) for j, m in enumerate(measures)},
            {m: bins[i, :, j] for j, m in enumerate(measures)},
        )
        for i, key in enumerate(keys)
    }


def _checks_of(metric: MetricSpec) -> tuple[str, ...]:
    """The data checks (of :data:`queries.DATA_CHECKS`) a metric needs: finite labels and scores,
    and labels in {0, 1} for the kinds that read the label as an outcome."""
    return queries.DATA_CHECKS if estimator(metric).reads_outcomes else ("y_nonfinite", "s_nonfinite")


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
    kinds = ", ".join(sorted({m.kind for m in spec.analysis.metrics if estimator(m).reads_outcomes}))
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


@dataclass(frozen=True)
class _Segment:
    """One segment of a metric's comparison: both arms' sums (None: the arm has no row there)."""

    column: str
    value: str
    base: ArmBins | None
    can: ArmBins | None

    @property
    def name(self) -> str:
        return OVERALL if self.column == OVERALL else f"{self.column}={self.value}"


def _metric_checks(
    spec: RolloutSpec,
    est: Estimator,
    segments: list[_Segment],
    critical: dict[tuple[str, str], float],
    edges: list[float],
    window: AnalysisWindow,
) -> list[CheckResult]:
    """One metric's check per segment. Each segment is weighed against its tolerance; the correction
    across the metric's segments decides which are FAIL; then each check's verdict and reason are
    written once."""
    a = spec.analysis
    metric = est.metric
    kind = "CS" if a.sequential else "CI"
    level = f"{100 * (1 - 2 * a.alpha):g} % {kind}"
    weighed: list[tuple[dict[str, Any], Evidence | None, str]] = []  # a check's fields, evidence, figures
    for seg in segments:
        overall = seg.column == OVERALL
        where = "" if overall else f" for {seg.name}"
        n_b, n_c = (seg.base.n if seg.base else 0), (seg.can.n if seg.can else 0)
        tolerance = est.tolerance(critical.get((seg.column, seg.value)))
        fields: dict[str, Any] = dict(
            tier="analysis",
            check=metric.name,
            segment=seg.name,
            window_start=window.start,
            window_end=window.end,
            canary_n=n_c,
            baseline_n=n_b,
            gating=metric.critical,
            required=metric.critical and (overall or (seg.column, seg.value) in critical),
        )
        if seg.base is None or seg.can is None or min(n_b, n_c) < a.min_samples:
            fields["reason"] = (
                f"{metric.name}{where}: too few labelled samples (canary {n_c:,}, baseline {n_b:,}; "
                f"minimum {a.min_samples:,})"
            )
            weighed.append((fields, None, ""))
            continue
        cmp = est.compare(seg.base, seg.can, edges)
        bound = est.bound(tolerance)
        fields |= dict(
            canary_value=_finite(cmp.canary), baseline_value=_finite(cmp.baseline), threshold=est.display(bound)
        )
        if not (math.isfinite(cmp.theta) and math.isfinite(cmp.se)):
            fields["reason"] = (
                f"{metric.name}{where}: cannot be compared (a mean is zero, or an arm lacks positives or negatives)"
            )
            weighed.append((fields, None, ""))
            continue
        n_star = a.sequential_n_star if a.sequential else None
        ev = weigh(cmp.theta, cmp.se, bound, est.higher_is_better, a.alpha, cmp.n, n_star)
        fields |= dict(ci_low=est.display(ev.low), ci_high=est.display(ev.high))
        described = f"{est.describe(where, cmp, ev, level, tolerance)}, n={n_c:,} canary / {n_b:,} baseline"
        weighed.append((fields, ev, described))
    tested = [ev.p_worse for _, ev, _ in weighed if ev is not None]
    failed = iter(reject(tested, a.alpha, a.correction))
    out = []
    for fields, ev, described in weighed:
        if ev is None:
            out.append(CheckResult(verdict=Verdict.INCONCLUSIVE, **fields))
            continue
        verdict = Verdict.FAIL if next(failed) else Verdict.PASS if ev.p_within <= a.alpha else Verdict.INCONCLUSIVE
        outcome = {
            Verdict.PASS: "within tolerance",
            Verdict.FAIL: "worse than tolerance",
            Verdict.INCONCLUSIVE: "not yet conclusive",
        }[verdict]
        out.append(CheckResult(verdict=verdict, reason=f"{described}: {outcome}", **fields))
    return out


def _simpson(est: Estimator, checks: list[CheckResult]) -> list[str]:
    """Flag an aggregate that improves while a segment's point estimate is beyond the tolerance."""
    overall = next((c for c in checks if c.segment == OVERALL), None)
    point = None if overall is None else est.point(overall.canary_value, overall.baseline_value)
    if point is None:
        return []
    up = est.higher_is_better
    if not (point > est.reference if up else point < est.reference):
        return []
    worse = []
    for c in checks:
        p = est.point(c.canary_value, c.baseline_value)
        beyond = p is not None and c.threshold is not None and (p < c.threshold if up else p > c.threshold)
        if c.segment != OVERALL and beyond:
            worse.append(f"{c.segment} ({c.verdict.value})")
    if worse:
        return [f"{est.metric.name} improves overall while {', '.join(worse)} degrades beyond tolerance"]
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
