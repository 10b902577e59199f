"""Rollout reports from the audit tables: what happened, and why."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mlcanary.warehouse.schema import decisions, measurements, rollouts, traffic_history


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _rows(conn: Connection, stmt: sa.Select) -> list[dict[str, Any]]:
    return [{k: _iso(v) for k, v in row._mapping.items()} for row in conn.execute(stmt)]


def rollout_report(conn: Connection, rollout_id: str) -> dict[str, Any] | None:
    """Everything recorded about one rollout; the non-passing measurements in full."""
    found = _rows(conn, sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id))
    if not found:
        return None
    m = measurements.c
    return {
        "rollout": found[0],
        "traffic": _rows(
            conn,
            sa.select(traffic_history).where(traffic_history.c.rollout_id == rollout_id).order_by(traffic_history.c.id),
        ),
        "decisions": _rows(
            conn, sa.select(decisions).where(decisions.c.rollout_id == rollout_id).order_by(decisions.c.id)
        ),
        "measurement_counts": _rows(
            conn,
            sa.select(m.tier, m.verdict, sa.func.count().label("n"))
            .where(m.rollout_id == rollout_id)
            .group_by(m.tier, m.verdict)
            .order_by(m.tier, m.verdict),
        ),
        "not_passing": _rows(
            conn,
            sa.select(measurements)
            .where(m.rollout_id == rollout_id, m.verdict.in_(["FAIL", "INVALID"]))
            .order_by(m.id),
        ),
    }


def recent_rollouts(conn: Connection, model: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    stmt = sa.select(rollouts).order_by(rollouts.c.started_at.desc()).limit(limit)
    if model:
        stmt = stmt.where(rollouts.c.model == model)
    return _rows(conn, stmt)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table (no dependency, so it prints the same everywhere)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(text.rstrip() for text in out)


def format_report(report: dict[str, Any]) -> str:
    r = report["rollout"]
    lines = [
        f"Rollout {r['rollout_id']}",
        f"  model {r['model']}: {r['baseline_version']} → {r['canary_version']}"
        + ("  (dry run)" if r["dry_run"] else ""),
        f"  status {r['status']}, stage reached {r['stage_reached']}, canary traffic {r['canary_percent']:g} %",
        f"  started {r['started_at']}, ended {r['ended_at'] or '-'}",
        f"  reason: {r['reason'] or '-'}",
        "",
        "Traffic:",
    ]
    lines += [
        f"  {t['applied_at']}  {'?' if t['from_percent'] is None else format(t['from_percent'], 'g')} → "
        f"{'?' if t['to_percent'] is None else format(t['to_percent'], 'g')} %  {t['note']}"
        for t in report["traffic"]
    ]
    lines += ["", "Decisions:"]
    lines += [
        f"  {d['decided_at']}  stage {d['stage'] if d['stage'] is not None else '-'}  {d['action']}"
        f"{' ' + d['verdict'] if d['verdict'] else ''}: {d['reason']}"
        for d in report["decisions"]
    ]
    counts = ", ".join(f"{c['tier']} {c['verdict']} {c['n']}" for c in report["measurement_counts"])
    lines += ["", f"Measurements: {counts or 'none'}"]
    if report["not_passing"]:
        lines.append("Not passing:")
        lines += [f"  stage {x['stage']} {x['tier']} {x['verdict']}: {x['reason']}" for x in report["not_passing"]]
    return "\n".join(lines)


def last_checks(conn: Connection, rollout_id: str) -> dict[str, dict[str, Any]]:
    """Per tier, the newest look's time, its verdict counts and the reasons of its checks that did not pass."""
    m = measurements.c
    out: dict[str, dict[str, Any]] = {}
    for tier in ("guardrail", "analysis"):
        at = conn.execute(
            sa.select(sa.func.max(m.measured_at)).where(m.rollout_id == rollout_id, m.tier == tier)
        ).scalar()
        if at is None:
            continue
        rows = conn.execute(
            sa.select(m.verdict, m.reason).where(m.rollout_id == rollout_id, m.tier == tier, m.measured_at == at)
        ).all()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.verdict] = counts.get(row.verdict, 0) + 1
        out[tier] = {
            "at": _iso(at),
            "verdicts": counts,
            "not_passing": [r.reason for r in rows if r.verdict != "PASS"][:3],
        }
    return out
