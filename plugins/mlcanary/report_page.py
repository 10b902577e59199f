"""A rollout's report as one HTML page, from the audit tables: the headline, the traffic timeline,
the guardrails over time, the analysis (forest plots per metric, drift histograms, the data and
split checks) and the decision log. Plots are inline SVG (:mod:`mlcanary.svg`): the page needs
nothing from the network and no JavaScript; the Airflow plugin serves it, ``mlcanary report
--html`` writes it to a file.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.engine import Connection

from mlcanary.lifecycle import Status
from mlcanary.metrics import Estimator, change, difference, estimator
from mlcanary.spec import MetricSpec, RolloutSpec, parse_spec
from mlcanary.svg import COLOURS, Event, ForestPlot, ForestRow, PairedBars, Series, TimeChart, number
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import decisions, measurements, rollouts, traffic_history
from mlcanary.words import took

# what a person decided (the rest mlcanary decided on its own)
PERSON_ACTIONS = frozenset({"approve", "reject", "promote_chosen", "rollback_chosen", "extend", "abort", "force"})
_ENDS = {"promote": COLOURS["PASS"], "rollback": COLOURS["FAIL"], "abort": COLOURS["FAIL"]}


@dataclass
class PageData:
    """What the page shows, read in a handful of statements (audit rows, never prediction rows)."""

    rollout: sa.Row
    spec: RolloutSpec | None
    history: list[sa.Row]
    decisions: list[sa.Row]
    guardrails: list[sa.Row]  # every poll's checks, oldest first
    analysis: list[sa.Row]  # the newest analysis look's checks
    looks: int  # analysis looks recorded
    trend: list[sa.Row]  # every look's overall check of each metric, oldest first


def load(conn: Connection, rollout_id: str) -> PageData | None:
    """The page's data for ``rollout_id`` (None: no such rollout)."""
    row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one_or_none()
    if row is None:
        return None
    spec = None
    if row.spec:
        try:
            spec = parse_spec(json.loads(row.spec), f"the spec recorded with {rollout_id}")
        except ValueError:  # recorded by an older mlcanary: the page goes without the metrics' definitions
            spec = None
    m = measurements.c
    mine = m.rollout_id == rollout_id
    present = set(conn.execute(sa.select(sa.text("*")).select_from(measurements).limit(0)).keys())
    # a warehouse not yet upgraded (create_schema adds the column) has no histograms
    cols = [c if c.name in present else sa.null().label(c.name) for c in measurements.columns]
    last_look = sa.select(sa.func.max(m.measured_at)).where(mine, m.tier == "analysis").scalar_subquery()
    return PageData(
        rollout=row,
        spec=spec,
        history=list(
            conn.execute(
                sa.select(traffic_history)
                .where(traffic_history.c.rollout_id == rollout_id)
                .order_by(traffic_history.c.applied_at, traffic_history.c.id)
            )
        ),
        decisions=list(
            conn.execute(sa.select(decisions).where(decisions.c.rollout_id == rollout_id).order_by(decisions.c.id))
        ),
        guardrails=list(
            conn.execute(sa.select(*cols).where(mine, m.tier == "guardrail").order_by(m.measured_at, m.id))
        ),
        analysis=list(
            conn.execute(sa.select(*cols).where(mine, m.tier == "analysis", m.measured_at == last_look).order_by(m.id))
        ),
        trend=list(
            conn.execute(
                sa.select(*cols)
                .where(mine, m.tier == "analysis", m.segment == "*", m.ci_low.is_not(None))
                .order_by(m.measured_at, m.id)
            )
        ),
        looks=int(
            conn.execute(
                sa.select(sa.func.count(sa.distinct(m.measured_at))).where(mine, m.tier == "analysis")
            ).scalar()
            or 0
        ),
    )


# --- the sections ----------------------------------------------------------------------------------


def headline(data: PageData) -> dict[str, Any]:
    r = data.rollout
    ended = r.ended_at or utcnow()
    people = [d for d in data.decisions if d.action in PERSON_ACTIONS]
    stages = len(data.spec.stages) if data.spec else None
    return {
        "title": f"{r.model}: {r.baseline_version} → {r.canary_version}",
        "status": r.status,
        "reason": r.reason or ("running" if r.ended_at is None else "-"),
        "facts": [
            ("outcome", r.status.replace("_", " ") + (" (dry run)" if r.dry_run else "")),
            ("stage reached", f"{r.stage_reached}" + (f" of {stages}" if stages else "")),
            ("canary traffic now", f"{r.canary_percent:g} %"),
            ("started", f"{r.started_at:%Y-%m-%d %H:%M:%S} UTC"),
            ("ended", "still running" if r.ended_at is None else f"{r.ended_at:%Y-%m-%d %H:%M:%S} UTC"),
            ("duration", took(ended - r.started_at) + (" so far" if r.ended_at is None else "")),
            (
                "decided by",
                "; ".join(f"{d.action.replace('_', ' ')}: {d.reason}" for d in people)
                or "mlcanary, on its own (no person chose)",
            ),
            ("rollout", r.rollout_id),
        ],
    }


