"""Metric sources of the fast guardrails: the warehouse (default) and Prometheus, behind one interface."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from mlcanary.sources.base import ArmHealth, MetricSource, MetricSourceError
from mlcanary.sources.prometheus import PrometheusMetrics
from mlcanary.sources.warehouse import WarehouseMetrics
from mlcanary.spec import RolloutSpec

__all__ = ["ArmHealth", "MetricSource", "MetricSourceError", "PrometheusMetrics", "WarehouseMetrics", "source_for"]


def source_for(
    spec: RolloutSpec,
    engine: Engine | None,
    prometheus_url: str | None = None,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> MetricSource:
    """The source the spec asks for. Prometheus needs its URL (from a connection or the command line)."""
    s = spec.guardrails.source
    if s.kind == "prometheus":
        if not prometheus_url:
            raise MetricSourceError(f"spec {spec.name!r} reads its guardrails from Prometheus: give its URL")
        assert s.queries is not None
        return PrometheusMetrics(prometheus_url, s.queries, spec.model, s.timeout.total_seconds(), auth, headers)
    if engine is None:
        raise MetricSourceError(f"spec {spec.name!r} reads its guardrails from the warehouse: give its URL")
    return WarehouseMetrics(engine, spec)
