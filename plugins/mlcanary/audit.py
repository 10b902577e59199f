"""The audit trail: every measurement and decision, with values, sample sizes, thresholds and window."""

from __future__ import annotations

import json
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import decisions, measurements


def record_checks(
    conn: Connection,
    checks: Iterable[CheckResult],
    *,
    model: str,
    rollout_id: str | None,
    stage: int | None,
    baseline_version: str | None,
    canary_version: str,
) -> int:
    """Store one row per check; returns how many were written."""
    now = utcnow()
    rows = [
        dict(
            rollout_id=rollout_id,
            model=model,
            tier=c.tier,
            stage=stage,
            check_name=c.check,
            segment=c.segment,
            baseline_version=baseline_version,
            canary_version=canary_version,
            window_start=c.window_start,
            window_end=c.window_end,
            baseline_value=c.baseline_value,
            canary_value=c.canary_value,
            baseline_n=c.baseline_n,
            canary_n=c.canary_n,
            threshold=c.threshold,
            ci_low=c.ci_low,
            ci_high=c.ci_high,
            verdict=c.verdict.value,
            reason=c.reason,
            measured_at=now,
            histogram=None if c.histogram is None else json.dumps(dict(baseline=c.histogram[0], canary=c.histogram[1])),
        )
        for c in checks
    ]
    if rows:
        conn.execute(sa.insert(measurements), rows)
    return len(rows)


def record_decision(
    conn: Connection,
    *,
    rollout_id: str | None,
    model: str,
    stage: int | None,
    action: str,
    verdict: Verdict | None,
    reason: str,
    key: str | None = None,
) -> bool:
    """Store one decision; returns whether it was new.

    With a ``key`` the decision is idempotent: a retried task that decides the same thing again (the
    same key for the same rollout) records nothing. Without one, every call adds a row.
    """
    if key is not None and rollout_id is not None:
        seen = conn.execute(
            sa.select(decisions.c.id).where(decisions.c.rollout_id == rollout_id, decisions.c.decision_key == key)
        ).first()
        if seen is not None:
            return False
    conn.execute(
        sa.insert(decisions).values(
            rollout_id=rollout_id,
            model=model,
            stage=stage,
            action=action,
            verdict=None if verdict is None else verdict.value,
            reason=reason,
            decided_at=utcnow(),
            decision_key=key,
        )
    )
    return True


def last_decision(conn: Connection, rollout_id: str, action: str) -> sa.Row | None:
    return conn.execute(
        sa.select(decisions)
        .where(decisions.c.rollout_id == rollout_id, decisions.c.action == action)
        .order_by(decisions.c.id.desc())
        .limit(1)
    ).one_or_none()