def _span(data: PageData) -> tuple[datetime, datetime]:
    """The rollout's time: every chart of the page shares this axis, so they line up."""
    r = data.rollout
    ends = (
        [r.ended_at or utcnow()]
        + [h.applied_at for h in data.history[-1:]]
        + [m.measured_at for m in data.guardrails[-1:]]
    )
    return r.started_at, max(ends)


def _events(data: PageData) -> list[Event]:
    """Each stage's start and the end, as tagged lines; the other decisions on hover."""
    out = []
    for d in data.decisions:
        label = f"{d.decided_at:%H:%M:%S} {d.action}" + (f" (stage {d.stage})" if d.stage else "") + f": {d.reason}"
        if d.action == "advance":
            out.append(Event(d.decided_at, label, "#888888", f"stage {d.stage}"))
        elif d.action in _ENDS:
            out.append(Event(d.decided_at, label, _ENDS[d.action], d.action))
        elif d.action in PERSON_ACTIONS or d.action == "ask":
            out.append(Event(d.decided_at, label, "#555555"))
    return out


def traffic_chart(data: PageData) -> str:
    """The canary's share over time, one step per applied change, with the decisions marked."""
    r = data.rollout
    points: list[tuple[datetime, float]] = [(r.started_at, 0.0)]
    marks = []
    for h in data.history:
        if h.to_percent is None:  # the platform could not be read: shown, never guessed
            marks.append((h.applied_at, points[-1][1], COLOURS["INVALID"], f"split unknown: {h.note}"))
            continue
        points.append((h.applied_at, float(h.to_percent)))
        state = "applied" if h.applied else "not applied (dry run or already in force)"
        marks.append((h.applied_at, float(h.to_percent), "#333333", f"{h.to_percent:g} % {state}: {h.note}"))
    start, end = _span(data)
    points.append((end, points[-1][1]))
    chart = TimeChart(
        f"Traffic to {r.canary_version} (final split: {r.canary_percent:g} %)",
        [Series(f"{r.canary_version} share", points, COLOURS["canary"], step=True, marks=marks)],
        y_label="% of traffic",
        events=_events(data),
        span=(start, end),
        y_min=0,
        y_max=max(100.0, max(p for _, p in points)),
        height=200,
    )
    return chart.render()


# what a guardrail check's threshold is, where it is not a limit
THRESHOLD_NAMES = {"sample_ratio": "expected share"}


def _by_stage(rows: list[sa.Row], value: Callable[[sa.Row], float | None]) -> list[tuple[datetime, float]]:
    """A check's values, oldest first, with a break (NaN) where a stage ends: stages do not join."""
    out: list[tuple[datetime, float]] = []
    stage = None
    for m in rows:
        v = value(m)
        if v is None:
            continue
        if stage is not None and m.stage != stage:
            out.append((m.measured_at, math.nan))
        out.append((m.measured_at, float(v)))
        stage = m.stage
    return out


def guardrail_charts(data: PageData) -> list[str]:
    """Each guardrail check over time for both arms against its limit; breaches marked."""
    by_check: dict[str, list[sa.Row]] = {}
    for m in data.guardrails:
        if m.check_name != "data":
            by_check.setdefault(m.check_name, []).append(m)
    r = data.rollout
    out = []
    for check, rows in by_check.items():
        canary = _by_stage(rows, lambda m: m.canary_value)
        baseline = _by_stage(rows, lambda m: m.baseline_value)
        marks = [
            (m.measured_at, m.canary_value, COLOURS[m.verdict], f"{m.measured_at:%H:%M:%S} {m.verdict}: {m.reason}")
            for m in rows
            if m.verdict != "PASS" and m.canary_value is not None
        ]
        limits = sorted({m.threshold for m in rows if m.threshold is not None})
        breaches = sum(m.verdict == "FAIL" for m in rows)
        title = f"{check}: {len(rows)} polls" + (f", {breaches} breach{'es' * (breaches != 1)}" if breaches else "")
        series = [Series(r.canary_version, canary, COLOURS["canary"], marks=marks)]
        if baseline:
            series.append(Series(r.baseline_version, baseline, COLOURS["baseline"]))
        what = THRESHOLD_NAMES.get(check, "limit")
        out.append(
            TimeChart(
                title,
                series,
                y_label=check,
                limits=[(v, f"{what} {v:g}") for v in limits[-2:]],
                events=_events(data),
                span=_span(data),
            ).render()
        )
    return out


