"""Power planning: what a spec's stages can detect at a given traffic, before any rollout.

For each stage, the labelled rows of both arms in the analysis window at the end of its bake follow
from the request rate, the stages' shares and bakes, ``label_delay`` and ``window`` (the window
starts no earlier than the rollout, as the live look's does). A metric's standard error at those
sizes comes from its own estimator (:mod:`mlcanary.metrics`) on arms of the baseline's CTR, and
the look's decision rule is the one :func:`mlcanary.stats.gate.weigh` applies: FAIL when the
interval ``theta ± z·SE`` (``z`` of the confidence sequence at level 2α, or the fixed-horizon
``z_{1-α}``) lies beyond the tolerance bound ``b``, PASS when it lies within. So with
``θ̂ ~ N(θ, SE²)`` a true change ``θ`` fails with probability ``Φ((|θ − b| − z·SE) / SE)`` on the
bad side, and the change that fails with probability ``power`` is ``b ∓ (z + z_power)·SE``
(Chow, Shao & Wang, *Sample Size Calculations in Clinical Research*, §3.2, non-inferiority).
This is the power of the bake's last look alone; the looks before it only add to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta

from scipy import stats

from mlcanary.metrics import ArmBins, Estimator, estimator
from mlcanary.spec import RolloutSpec
from mlcanary.stats.sequential import cs_multiplier

_MAX_BAKE = timedelta(days=30)  # the search for a bake stops here


@dataclass(frozen=True)
class StageRows:
    """The labelled rows of each arm in the analysis window at the end of a stage's bake."""

    stage: int  # 1-based
    percent: float
    bake: timedelta
    canary: float
    baseline: float


@dataclass(frozen=True)
class MetricPlan:
    """One metric at the end of one stage: the changes it resolves with the planned power."""

    rows: StageRows
    metric: str
    kind: str
    relative: bool  # tolerance and changes as ratios (else differences in the metric's unit)
    tolerance: float
    se: float | None = None  # on the test scale (log ratio or difference); None: not planned
    fails_at: float | None = None  # a change (shown scale: ratio or difference) at or beyond this FAILs with `power`
    passes_at: float | None = None  # a change at or within this PASSes with `power`
    rows_needed: float | None = None  # canary rows (this look's ratio of arms) at which no change PASSes
    bake_needed: timedelta | None = None  # the bake giving them (None: the window caps the look below)
    note: str = ""


def window_rows(spec: RolloutSpec, rate: float, stage: int, bake: timedelta | None = None) -> StageRows:
    """Labelled rows per arm in the look at the end of ``stage`` (0-based) if it bakes ``bake``
    (default: the spec's), the stages before it baking theirs, at ``rate`` requests per second."""
    a = spec.analysis
    bakes = [s.bake for s in spec.stages[:stage]] + [bake or spec.stages[stage].bake]
    ends = [sum(bakes[: i + 1], timedelta()) for i in range(len(bakes))]
    end = ends[-1] - a.label_delay
    start = max(timedelta(), end - a.window)
    canary = total = 0.0
    for i, (s, stop) in enumerate(zip(spec.stages[: stage + 1], ends, strict=True)):
        begin = ends[i - 1] if i else timedelta()
        overlap = (min(stop, end) - max(begin, start)).total_seconds()
        if overlap > 0:
            total += rate * overlap
            canary += rate * overlap * s.percent / 100
    return StageRows(stage + 1, spec.stages[stage].percent, bakes[-1], canary, total - canary)


def _arm(n: float, ctr: float) -> ArmBins:
    """An arm of ``n`` rows at the baseline's CTR, as its sums (a 0/1 label: y² = y)."""
    return ArmBins({"n": n, "y": ctr * n, "y2": ctr * n}, {})


def _z(spec: RolloutSpec, n: float, alpha: float) -> float:
    a = spec.analysis
    return cs_multiplier(n, 2 * alpha, a.sequential_n_star) if a.sequential else float(stats.norm.ppf(1 - alpha))


def _resolved(
    spec: RolloutSpec, est: Estimator, rows: StageRows, ctr: float, alpha: float, power: float
) -> tuple[float, float, float]:
    """(SE, the test-scale change that fails with ``power``, the one that passes with it)."""
    bound = est.bound(est.metric.tolerance)
    z_power = float(stats.norm.ppf(power))
    sign = -1.0 if est.higher_is_better else 1.0  # the bad side
    cmp = est.compare(_arm(rows.baseline, ctr), _arm(rows.canary, ctr), [])
    z = _z(spec, cmp.n, alpha)
    passes = bound - sign * (z + z_power) * cmp.se
    fails = bound + sign * (z + z_power) * cmp.se
    for _ in range(4):  # the SE at the failing change: the canary's CTR moves with it
        worse = ctr * math.exp(fails) if est.relative else ctr
        cmp_f = est.compare(_arm(rows.baseline, ctr), _arm(rows.canary, min(worse, 1.0)), [])
        fails = bound + sign * (z + z_power) * cmp_f.se
    return cmp.se, fails, passes


