"""The default router: a routing table in the warehouse that the serving layer (or simulator) reads.

Its split lives in the same database as the audit tables, so a step can be one transaction: the
conditional write of the split (a compare-and-set in one statement) and its records commit together.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mlcanary.routers.base import Split
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import traffic_split


class WarehouseRouter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get_split(self, model: str, conn: Connection | None = None) -> Split | None:
        if conn is None:
            with self.engine.connect() as own:
                return self.get_split(model, own)
        row = conn.execute(sa.select(traffic_split).where(traffic_split.c.model == model)).one_or_none()
        if row is None:
            return None
        return Split(row.model, row.baseline_version, row.canary_version, float(row.canary_percent), row.rollout_id)

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        values = self._values(split, rollout_id)
        with self.engine.begin() as conn:
            updated = conn.execute(
                sa.update(traffic_split).where(traffic_split.c.model == split.model).values(**values)
            ).rowcount
            if not updated:
                conn.execute(sa.insert(traffic_split).values(model=split.model, **values))

    @staticmethod
    def _values(split: Split, rollout_id: str | None) -> dict[str, object]:
        return dict(
            baseline_version=split.baseline_version,
            canary_version=split.canary_version,
            canary_percent=split.canary_percent,
            rollout_id=rollout_id,
            updated_at=utcnow(),
        )

    def compare_and_set(self, conn: Connection, expected: Split | None, split: Split, rollout_id: str | None) -> bool:
        """Write ``split`` only if the table still holds ``expected`` (owner included), in one statement."""
        values = self._values(split, rollout_id)
        t = traffic_split.c
        if expected is None:
            exists = conn.execute(sa.select(t.model).where(t.model == split.model)).first()
            if exists is not None:
                return False
            conn.execute(sa.insert(traffic_split).values(model=split.model, **values))
            return True
        updated = conn.execute(
            sa.update(traffic_split)
            .where(
                t.model == split.model,
                t.baseline_version == expected.baseline_version,
                t.canary_version.is_not_distinct_from(expected.canary_version),
                t.canary_percent == expected.canary_percent,
                t.rollout_id.is_not_distinct_from(expected.owner),
            )
            .values(**values)
        ).rowcount
        return updated == 1

    def shares_database_with(self, engine: Engine) -> bool:
        """Whether this routing table lives in ``engine``'s database (one transaction can cover both)."""
        return str(self.engine.url) == str(engine.url)
