"""Guardrail metrics from the warehouse: aggregates over the window, through the (model, version, ts) index."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Connection, Engine

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
            req = self._requests(conn, version, start, end)
            p99 = None
            if req.n and not req.bad_latency:
                p99 = queries.latency_quantile(conn, self.predictions, self.model, version, start, end, 0.99)
            res = queries.resource_means(conn, self.resources, self.model, version, start, end)
        return ArmHealth(
            req.n, req.n - req.ok, p99, res.samples, res.cpu, res.memory, self._problems(version, req, res)
        )

    def _problems(self, version: str, req: queries.Requests, res: queries.Resources) -> tuple[str, ...]:
        p, r = self.predictions, self.resources
        rules = [
            (p, "success", req.bad_success, req.n, "neither 0 nor 1 (a status code or an enum mapped as success?)"),
            (p, "latency_ms", req.bad_latency, req.n, "negative, NaN or infinite"),
            (r, "cpu", res.bad_cpu, res.samples, "outside 0-1, NaN or infinite (a percentage, not a fraction?)"),
            (r, "memory", res.bad_memory, res.samples, "outside 0-1, NaN or infinite (a percentage, not a fraction?)"),
        ]
        return tuple(
            f"{t.table.name}.{t.columns.get(col, col)} of {version}: {bad:,} of {n:,} rows {rule}"
            for t, col, bad, n, rule in rules
            if bad
        )

    def request_counts(self, version: str, start: datetime, end: datetime) -> tuple[int, int]:
        """Requests and failed requests only, one aggregate over the index range (no P99 sort)."""
        with self.engine.connect() as conn:
            req = self._requests(conn, version, start, end)
        return req.n, req.n - req.ok

    def _requests(self, conn: Connection, version: str, start: datetime, end: datetime) -> queries.Requests:
        return queries.request_counts(conn, self.predictions, self.model, version, start, end)

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        with self.engine.connect() as conn:
            return queries.count_slower(conn, self.predictions, self.model, version, start, end, latency_ms)
