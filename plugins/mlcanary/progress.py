"""Where a long wait stands, kept in the warehouse so it outlives the process that waits.

A stage's guardrail counters and an analysis' failing looks and extension are saved after every
poll or look; a trigger restarted on another triggerer, or a task retried after its worker died,
loads them and goes on. A wait that ended removes its row, so a cleared task starts afresh.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import progress


def load(conn: Connection, rollout_id: str, wait: str) -> dict[str, Any] | None:
    state = conn.execute(
        sa.select(progress.c.state).where(progress.c.rollout_id == rollout_id, progress.c.wait == wait)
    ).scalar_one_or_none()
    return None if state is None else dict(json.loads(state))


def save(conn: Connection, rollout_id: str, wait: str, state: dict[str, Any]) -> None:
    """Replace the wait's row (a delete and an insert: the same on every dialect, in the caller's
    transaction)."""
    clear(conn, rollout_id, wait)
    conn.execute(
        sa.insert(progress).values(rollout_id=rollout_id, wait=wait, state=json.dumps(state), updated_at=utcnow())
    )


def clear(conn: Connection, rollout_id: str, wait: str) -> None:
    conn.execute(sa.delete(progress).where(progress.c.rollout_id == rollout_id, progress.c.wait == wait))
