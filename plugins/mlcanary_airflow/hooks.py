"""The warehouse hook: an Airflow connection id in, a SQLAlchemy engine out."""

from __future__ import annotations

from airflow.sdk import BaseHook
from sqlalchemy.engine import Engine

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
