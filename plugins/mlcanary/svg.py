"""Small inline SVG charts for the report page: a time chart, a forest plot and paired bars.

No JavaScript and nothing fetched: each chart is one ``<svg>`` element with its text escaped, a
``<title>`` on every mark (the browser shows it on hover) and a viewBox, so it scales with the page.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

FONT = 'font-family="system-ui, sans-serif" font-size="12"'
# verdict colours (colour-blind safe: Okabe-Ito), and the two arms
COLOURS = {
    "PASS": "#009E73",
    "FAIL": "#D55E00",
    "INCONCLUSIVE": "#E69F00",
    "INVALID": "#CC79A7",
    "baseline": "#0072B2",
    "canary": "#D55E00",
    "limit": "#555555",
}


@dataclass
class Series:
    label: str
    points: Sequence[tuple[datetime, float]]
    colour: str
    step: bool = False  # a value that holds until the next one (a traffic split)
    marks: Sequence[tuple[datetime, float, str, str]] = ()  # (x, y, colour, title): dots on the line


@dataclass
class Event:
    at: datetime
    label: str  # on hover
    colour: str = "#888888"
    tag: str = ""  # written at the line's top (a stage's number, say)


@dataclass
class TimeChart:
    """Lines over time, with horizontal limits and vertical events (stage boundaries, decisions).

    A non-finite value breaks its line (a stage boundary, say); ``span`` fixes the time axis so
    that charts stacked on a page line up.
    """

    title: str
    series: list[Series]
    y_label: str = ""
    limits: list[tuple[float, str]] = field(default_factory=list)  # (y, label): dashed lines
    limit_colour: str = COLOURS["limit"]
    reference: float | None = None  # a solid line: "no change"
    events: list[Event] = field(default_factory=list)
    span: tuple[datetime, datetime] | None = None
    width: int = 1040
    height: int = 220
    y_min: float | None = None
    y_max: float | None = None

    def render(self) -> str:
        xs = [x for s in self.series for x, _ in s.points] + [e.at for e in self.events]
        ys = [y for s in self.series for _, y in s.points if math.isfinite(y)] + [y for y, _ in self.limits]
        ys += [] if self.reference is None else [self.reference]
        if not xs or not ys:
            return _empty(self.title, self.width)
        left, right, top, bottom = 64, 150, 30, 36
        w, h = self.width - left - right, self.height - top - bottom
        x0, x1 = self.span or (min(xs), max(xs))
        edge = max((x1 - x0).total_seconds(), 1.0) * 0.02  # room for the marks at both ends
        x0, x1 = x0 - timedelta(seconds=edge), x1 + timedelta(seconds=edge)
        span = (x1 - x0).total_seconds()
        lo = self.y_min if self.y_min is not None else min(ys)
        hi = self.y_max if self.y_max is not None else max(ys)
        if hi - lo <= 0:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.08
        lo, hi = (lo if self.y_min is not None else lo - pad), (hi if self.y_max is not None else hi + pad)

        def px(x: datetime) -> float:
            return left + min(max((x - x0).total_seconds() / span, 0.0), 1.0) * w

        def py(y: float) -> float:
            return top + (hi - min(max(y, lo), hi)) / (hi - lo) * h

        out = [_open(self.width, self.height, self.title)]
        out.append(f'<text x="{left}" y="16" font-weight="600">{escape(self.title)}</text>')
        for tick in _ticks(lo, hi):  # the value axis
            y = py(tick)
            out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{number(tick)}</text>')
        if self.y_label:
            out.append(
                f'<text transform="translate(14 {top + h / 2:.0f}) rotate(-90)" text-anchor="middle">'
                f"{escape(self.y_label)}</text>"
            )
        for t, label in _time_ticks(x0, x1):
            x = px(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + h}" y2="{top + h + 4}" stroke="#999"/>')
            out.append(f'<text x="{x:.1f}" y="{top + h + 17}" text-anchor="middle">{label}</text>')
        out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>')
        for e in self.events:
            x = px(e.at)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + h}" stroke="{e.colour}" '
                f'stroke-dasharray="3 3"><title>{escape(e.label)}</title></line>'
            )
            if e.tag:  # beside the line, on the side with room
                side = f'x="{x - 3:.1f}" text-anchor="end"' if x > left + 0.85 * w else f'x="{x + 3:.1f}"'
                out.append(f'<text {side} y="{top + 11}" font-size="10" fill="{e.colour}">{escape(e.tag)}</text>')
        if self.reference is not None:
            out.append(
                f'<line x1="{left}" x2="{left + w}" y1="{py(self.reference):.1f}" y2="{py(self.reference):.1f}" '
                'stroke="#333" stroke-width="1"><title>no change</title></line>'
            )
        for y, label in self.limits:
            out.append(
                f'<line x1="{left}" x2="{left + w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="{self.limit_colour}" '
                f'stroke-dasharray="6 4"><title>{escape(label)}</title></line>'
            )
        legend = [(s.label, s.colour, False) for s in self.series if s.label]
        legend += [(lab, self.limit_colour, True) for _, lab in self.limits]
        legend += [] if self.reference is None else [("no change", "#333", False)]
        for s in self.series:
            for run in _runs([(px(x), py(y)) if math.isfinite(y) else None for x, y in s.points]):
                pts = run
                if s.step:
                    stepped = [pts[0]]
                    for (_, ya), (xb, yb) in itertools.pairwise(pts):
                        stepped += [(xb, ya), (xb, yb)]
                    pts = stepped
                if len(pts) > 1:
                    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                    out.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" stroke-width="1.8"/>')
                else:
                    out.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="2.5" fill="{s.colour}"/>')
            for x, y, colour, title in s.marks:
                if math.isfinite(y):
                    out.append(
                        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour}" stroke="white" '
                        f'stroke-width="1.5"><title>{escape(title)}</title></circle>'
                    )
        for i, (label, colour, dashed) in enumerate(legend):  # right of the plot, one per line
            y = top + 8 + i * 16
            dash = ' stroke-dasharray="6 4"' if dashed else ""
            out.append(
                f'<line x1="{left + w + 10}" x2="{left + w + 28}" y1="{y}" y2="{y}" stroke="{colour}" '
                f'stroke-width="2"{dash}/><text x="{left + w + 32}" y="{y + 4}">{escape(_clip(label, 18))}</text>'
            )
        out.append("</svg>")
        return "".join(out)


def _runs(points: Sequence[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """The stretches of a line between its breaks (None)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if r]


