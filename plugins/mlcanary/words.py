"""How numbers read to people: durations."""

from __future__ import annotations

from datetime import timedelta


def took(span: timedelta) -> str:
    """``39 min 30 s``, ``2 h 5 min``, ``12 s``: a duration for people."""
    seconds = round(span.total_seconds())
    h, rest = divmod(abs(seconds), 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{h} h"] * bool(h) + [f"{m} min"] * bool(m) + [f"{sec} s"] * bool(sec and not h)
    return ("-" if seconds < 0 else "") + (" ".join(parts) or "0 s")
