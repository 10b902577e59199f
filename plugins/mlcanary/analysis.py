"""Slow ML analysis: baseline vs canary on label-complete data, overall and per segment.

Every check tests the canary against the spec's tolerance, not the point estimate: a CTR 6 % below the
baseline is FAIL only once the whole confidence interval lies beyond the tolerance, PASS only once it
lies within it, and INCONCLUSIVE in between or with too few samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from mlcanary.spec import MetricSpec, RolloutSpec
from mlcanary.stats.rates import RateRatio, mean_ratio, rate_ratio
from mlcanary.tables import predictions_table
from mlcanary.verdict import CheckResult, Verdict, combine, first_reason
from mlcanary.warehouse import queries
from mlcanary.warehouse.queries import OVERALL, MappedTable, SegmentSums


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "baseline_version": self.baseline_version,
            "canary_version": self.canary_version,
            "window_start": self.window.start.isoformat(),
            "window_end": self.window.end.isoformat(),
            "label_asof": self.window.label_asof.isoformat(),
            "checks": [c.to_dict() for c in self.checks],
        }


def analyze(
    conn: Connection,
    spec: RolloutSpec,
    baseline_version: str,
    canary_version: str,
    window: AnalysisWindow,
) -> AnalysisResult:
    """Run every metric of the spec, overall and per segment, from one aggregate query."""
    a = spec.analysis
    table = predictions_table(spec, extra=a.segments)
    sums = queries.labelled_sums(
        conn,
        table,
        spec.model,
        [baseline_version, canary_version],
        window.start,
        window.end,
        window.label_asof,
        a.segments,
        {m.value: _value_expression(table, m.value) for m in a.metrics},
    )
    by_key: dict[tuple[str, str, str], SegmentSums] = {(s.version, s.column, s.value): s for s in sums}
    groups = sorted({(s.column, s.value) for s in sums} | {(OVERALL, OVERALL)}, key=lambda g: (g[0] != OVERALL, g))
    critical = {(c.column, c.value): c.tolerance for c in a.critical_segments}
    for key in critical:  # a critical segment with no data at all is still reported
        if key not in groups:
            groups.append(key)
    checks: list[CheckResult] = []
    for metric in a.metrics:
        for column, value in groups:
            overall = column == OVERALL
            tolerance = critical.get((column, value), metric.tolerance)
            checks.append(
                _ratio_check(
                    metric,
                    column,
                    value,
                    tolerance,
                    a.alpha,
                    a.min_samples,
                    window,
                    by_key.get((baseline_version, column, value)),
                    by_key.get((canary_version, column, value)),
                    required=metric.critical and (overall or (column, value) in critical),
                    gating=metric.critical,
                )
            )
    verdict = combine(checks)
    return AnalysisResult(verdict, first_reason(checks, verdict), baseline_version, canary_version, window, checks)


def _value_expression(t: MappedTable, value: str) -> ColumnElement:
    score, label = t.col("score"), t.col("label")
    return {
        "label": sa.cast(label, sa.Float),
        "score": sa.cast(score, sa.Float),
        "abs_error": sa.func.abs(score - label),
        "squared_error": (score - label) * (score - label),
    }[value]


def _compare(metric: MetricSpec, base: SegmentSums, canary: SegmentSums, alpha: float) -> RateRatio:
    s_b, q_b = base.sums[metric.value]
    s_c, q_c = canary.sums[metric.value]
    if metric.kind == "rate":
        return rate_ratio(s_c, canary.n, s_b, base.n, alpha)
    return mean_ratio(canary.n, s_c, q_c, base.n, s_b, q_b, alpha)


def _ratio_check(
    metric: MetricSpec,
    column: str,
    value: str,
    tolerance: float,
    alpha: float,
    min_samples: int,
    window: AnalysisWindow,
    base: SegmentSums | None,
    canary: SegmentSums | None,
    *,
    required: bool,
    gating: bool,
) -> CheckResult:
    segment = OVERALL if column == OVERALL else f"{column}={value}"
    where = "" if column == OVERALL else f" for {segment}"
    n_b, n_c = (base.n if base else 0), (canary.n if canary else 0)
    x_b = base.sums[metric.value][0] if base else 0.0
    x_c = canary.sums[metric.value][0] if canary else 0.0
    bound = 1 - tolerance if metric.higher_is_better else 1 + tolerance
    common = dict(
        tier="analysis",
        check=metric.name,
        segment=segment,
        window_start=window.start,
        window_end=window.end,
        canary_n=n_c,
        baseline_n=n_b,
        threshold=bound,
        gating=gating,
        required=required,
    )
    if min(n_b, n_c) < min_samples:
        return CheckResult(
            verdict=Verdict.INCONCLUSIVE,
            **common,
            canary_value=x_c / n_c if n_c else None,
            baseline_value=x_b / n_b if n_b else None,
            reason=f"{metric.name}{where}: too few labelled samples "
            f"(canary {n_c:,}, baseline {n_b:,}; minimum {min_samples:,})",
        )
    assert base is not None and canary is not None
    r = _compare(metric, base, canary, alpha)
    if not all(math.isfinite(v) for v in (r.ratio, r.ci_low, r.ci_high)):
        return CheckResult(
            verdict=Verdict.INCONCLUSIVE,
            **common,
            canary_value=_finite(r.canary_rate),
            baseline_value=_finite(r.baseline_rate),
            reason=f"{metric.name}{where}: no ratio to test (a mean is zero, negative or not a number)",
        )
    good = r.ci_low > bound if metric.higher_is_better else r.ci_high < bound
    bad = r.ci_high < bound if metric.higher_is_better else r.ci_low > bound
    verdict = Verdict.PASS if good else Verdict.FAIL if bad else Verdict.INCONCLUSIVE
    moved = "fell" if r.ratio < 1 else "rose"
    level = 100 * (1 - 2 * alpha)
    reason = (
        f"{metric.name}{where} {moved} {r.baseline_rate:.4g} → {r.canary_rate:.4g} "
        f"({_rel(r.ratio)}, {level:g} % CI {_rel(r.ci_low)} … {_rel(r.ci_high)}), "
        f"tolerance {100 * tolerance:g} %, n={n_c:,} canary / {n_b:,} baseline: "
        + {
            Verdict.PASS: "within tolerance",
            Verdict.FAIL: "worse than tolerance",
            Verdict.INCONCLUSIVE: "not yet conclusive",
        }[verdict]
    )
    return CheckResult(
        verdict=verdict,
        reason=reason,
        canary_value=r.canary_rate,
        baseline_value=r.baseline_rate,
        ci_low=r.ci_low,
        ci_high=r.ci_high,
        **common,
    )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _rel(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f} %"