@dataclass
class ForestRow:
    label: str
    low: float | None
    point: float | None
    high: float | None
    verdict: str
    title: str  # the check's reason, shown on hover


@dataclass
class ForestPlot:
    """Each row's effect with its interval, against no change (``reference``) and the tolerance."""

    title: str
    rows: list[ForestRow]
    reference: float
    tolerance: float | None
    axis_label: str
    fmt: str = "{:.3g}"
    text: Callable[[float], str] = field(default=lambda v: number(v))  # an interval's end, in words
    width: int = 1040

    def render(self) -> str:
        vals = [v for r in self.rows for v in (r.low, r.point, r.high) if v is not None and math.isfinite(v)]
        vals += [self.reference] + ([self.tolerance] if self.tolerance is not None else [])
        left, right, top, row_h = 230, 250, 44, 18
        w = self.width - left - right
        height = top + row_h * len(self.rows) + 40
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.08 or 0.05
        lo, hi = lo - pad, hi + pad

        def px(v: float) -> float:
            return left + (min(max(v, lo), hi) - lo) / (hi - lo) * w

        out = [_open(self.width, height, self.title)]
        out.append(f'<text x="8" y="16" font-weight="600">{escape(self.title)}</text>')
        bottom = top + row_h * len(self.rows)
        for tick in _ticks(lo, hi):
            x = px(tick)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{bottom}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{number(tick)}</text>')
        out.append(
            f'<text x="{left + w / 2:.0f}" y="{bottom + 32}" text-anchor="middle">{escape(self.axis_label)}</text>'
        )
        x = px(self.reference)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{bottom}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle">no change</text>')
        if self.tolerance is not None:
            x = px(self.tolerance)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{bottom}" stroke="{COLOURS["FAIL"]}" '
                f'stroke-dasharray="6 4"/><text x="{x:.1f}" y="{top - 22}" text-anchor="middle" '
                f'fill="{COLOURS["FAIL"]}">tolerance {escape(self.fmt.format(self.tolerance))}</text>'
            )
        for i, r in enumerate(self.rows):
            y = top + row_h * i + row_h / 2
            colour = COLOURS.get(r.verdict, "#777")
            if i % 2:
                out.append(
                    f'<rect x="0" y="{y - row_h / 2:.1f}" width="{self.width}" height="{row_h}" fill="#f7f7f7"/>'
                )
            out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(_clip(r.label, 32))}</text>')
            tip = f"<title>{escape(r.title)}</title>"
            if r.low is not None and r.high is not None and math.isfinite(r.low) and math.isfinite(r.high):
                out.append(
                    f'<line x1="{px(r.low):.1f}" x2="{px(r.high):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                    f'stroke="{colour}" stroke-width="2.5">{tip}</line>'
                )
            if r.point is not None and math.isfinite(r.point):
                out.append(f'<circle cx="{px(r.point):.1f}" cy="{y:.1f}" r="4" fill="{colour}">{tip}</circle>')
            text = "no interval" if r.low is None or r.high is None else f"{self.text(r.low)} to {self.text(r.high)}"
            out.append(
                f'<text x="{left + w + 10}" y="{y + 4:.1f}" fill="{colour}">{escape(r.verdict)}'
                f'<tspan fill="#555"> {escape(text)}</tspan></text>'
            )
        out.append("</svg>")
        return "".join(out)