@dataclass
class MetricView:
    name: str
    plot: str
    trend: str  # the overall effect look by look (empty: fewer than two looks compared)
    verdict: str
    reason: str


# A metric the spec no longer names is plotted as canary / baseline; its line is the recorded threshold.
_UNNAMED = MetricSpec(name="unnamed", kind="rate", tolerance=0.05)


def _estimator_of(spec: RolloutSpec | None, name: str) -> Estimator | None:
    """The estimator of the spec's metric ``name``; the ratio scale without a spec; None if the spec
    has no such metric (a data or split check)."""
    if spec is None:
        return estimator(_UNNAMED)
    return next((estimator(x) for x in spec.analysis.metrics if x.name == name), None)


def _point(est: Estimator, m: sa.Row) -> float | None:
    """The effect on the plot's scale: canary / baseline (relative metrics), else canary − baseline."""
    return est.point(m.canary_value, m.baseline_value)


def metric_views(data: PageData) -> list[MetricView]:
    """Per metric, a forest plot of the newest look: overall first, then every segment."""
    by_metric: dict[str, list[sa.Row]] = {}
    for m in data.analysis:
        if m.histogram is None and m.check_name not in ("data", "sample_ratio"):
            by_metric.setdefault(m.check_name, []).append(m)
    out = []
    for name, rows in by_metric.items():
        est = _estimator_of(data.spec, name)
        if est is None:  # a data or split check, listed in its table
            continue
        rows.sort(key=lambda m: (m.segment != "*", m.segment))
        tolerance = next((m.threshold for m in rows if m.segment == "*" and m.threshold is not None), None)
        if tolerance is None and data.spec is not None:  # no comparison recorded: the spec's tolerance
            tolerance = est.tolerance_line()
        overall = next((m for m in rows if m.segment == "*"), rows[0])
        fr = [
            ForestRow(
                "overall" if m.segment == "*" else m.segment,
                m.ci_low,
                _point(est, m),
                m.ci_high,
                m.verdict,
                f"{m.verdict}: {m.reason} (canary n={m.canary_n or 0:,}, baseline n={m.baseline_n or 0:,})",
            )
            for m in rows
        ]
        segments = len(rows) - 1
        plot = ForestPlot(
            f"{name}: {overall.verdict} (" + (f"overall and {segments} segments)" if segments else "overall only)"),
            fr,
            reference=est.reference,
            tolerance=tolerance,
            axis_label=est.axis + (f" ({est.metric.kind})" if data.spec else ""),
            text=change if est.relative else difference,
        ).render()
        out.append(MetricView(name, plot, _trend(data, name, est, tolerance), overall.verdict, overall.reason))
    return out


def _trend(data: PageData, name: str, est: Estimator, tolerance: float | None) -> str:
    """The overall effect and its interval at each look that compared, against the tolerance."""
    rows = [m for m in data.trend if m.check_name == name]
    if len(rows) < 2:
        return ""
    points = [(m.measured_at, _point(est, m)) for m in rows]
    limits = [] if tolerance is None else [(tolerance, f"tolerance {tolerance:.3g}")]
    marks = [
        (m.measured_at, p, COLOURS.get(m.verdict, "#777"), f"{m.verdict}: {m.reason}")
        for m, (_, p) in zip(rows, points, strict=True)
        if p is not None
    ]
    return TimeChart(
        f"{name}, overall, look by look",
        [
            Series("effect", [(t, p) for t, p in points if p is not None], "#333333", marks=marks),
            Series("interval", [(m.measured_at, m.ci_low) for m in rows], "#bbbbbb"),
            Series("", [(m.measured_at, m.ci_high) for m in rows], "#bbbbbb"),
        ],
        limits=limits,
        limit_colour=COLOURS["FAIL"],
        y_label=est.axis,
        span=_span(data),
        reference=est.reference,
        height=180,
    ).render()


