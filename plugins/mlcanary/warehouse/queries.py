"""Aggregate queries. Every statistic mlcanary computes starts from what these return.

Nothing here fetches raw rows: each query is a GROUP BY (or a single ordered lookup for a quantile)
whose result size depends on the number of versions and segments, never on the number of rows.
Table and column names come from specs and are passed to SQLAlchemy as identifiers, which quotes them
where needed; values are always bound parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

OVERALL = "*"


@dataclass(frozen=True)
class MappedTable:
    """A warehouse table seen through a spec's mapping of logical to physical column names."""

    table: sa.TableClause
    columns: Mapping[str, str]

    def col(self, logical: str) -> sa.ColumnClause:
        return self.table.c[self.columns.get(logical, logical)]


def mapped_table(name: str, schema: str | None, columns: Mapping[str, str], extra: Iterable[str] = ()) -> MappedTable:
    """A lightweight table clause with the mapped columns plus ``extra`` physical columns."""
    physical = list(dict.fromkeys([*columns.values(), *extra]))
    table = sa.table(name, *(sa.column(c) for c in physical), schema=schema)
    return MappedTable(table, dict(columns))


def _arm_filter(t: MappedTable, model: str, version: str, start: datetime, end: datetime) -> list:
    return [
        t.col("model") == model,
        t.col("version") == version,
        t.col("ts") >= start,
        t.col("ts") < end,
    ]


def request_counts(
    conn: Connection, t: MappedTable, model: str, version: str, start: datetime, end: datetime
) -> tuple[int, int]:
    """Requests and successful requests of one version in ``[start, end)``."""
    q = sa.select(sa.func.count(), sa.func.sum(t.col("success"))).where(*_arm_filter(t, model, version, start, end))
    n, ok = conn.execute(q).one()
    return int(n or 0), int(ok or 0)


def latency_quantile(
    conn: Connection,
    t: MappedTable,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    q: float,
) -> float | None:
    """The interpolated ``q`` quantile of latency (the definition of SQL ``percentile_cont``).

    PostgreSQL and DuckDB compute it with ``percentile_cont``. Elsewhere (SQLite) it is read off the
    two order statistics around rank ``h = (n - 1) q`` with one count and one ``LIMIT 2 OFFSET``.
    """
    latency = t.col("latency_ms")
    where = [*_arm_filter(t, model, version, start, end), latency.is_not(None)]
    if conn.dialect.name in ("postgresql", "duckdb"):
        stmt = sa.select(sa.func.percentile_cont(q).within_group(latency)).where(*where)
        value = conn.execute(stmt).scalar()
        return None if value is None else float(value)
    n = conn.execute(sa.select(sa.func.count()).where(*where)).scalar() or 0
    if n == 0:
        return None
    h = (n - 1) * q
    lo = math.floor(h)
    stmt = sa.select(latency).where(*where).order_by(latency).limit(2).offset(lo)
    values = [float(v) for v in conn.execute(stmt).scalars()]
    if len(values) == 1:
        return values[0]
    return values[0] + (h - lo) * (values[1] - values[0])


def resource_means(
    conn: Connection, t: MappedTable, model: str, version: str, start: datetime, end: datetime
) -> tuple[int, float | None, float | None]:
    """Samples and mean CPU and memory utilisation of one version's hosts in ``[start, end)``."""
    q = sa.select(sa.func.count(), sa.func.avg(t.col("cpu")), sa.func.avg(t.col("memory"))).where(
        *_arm_filter(t, model, version, start, end)
    )
    n, cpu, mem = conn.execute(q).one()
    return int(n or 0), (None if cpu is None else float(cpu)), (None if mem is None else float(mem))


@dataclass(frozen=True)
class SegmentSums:
    """Count, and sum and sum of squares of each value, for one version and one segment."""

    version: str
    column: str  # "*" for the whole arm
    value: str  # "*" for the whole arm
    n: int
    sums: Mapping[str, tuple[float, float]]  # value name -> (sum, sum of squares)


def labelled_sums(
    conn: Connection,
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    label_asof: datetime,
    segment_columns: Sequence[str],
    values: Mapping[str, ColumnElement],
) -> list[SegmentSums]:
    """Count, sum and sum of squares of each of ``values`` per version, overall and per segment value.

    Only rows in ``[start, end)`` whose label was observed by ``label_asof`` count. One statement:
    a UNION ALL of the overall GROUP BY and one GROUP BY per segment column.
    """
    label = t.col("label")
    where = [
        t.col("model") == model,
        t.col("version").in_(list(versions)),
        t.col("ts") >= start,
        t.col("ts") < end,
        label.is_not(None),
        t.col("label_ts") <= label_asof,
    ]
    keys = list(values)
    measures: list[ColumnElement] = [sa.func.count().label("n")]
    for i, key in enumerate(keys):
        expr = values[key]
        measures += [sa.func.sum(expr).label(f"s{i}"), sa.func.sum(expr * expr).label(f"q{i}")]
    version = t.col("version")
    parts = [
        sa.select(
            version.label("version"),
            sa.literal(OVERALL).label("seg_column"),
            sa.literal(OVERALL).label("seg_value"),
            *measures,
        )
        .where(*where)
        .group_by(version)
    ]
    for name in segment_columns:
        seg = t.col(name)
        parts.append(
            sa.select(
                version.label("version"),
                sa.literal(name).label("seg_column"),
                sa.cast(seg, sa.String).label("seg_value"),
                *measures,
            )
            .where(*where, seg.is_not(None))
            .group_by(version, seg)
        )
    stmt = parts[0] if len(parts) == 1 else sa.union_all(*parts)
    out = []
    for row in conn.execute(stmt):
        m = row._mapping
        out.append(
            SegmentSums(
                version=row.version,
                column=row.seg_column,
                value=row.seg_value,
                n=int(row.n),
                sums={k: (float(m[f"s{i}"] or 0.0), float(m[f"q{i}"] or 0.0)) for i, k in enumerate(keys)},
            )
        )
    return out
