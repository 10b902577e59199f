"""Engines for the warehouse: any SQLAlchemy URL; SQLite tuned for a writer and readers at once."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url


def normalize_url(url: str | URL) -> URL:
    """Parse a URL; a bare ``postgresql://`` uses psycopg 3, the driver installed with mlcanary."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _tune_sqlite(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the simulator's writes
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@functools.cache
def make_engine(url: str) -> Engine:
    """One engine per URL and process (engines pool their connections)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _tune_sqlite)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True)


def utcnow() -> datetime:
    """Now, as the naive UTC timestamp the warehouse stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(moment: datetime) -> datetime:
    """A timestamp as naive UTC (aware ones are converted, naive ones are taken as UTC)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment
