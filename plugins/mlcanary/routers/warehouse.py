"""The default router: a routing table in the warehouse that the serving layer (or simulator) reads."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mlcanary.routers.base import Split
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import traffic_split


class WarehouseRouter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get_split(self, model: str) -> Split | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(traffic_split).where(traffic_split.c.model == model)).one_or_none()
        if row is None:
            return None
        return Split(row.model, row.baseline_version, row.canary_version, float(row.canary_percent))

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        values = dict(
            baseline_version=split.baseline_version,
            canary_version=split.canary_version,
            canary_percent=split.canary_percent,
            rollout_id=rollout_id,
            updated_at=utcnow(),
        )
        with self.engine.begin() as conn:
            updated = conn.execute(
                sa.update(traffic_split).where(traffic_split.c.model == split.model).values(**values)
            ).rowcount
            if not updated:
                conn.execute(sa.insert(traffic_split).values(model=split.model, **values))