def fail_probability(
    spec: RolloutSpec, est: Estimator, rows: StageRows, ctr: float, ratio: float, alpha: float | None = None
) -> float:
    """The probability that the look FAILs a canary whose metric is ``ratio`` × the baseline's
    (relative kinds): Φ((|θ − b| − z·SE) / SE) with θ = ln ratio on the bad side of the bound."""
    a = spec.analysis
    alpha = a.alpha if alpha is None else alpha
    cmp = est.compare(_arm(rows.baseline, ctr), _arm(rows.canary, min(ctr * ratio, 1.0)), [])
    bound, theta = est.bound(est.metric.tolerance), math.log(ratio)
    beyond = (bound - theta) if est.higher_is_better else (theta - bound)
    return float(stats.norm.cdf((beyond - _z(spec, cmp.n, alpha) * cmp.se) / cmp.se))


def plan(
    spec: RolloutSpec, rate: float, baseline_ctr: float, power: float = 0.8, segment_values: int = 0
) -> list[MetricPlan]:
    """Per stage and metric, what the look at the end of the bake resolves with ``power``. The
    overall check is planned; with ``segment_values`` values compared besides it, Holm's first step
    tests it at α / (1 + segment_values)."""
    if not 0 < baseline_ctr < 1:
        raise ValueError(f"--baseline-ctr must lie strictly between 0 and 1, not {baseline_ctr}")
    if rate <= 0:
        raise ValueError(f"--rate must be positive, not {rate}")
    alpha = spec.analysis.alpha / (1 + segment_values)
    out = []
    for k in range(len(spec.stages)):
        rows = window_rows(spec, rate, k)
        for metric in spec.analysis.metrics:
            est = estimator(metric)
            common = dict(
                rows=rows, metric=metric.name, kind=metric.kind, relative=est.relative, tolerance=metric.tolerance
            )
            if not est.label_only:
                note = f"{metric.kind}: its standard error needs the scores' distribution, not planned from a CTR"
                out.append(MetricPlan(**common, note=note))
                continue
            if min(rows.canary, rows.baseline) < spec.analysis.min_samples:
                note = f"{rows.canary:,.0f} canary rows: fewer than min_samples ({spec.analysis.min_samples:,})"
                out.append(MetricPlan(**common, note=note))
                continue
            se, fails, passes = _resolved(spec, est, rows, baseline_ctr, alpha, power)
            out.append(
                MetricPlan(
                    **common,
                    se=se,
                    fails_at=est.display(fails),
                    passes_at=est.display(passes),
                    rows_needed=_rows_needed(spec, est, rows, baseline_ctr, alpha, power),
                    bake_needed=_bake_needed(spec, est, k, rate, baseline_ctr, alpha, power),
                )
            )
    return out


def _passes_no_change(
    spec: RolloutSpec, est: Estimator, rows: StageRows, ctr: float, alpha: float, power: float
) -> bool:
    if min(rows.canary, rows.baseline) < spec.analysis.min_samples:
        return False
    _, _, passes = _resolved(spec, est, rows, ctr, alpha, power)
    return passes <= 0 if est.higher_is_better else passes >= 0  # no change is on the passing side


def _rows_needed(
    spec: RolloutSpec, est: Estimator, rows: StageRows, ctr: float, alpha: float, power: float
) -> float | None:
    """The canary rows, the baseline's in this look's ratio, at which no change PASSes with ``power``."""
    ratio = rows.baseline / rows.canary

    def enough(n: float) -> bool:
        return _passes_no_change(spec, est, replace(rows, canary=n, baseline=n * ratio), ctr, alpha, power)

    low, high = 1.0, 1e12
    if not enough(high):
        return None
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if enough(mid) else (mid, high)
    return math.ceil(high)


def _bake_needed(
    spec: RolloutSpec, est: Estimator, stage: int, rate: float, ctr: float, alpha: float, power: float
) -> timedelta | None:
    """The shortest bake of ``stage`` whose last look passes no change with ``power`` (so a change
    one tolerance beyond the bound fails with it too), by bisection; None beyond 30 days or the
    window's cap."""

    def enough(bake: timedelta) -> bool:
        return _passes_no_change(spec, est, window_rows(spec, rate, stage, bake), ctr, alpha, power)

    low, high = spec.analysis.label_delay, _MAX_BAKE
    if not enough(high):
        return None
    while (high - low) > timedelta(seconds=1):
        mid = low + (high - low) / 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return timedelta(seconds=math.ceil(high.total_seconds()))
