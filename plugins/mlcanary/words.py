"""How numbers read to people: durations."""

from __future__ import annotations

import math
from datetime import timedelta


def took(span: timedelta | float) -> str:
    """``39 min 30 s``, ``2 h 5 min``, ``12 s``: a duration for people (seconds, or a timedelta;
    an infinite one is ``no limit``)."""
    raw = span.total_seconds() if isinstance(span, timedelta) else float(span)
    if not math.isfinite(raw):
        return "no limit"
    seconds = round(raw)
    h, rest = divmod(abs(seconds), 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{h} h"] * bool(h) + [f"{m} min"] * bool(m) + [f"{sec} s"] * bool(sec and not h)
    return ("-" if seconds < 0 else "") + (" ".join(parts) or "0 s")