@dataclass
class PairedBars:
    """Two arms' shares per bin, side by side (a drift histogram)."""

    title: str
    baseline: Sequence[float]
    canary: Sequence[float]
    x_label: str
    names: tuple[str, str] = ("baseline", "canary")
    width: int = 340
    height: int = 200

    def render(self) -> str:
        b_total, c_total = sum(self.baseline) or 1.0, sum(self.canary) or 1.0
        b = [v / b_total for v in self.baseline]
        c = [v / c_total for v in self.canary]
        if not b:
            return _empty(self.title, self.width)
        left, top, bottom, right = 44, 42, 34, 8
        w, h = self.width - left - right, self.height - top - bottom
        hi = max(b + c) * 1.1 or 1.0
        slot = w / len(b)
        out = [_open(self.width, self.height, self.title)]
        out.append(f'<text x="{left}" y="16" font-weight="600">{escape(self.title)}</text>')
        for tick in _ticks(0, hi):
            y = top + h - tick / hi * h
            out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:.0%}</text>')
        for i, (vb, vc) in enumerate(zip(b, c, strict=True)):
            x = left + i * slot
            for j, (v, arm) in enumerate(((vb, "baseline"), (vc, "canary"))):
                bh = v / hi * h
                out.append(
                    f'<rect x="{x + 1 + j * (slot - 2) / 2:.1f}" y="{top + h - bh:.1f}" width="{(slot - 2) / 2:.1f}" '
                    f'height="{bh:.1f}" fill="{COLOURS[arm]}"><title>bin {i + 1}: {arm} {v:.1%}'
                    "</title></rect>"
                )
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#999"/>')
        out.append(
            f'<text x="{left + w / 2:.0f}" y="{self.height - 8}" text-anchor="middle">{escape(self.x_label)}</text>'
        )
        for j, (name, arm) in enumerate(zip(self.names, ("baseline", "canary"), strict=True)):  # the legend
            x = left + j * 110
            out.append(
                f'<rect x="{x}" y="23" width="10" height="10" fill="{COLOURS[arm]}"/>'
                f'<text x="{x + 14}" y="32">{escape(_clip(name, 14))}</text>'
            )
        out.append("</svg>")
        return "".join(out)


# --- helpers ---------------------------------------------------------------------------------------


def _open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" {FONT}>'
    )


def _empty(title: str, width: int) -> str:
    return (
        _open(width, 48, title)
        + f'<text x="8" y="16" font-weight="600">{escape(title)}</text><text x="8" y="36" fill="#777">'
        "nothing recorded</text></svg>"
    )


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round values between ``lo`` and ``hi`` (1, 2 or 5 times a power of ten apart)."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step) + 1)]


def _time_ticks(x0: datetime, x1: datetime, n: int = 6) -> list[tuple[datetime, str]]:
    """About ``n`` round times between ``x0`` and ``x1``, labelled by what changes between them."""
    span = (x1 - x0).total_seconds()
    steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]
    step = next((s for s in steps if s >= span / n), 86400 * math.ceil(span / n / 86400) or 86400)
    fmt = "%H:%M:%S" if step < 60 else ("%H:%M" if step < 86400 else "%m-%d")
    epoch = datetime(1970, 1, 1, tzinfo=x0.tzinfo)
    first = epoch + timedelta(seconds=math.ceil((x0 - epoch).total_seconds() / step) * step)
    out = []
    t = first
    while t <= x1:
        out.append((t, t.strftime(fmt)))
        t += timedelta(seconds=step)
    return out
