"""Hooks: Airflow connection ids in, clients of the core library out. Credentials stay in connections."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from sqlalchemy.engine import Engine

from mlcanary.sources import MetricSource, source_for
from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.engine import make_engine


class WarehouseHook(BaseHook):
    """Resolves a connection to a SQLAlchemy URL.

    The connection's extra ``sqlalchemy_url`` wins (any dialect: DuckDB, Trino, ...); otherwise the
    connection type's own database hook builds the URL (``sqlite``, ``postgres``, ...). Credentials
    stay in the connection, never in a spec.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "mlcanary_warehouse"
    conn_type = "generic"
    hook_name = "mlcanary warehouse"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id

    def get_url(self) -> str:
        conn = self.get_connection(self.conn_id)
        url = conn.extra_dejson.get("sqlalchemy_url")
        if url:
            return str(url)
        return conn.get_hook().get_uri()

    def get_engine(self) -> Engine:
        return make_engine(self.get_url())


class PrometheusHook(BaseHook):
    """A Prometheus server from a connection (type ``http`` or ``generic``).

    The URL is the extra ``url``, or built from host (which may carry the scheme), port and schema
    (``http``/``https``); login and password give basic auth; the extra ``headers`` (a mapping) is
    sent with every query, e.g. ``{"Authorization": "Bearer ..."}``.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "prometheus_default"
    conn_type = "http"
    hook_name = "mlcanary Prometheus"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id

    def client_args(self) -> dict[str, Any]:
        conn = self.get_connection(self.conn_id)
        extra = conn.extra_dejson
        url = extra.get("url")
        if not url:
            if not conn.host:
                raise ValueError(f"connection {self.conn_id!r} has no host and no extra 'url'")
            host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
            url = f"{host}:{conn.port}" if conn.port else host
        auth = (conn.login, conn.password or "") if conn.login else None
        return {"prometheus_url": str(url), "auth": auth, "headers": dict(extra.get("headers") or {})}


def metric_source(spec: RolloutSpec) -> MetricSource:
    """The guardrail source the spec names, with its connection resolved."""
    engine = WarehouseHook(spec.warehouse.conn_id).get_engine()
    if spec.guardrails.source.kind == "prometheus":
        return source_for(spec, engine, **PrometheusHook(spec.guardrails.source.prometheus_conn_id).client_args())
    return source_for(spec, engine)
