"""Engines for the warehouse: any SQLAlchemy URL; SQLite tuned for a writer and readers at once."""

from __future__ import annotations

import contextlib
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


CONNECT_TIMEOUT_S = 10  # a warehouse that does not answer is an error after this, not a hang
STATEMENT_TIMEOUT_S = 300  # PostgreSQL: no query (a poll, a look) runs longer; a lock wait included


def _timeouts(parsed: URL) -> dict[str, object]:
    """Connect and statement timeouts for the dialects that take them as connect arguments, and a
    UTC session on PostgreSQL; a value in the URL's query (``?connect_timeout=...``, ``?options=-c
    statement_timeout=...``) wins, and other ``options`` in the URL (a ``search_path``) are kept."""
    if parsed.get_backend_name() == "sqlite":
        return {"timeout": 30}  # the wait for a writer's lock
    if parsed.get_backend_name() != "postgresql":
        return {}
    args: dict[str, object] = {}
    if "connect_timeout" not in parsed.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    options = parsed.query.get("options", "")
    options = options if isinstance(options, str) else " ".join(options)
    if "statement_timeout" not in options:
        options = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_S * 1000}".strip()
    if "timezone" not in options.lower():  # naive UTC bounds against timestamptz columns read as UTC
        options = f"{options} -c TimeZone=UTC".strip()
    args["options"] = options
    return args


@functools.cache
def make_engine(url: str) -> Engine:
    """One engine per URL and process (engines pool their connections), with timeouts."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args=_timeouts(parsed))
        sa.event.listen(engine, "connect", _tune_sqlite)
        return engine
    engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=_timeouts(parsed))
    if parsed.get_backend_name() == "duckdb":
        sa.event.listen(engine, "connect", _duckdb_utc)
    return engine


def _duckdb_utc(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    """Naive UTC bounds against TIMESTAMPTZ columns read as UTC (DuckDB's default is the local zone)."""
    with contextlib.suppress(Exception):  # built without ICU: no time zones at all, timestamps compare as stored
        dbapi_conn.execute("SET TimeZone = 'UTC'")


def utcnow() -> datetime:
    """Now, as the naive UTC timestamp the warehouse stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(moment: datetime) -> datetime:
    """A timestamp as naive UTC (aware ones are converted, naive ones are taken as UTC), as a plain
    ``datetime``: a subclass (pendulum's, from an Airflow context) is no type the sqlite3 driver binds."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    if type(moment) is not datetime:
        moment = datetime(*moment.timetuple()[:6], moment.microsecond)
    return moment
