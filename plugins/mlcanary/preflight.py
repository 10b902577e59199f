"""The pre-flight check of the warehouse, before any traffic moves: do the spec's tables and columns
exist with usable types, do timestamps compare right against the queries' bounds, is there an index
for the polls, and is the baseline's traffic there at all?

Each finding names the table and column and says how to fix it. Errors refuse the rollout;
warnings (a missing index) are logged. Everything is read with a few catalogue queries and
aggregates over the most recent rows: nothing grows with the table.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mlcanary.spec import RolloutSpec
from mlcanary.tables import predictions_table, resources_table
from mlcanary.warehouse.engine import naive_utc, utcnow
from mlcanary.warehouse.queries import MappedTable

Level = Literal["error", "warning"]
# How SQLAlchemy writes a DateTime on SQLite, and so how every bound of a query reads: text compares
# only against text of the same form.
SQLITE_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?$")
FUTURE_SLACK = timedelta(minutes=5)  # clocks disagree a little; hours ahead is a time-zone mix-up


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # tables | columns | timestamps | index | baseline_rows
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preflight:
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def summary(self) -> str:
        if not self.findings:
            return "pre-flight check of the warehouse: all good"
        return "pre-flight check of the warehouse:\n" + "\n".join(f"- {f.level}: {f.message}" for f in self.findings)


@dataclass(frozen=True)
class _Need:
    logical: str
    kind: Literal["number", "timestamp", "any"]


def _needs(spec: RolloutSpec) -> tuple[list[_Need], list[_Need]]:
    """The columns of the predictions and resource tables this spec reads."""
    warehouse_polls = spec.guardrails.source.kind == "warehouse"
    predictions = [
        _Need("ts", "timestamp"),
        _Need("model", "any"),
        _Need("version", "any"),
        _Need("score", "number"),
        _Need("label", "number"),
        _Need("label_ts", "timestamp"),
        *([_Need("latency_ms", "number"), _Need("success", "number")] if warehouse_polls else []),
        *(_Need(c, "any") for c in spec.analysis.segments),
        *(_Need(f, "number") for f in spec.analysis.drift.features),
    ]
    g = spec.guardrails
    resources: list[_Need] = []
    if warehouse_polls and (g.cpu_max is not None or g.memory_max is not None):
        resources = [_Need("ts", "timestamp"), _Need("model", "any"), _Need("version", "any")]
        resources += [_Need(n, "number") for n, lim in (("cpu", g.cpu_max), ("memory", g.memory_max)) if lim]
    return predictions, resources


def _columns(conn: Connection, t: MappedTable) -> dict[str, str]:
    """Physical column name -> declared type (upper case), from the catalogue; empty: no such table."""
    name, schema = t.table.name, t.table.schema
    if conn.dialect.name == "sqlite":
        quoted = conn.dialect.identifier_preparer.quote(name)
        prefix = f"{conn.dialect.identifier_preparer.quote(schema)}." if schema else ""
        rows = conn.exec_driver_sql(f"PRAGMA {prefix}table_info({quoted})").all()
        return {r[1]: (r[2] or "").upper() for r in rows}
    cols = sa.table(
        "columns",
        sa.column("table_name"),
        sa.column("table_schema"),
        sa.column("column_name"),
        sa.column("data_type"),
        schema="information_schema",
    )
    stmt = sa.select(cols.c.column_name, cols.c.data_type).where(
        cols.c.table_name == name, cols.c.table_schema == (schema if schema else sa.func.current_schema())
    )
    return {r[0]: str(r[1]).upper() for r in conn.execute(stmt)}


def _kind(declared: str) -> str:
    if "BOOL" in declared:
        return "boolean"
    if "TIMESTAMPTZ" in declared or "WITH TIME ZONE" in declared:
        return "timestamptz"
    if any(k in declared for k in ("TIMESTAMP", "DATETIME", "DATE")):
        return "timestamp"
    if any(k in declared for k in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC")):
        return "number"
    if any(k in declared for k in ("CHAR", "TEXT", "CLOB", "STRING")):
        return "text"
    return "other"


def _physical(t: MappedTable, logical: str) -> str:
    return t.columns.get(logical, logical)


def _where(t: MappedTable, logical: str) -> str:
    schema = f"{t.table.schema}." if t.table.schema else ""
    return f"{schema}{t.table.name}.{_physical(t, logical)}"


def _check_columns(conn: Connection, t: MappedTable, needs: list[_Need], out: list[Finding]) -> dict[str, str]:
    declared = _columns(conn, t)
    if not declared:
        where = f"{t.table.schema}.{t.table.name}" if t.table.schema else t.table.name
        out.append(
            Finding(
                "error",
                "tables",
                f"table {where} not found: create it, or map the spec's warehouse "
                "section to the table that holds this data",
            )
        )
        return {}
    for need in needs:
        col = _physical(t, need.logical)
        if col not in declared:
            out.append(
                Finding(
                    "error",
                    "columns",
                    f"column {_where(t, need.logical)} not found (the table has "
                    f"{', '.join(sorted(declared))}): fix the spec's column mapping",
                )
            )
            continue
        kind = _kind(declared[col])
        if kind == "boolean" and conn.dialect.name == "sqlite":  # stored as 0/1 integers: sums work
            kind = "number"
        if need.kind == "number" and kind == "boolean":
            out.append(
                Finding(
                    "error",
                    "columns",
                    f"{_where(t, need.logical)} is {declared[col]}: sums need a "
                    f"0/1 number; map a view with CAST({col} AS INTEGER)",
                )
            )
        elif need.kind == "number" and kind in ("text", "timestamp", "timestamptz"):
            out.append(
                Finding(
                    "error",
                    "columns",
                    f"{_where(t, need.logical)} is {declared[col]}, not a number: "
                    "map a numeric column (or a view that casts it)",
                )
            )
        elif need.kind == "timestamp" and kind == "number":
            out.append(
                Finding(
                    "error",
                    "columns",
                    f"{_where(t, need.logical)} is {declared[col]} (epoch "
                    "numbers?): map a TIMESTAMP column in UTC, or a view that converts it",
                )
            )
    return declared


def _session_time_zone(conn: Connection) -> str | None:
    if conn.dialect.name == "postgresql":
        return str(conn.exec_driver_sql("SHOW TimeZone").scalar())
    if conn.dialect.name == "duckdb":
        try:
            return str(conn.exec_driver_sql("SELECT current_setting('TimeZone')").scalar())
        except Exception:  # no ICU: DuckDB has no time zones, and timestamps are as stored
            return None
    return None


def _check_timestamps(
    conn: Connection, t: MappedTable, model: str, declared: dict[str, str], logical: list[str], out: list[Finding]
) -> None:
    """Timestamps must compare right against naive UTC bounds: SQLite text in SQLAlchemy's form,
    aware columns in a UTC session, and no newest row hours in the future (local time)."""
    present = [c for c in logical if _physical(t, c) in declared]
    for c in present:
        kind = _kind(declared[_physical(t, c)])
        if kind == "timestamptz":
            zone = _session_time_zone(conn)
            if zone is not None and zone.upper() not in ("UTC", "ETC/UTC", "GMT", "Z", "UCT", "ETC/UCT"):
                out.append(
                    Finding(
                        "error",
                        "timestamps",
                        f"{_where(t, c)} is {declared[_physical(t, c)]} and the "
                        f"session time zone is {zone}: naive UTC bounds would be read "
                        "in that zone. mlcanary sets TimeZone=UTC on its connections; "
                        "a pooler or a role setting overrode it (ALTER ROLE ... SET "
                        "TimeZone = 'UTC')",
                    )
                )
        if conn.dialect.name == "sqlite":
            col = t.col(c)
            sample = conn.execute(
                sa.select(sa.func.typeof(col), sa.cast(col, sa.Text))
                .where(t.col("model") == model, col.is_not(None))
                .order_by(sa.text("rowid DESC"))
                .limit(1)
            ).first()
            if sample is not None and (sample[0] != "text" or not SQLITE_TIMESTAMP.match(sample[1])):
                out.append(
                    Finding(
                        "error",
                        "timestamps",
                        f"{_where(t, c)} holds {sample[1]!r} ({sample[0]}): SQLite "
                        "compares timestamps as text of the form 'YYYY-MM-DD "
                        "HH:MM:SS.ffffff', so these rows would read as outside every "
                        f"window. Fix: UPDATE {t.table.name} SET {_physical(t, c)} = "
                        f"strftime('%Y-%m-%d %H:%M:%f', {_physical(t, c)}) (UTC)",
                    )
                )
    if "ts" in present:
        newest = conn.execute(sa.select(sa.func.max(t.col("ts"))).where(t.col("model") == model)).scalar()
        if isinstance(newest, str):  # SQLite text in the right form
            newest = datetime.fromisoformat(newest)
        if isinstance(newest, datetime):
            ahead = naive_utc(newest) - utcnow()
            if ahead > FUTURE_SLACK:
                out.append(
                    Finding(
                        "error",
                        "timestamps",
                        f"the newest {_where(t, 'ts')} of {model} is "
                        f"{ahead.total_seconds() / 3600:.1f} h in the future: local "
                        "time instead of UTC? mlcanary's windows are in UTC",
                    )
                )


def _has_index(conn: Connection, t: MappedTable) -> bool | None:
    """Whether an index leads with (model, version, ts); None where indexes do not apply (DuckDB)."""
    if conn.dialect.name not in ("sqlite", "postgresql"):
        return None
    wanted = [_physical(t, c) for c in ("model", "version", "ts")]
    indexes = sa.inspect(conn).get_indexes(t.table.name, schema=t.table.schema)
    pk = sa.inspect(conn).get_pk_constraint(t.table.name, schema=t.table.schema).get("constrained_columns") or []
    leading = [list(i["column_names"])[:3] for i in indexes] + [list(pk)[:3]]
    return wanted in leading


def check_warehouse(
    conn: Connection, spec: RolloutSpec, baseline_version: str | None, now: datetime | None = None
) -> Preflight:
    """Every pre-flight finding for ``spec`` (and its baseline's traffic, when it is known)."""
    now = now or utcnow()
    out: list[Finding] = []
    p_needs, r_needs = _needs(spec)
    tables = [(predictions_table(spec), p_needs, ["ts", "label_ts"])]
    if r_needs:
        tables.append((resources_table(spec), r_needs, ["ts"]))
    for t, needs, stamps in tables:
        declared = _check_columns(conn, t, needs, out)
        if not declared:
            continue
        _check_timestamps(conn, t, spec.model, declared, stamps, out)
        if all(_physical(t, c) in declared for c in ("model", "version", "ts")) and _has_index(conn, t) is False:
            cols = ", ".join(_physical(t, c) for c in ("model", "version", "ts"))
            out.append(
                Finding(
                    "warning",
                    "index",
                    f"no index on {t.table.name}({cols}): every guardrail poll and "
                    "analysis look scans the whole table instead of its window; "
                    f"CREATE INDEX ix_{t.table.name}_model_version_ts ON {t.table.name} ({cols})",
                )
            )
    if baseline_version is not None and not any(f.check in ("tables", "columns", "timestamps") for f in out):
        t = predictions_table(spec)
        since = now - max(10 * spec.guardrails.window, spec.analysis.window)
        recent = conn.execute(
            sa.select(sa.func.count()).where(
                t.col("model") == spec.model,
                t.col("version") == baseline_version,
                t.col("ts") >= since,
                t.col("ts") < now + FUTURE_SLACK,
            )
        ).scalar_one()
        if not recent:
            newest = conn.execute(
                sa.select(sa.func.max(t.col("ts"))).where(
                    t.col("model") == spec.model, t.col("version") == baseline_version
                )
            ).scalar()
            seen = f"its newest row is from {newest}" if newest is not None else "it has no rows at all"
            out.append(
                Finding(
                    "error",
                    "baseline_rows",
                    f"no rows of {spec.model} {baseline_version} (the baseline) "
                    f"in {t.table.name} since {since:%Y-%m-%d %H:%M:%S} UTC; {seen}: "
                    "is its traffic logged to this table, under this model and "
                    "version?",
                )
            )
    return Preflight(out)