def drift_plots(data: PageData) -> list[str]:
    out = []
    for m in data.analysis:
        if m.histogram is None:
            continue
        h = json.loads(m.histogram)
        what = (
            "score (output)" if m.check_name == "output_drift" else f"input {m.check_name.removeprefix('input_drift_')}"
        )
        psi = "-" if m.canary_value is None else f"{m.canary_value:.3f}"
        out.append(
            PairedBars(
                f"{what}: {m.verdict}, PSI {psi}",
                h["baseline"],
                h["canary"],
                "bins (baseline quantiles)",
                (data.rollout.baseline_version, data.rollout.canary_version),
            ).render()
        )
    return out


def other_checks(data: PageData) -> list[sa.Row]:
    """The newest look's checks that are neither a metric nor a drift histogram: data and split checks."""
    names = {x.name for x in data.spec.analysis.metrics} if data.spec else set()
    found = [m for m in data.analysis if m.histogram is None and m.check_name not in names]
    found += [m for m in data.guardrails if m.check_name == "data"][-5:]
    return found


def render(data: PageData, *, links: dict[str, str] | None = None, now: Callable[[], datetime] = utcnow) -> str:
    """The whole page. ``links``: named links shown under the headline (e.g. the Airflow run)."""
    head = headline(data)
    window = ""
    if data.analysis:
        a = data.analysis[0]
        window = f"stage {a.stage or '-'}, window {a.window_start:%H:%M:%S}–{a.window_end:%H:%M:%S} UTC"
    svg = Markup  # the charts escape their own text
    return _env.get_template("report.html").render(
        head=head,
        links=links or {},
        traffic=svg(traffic_chart(data)),
        history=data.history,
        guardrails=[svg(x) for x in guardrail_charts(data)],
        polls=len({m.measured_at for m in data.guardrails}),
        metrics=[(v.name, svg(v.plot), svg(v.trend), v.verdict, v.reason) for v in metric_views(data)],
        drift=[svg(x) for x in drift_plots(data)],
        others=other_checks(data),
        looks=data.looks,
        window=window,
        decisions=data.decisions,
        generated=f"{now():%Y-%m-%d %H:%M:%S} UTC",
    )


def rollouts_page(rows: Sequence[sa.Row], link: Callable[[sa.Row], str]) -> str:
    """Recent rollouts, grouped by model, newest first; ``link``: a row's report address."""
    models: dict[str, list[sa.Row]] = {}
    for r in rows:
        models.setdefault(r.model, []).append(r)
    stages = {}
    for r in rows:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            stages[r.rollout_id] = len(json.loads(r.spec)["stages"])
    return _env.get_template("rollouts.html").render(models=models, link=link, stages=stages, now=utcnow())


def posthoc_page(spec_name: str, rows: Sequence[sa.Row]) -> str:
    """A post-hoc DAG's windows: each metric's canary/baseline ratio over time, and the windows' verdicts."""
    series: dict[str, list[tuple[datetime, float]]] = {}
    for r in rows:
        if not r.checks:
            continue
        for c in json.loads(r.checks).get("checks", []):
            plain = c.get("histogram") is None and c["check"] != "data"
            if plain and c.get("segment") == "*" and c.get("canary_value") is not None and c.get("baseline_value"):
                series.setdefault(c["check"], []).append((r.window_end, c["canary_value"] / c["baseline_value"]))
    charts = [
        Markup(
            TimeChart(
                f"{name}: canary / baseline per window",
                [Series(name, pts, COLOURS["canary"])],
                reference=1.0,
            ).render()
        )
        for name, pts in series.items()
    ]
    return _env.get_template("posthoc.html").render(spec_name=spec_name, rows=rows, charts=charts)


def missing_page(message: str) -> str:
    """A page that says why there is no report (in the tab's frame, where JSON would be noise)."""
    return _env.get_template("missing.html").render(message=message)


def status_colour(status: str) -> str:
    if status == Status.PROMOTED:
        return COLOURS["PASS"]
    bad = {Status.ROLLED_BACK, Status.ROLLING_BACK, Status.ROLLBACK_FAILED, Status.SPLIT_MISMATCH, Status.FAILED}
    return COLOURS["FAIL"] if status in bad else "#666666"


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return number(value)


_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(("html",)),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["num"] = _fmt
_env.filters["pct"] = lambda v: "-" if v is None else f"{_fmt(v)} %"
_env.globals.update(colours=COLOURS, person=PERSON_ACTIONS, took=took, status_colour=status_colour)
