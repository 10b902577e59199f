"""The model registry of mlcanary's own: which versions are candidates, which one is the baseline.

A training pipeline registers a candidate (``mlcanary registry add``); a scheduled rollout takes the
newest candidate; the rollout moves it to ``rolling_out`` and then to ``baseline`` (promoted, the
previous baseline becomes ``retired``), ``rejected`` (rolled back) or ``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import registry

STATUSES = ("candidate", "rolling_out", "baseline", "retired", "rejected", "failed")


@dataclass(frozen=True)
class Entry:
    model: str
    version: str
    status: str
    registered_at: datetime
    updated_at: datetime
    rollout_id: str | None
    note: str | None


def _entry(row: sa.Row) -> Entry:
    return Entry(row.model, row.version, row.status, row.registered_at, row.updated_at, row.rollout_id, row.note)


def register(engine: Engine, model: str, version: str, note: str | None = None) -> Entry:
    """Add ``version`` as a candidate. Registering it again while it is still a candidate is harmless;
    a version that was already rolled out cannot become a candidate again."""
    with engine.begin() as conn:
        found = get(conn, model, version)
        if found is not None:
            if found.status != "candidate":
                raise ValueError(f"{model} {version} is already {found.status}; register a new version")
            return found
        now = utcnow()
        conn.execute(
            sa.insert(registry).values(
                model=model, version=version, status="candidate", registered_at=now, updated_at=now, note=note
            )
        )
        entry = get(conn, model, version)
    assert entry is not None
    return entry


def get(conn: Connection, model: str, version: str) -> Entry | None:
    row = conn.execute(
        sa.select(registry).where(registry.c.model == model, registry.c.version == version)
    ).one_or_none()
    return None if row is None else _entry(row)


def next_candidate(conn: Connection, model: str) -> Entry | None:
    """The newest version still waiting to be rolled out, or None."""
    row = conn.execute(
        sa.select(registry)
        .where(registry.c.model == model, registry.c.status == "candidate")
        .order_by(registry.c.registered_at.desc(), registry.c.version.desc())
        .limit(1)
    ).one_or_none()
    return None if row is None else _entry(row)


def entries(conn: Connection, model: str | None = None) -> list[Entry]:
    stmt = sa.select(registry).order_by(registry.c.model, registry.c.registered_at.desc())
    if model:
        stmt = stmt.where(registry.c.model == model)
    return [_entry(r) for r in conn.execute(stmt)]


def mark(conn: Connection, model: str, version: str, status: str, rollout_id: str | None, note: str) -> None:
    """Set a version's status, adding the version if the registry did not know it."""
    assert status in STATUSES, status
    now = utcnow()
    values = dict(status=status, updated_at=now, rollout_id=rollout_id, note=note)
    updated = conn.execute(
        sa.update(registry).where(registry.c.model == model, registry.c.version == version).values(**values)
    ).rowcount
    if not updated:
        conn.execute(sa.insert(registry).values(model=model, version=version, registered_at=now, **values))


def promote(conn: Connection, model: str, version: str, rollout_id: str | None) -> None:
    """``version`` becomes the model's baseline; the previous baseline retires."""
    conn.execute(
        sa.update(registry)
        .where(registry.c.model == model, registry.c.status == "baseline", registry.c.version != version)
        .values(status="retired", updated_at=utcnow(), note=f"replaced by {version}")
    )
    mark(conn, model, version, "baseline", rollout_id, "promoted")
