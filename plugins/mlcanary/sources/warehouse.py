"""Guardrail metrics from the warehouse: aggregates over the window, through the (model, version, ts) index."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Engine

from mlcanary.sources.base import ArmHealth
from mlcanary.spec import RolloutSpec
from mlcanary.tables import predictions_table, resources_table
from mlcanary.warehouse import queries


class WarehouseMetrics:
    """Reads the predictions and resource tables the spec maps. A poll costs in proportion to the
    window, not the table: every query is a range over the (model, version, ts) index (the
    stage-level count tests add one count of the stage's rows per arm, :meth:`request_counts`)."""

    def __init__(self, engine: Engine, spec: RolloutSpec) -> None:
        self.engine = engine
        self.model = spec.model
        self.predictions = predictions_table(spec)
        self.resources = resources_table(spec)

    def measure(self, version: str, start: datetime, end: datetime) -> ArmHealth:
        with self.engine.connect() as conn:
            n, ok = queries.request_counts(conn, self.predictions, self.model, version, start, end)
            p99 = queries.latency_quantile(conn, self.predictions, self.model, version, start, end, 0.99) if n else None
            samples, cpu, mem = queries.resource_means(conn, self.resources, self.model, version, start, end)
        return ArmHealth(n, n - ok, p99, samples, cpu, mem)

    def request_counts(self, version: str, start: datetime, end: datetime) -> tuple[int, int]:
        """Requests and failed requests only, one aggregate over the index range (no P99 sort)."""
        with self.engine.connect() as conn:
            n, ok = queries.request_counts(conn, self.predictions, self.model, version, start, end)
        return n, n - ok

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        with self.engine.connect() as conn:
            return queries.count_slower(conn, self.predictions, self.model, version, start, end, latency_ms)
