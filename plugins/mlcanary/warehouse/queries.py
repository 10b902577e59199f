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
from typing import Any

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


def _tail_sample(
    t: MappedTable, model: str, version: str, start: datetime, end: datetime, value: ColumnElement, rows: int
) -> sa.Subquery:
    """The version's most recent ``rows`` non-NULL values of ``value`` in the window (index-friendly)."""
    return (
        sa.select(value.label("v"))
        .where(*_arm_filter(t, model, version, start, end), value.is_not(None))
        .order_by(t.col("ts").desc())
        .limit(rows)
        .subquery()
    )


def quantile_edges(
    conn: Connection,
    t: MappedTable,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    value: ColumnElement,
    bins: int,
    sample_rows: int,
) -> list[float]:
    """Inner edges of ``bins`` equal-count tiles of ``value`` for one version (distinct, ascending).

    Computed in the warehouse with NTILE over the version's most recent ``sample_rows`` rows of the
    window: one bounded sort, whatever the size of the window.
    """
    sample = _tail_sample(t, model, version, start, end, value, sample_rows)
    tiles = sa.select(sample.c.v, sa.func.ntile(bins).over(order_by=sample.c.v).label("tile")).subquery()
    stmt = sa.select(sa.func.max(tiles.c.v)).group_by(tiles.c.tile).order_by(tiles.c.tile)
    uppers = [float(v) for v in conn.execute(stmt).scalars() if v is not None]
    return sorted(set(uppers[:-1]))


def sample_histogram(
    conn: Connection,
    t: MappedTable,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    value: ColumnElement,
    edges: Sequence[float],
    sample_rows: int,
) -> list[int]:
    """Counts per bin (``len(edges) + 1`` bins) of the version's most recent ``sample_rows`` values."""
    sample = _tail_sample(t, model, version, start, end, value, sample_rows)
    b = bin_index(sample.c.v, edges, conn.dialect.name).label("b")
    counts = [0] * (len(edges) + 1)
    for k, n in conn.execute(sa.select(b, sa.func.count()).group_by(b)):
        if k is not None and k >= 0:
            counts[int(k)] = int(n)
    return counts


def bin_index(value: ColumnElement, edges: Sequence[float], dialect: str = "") -> ColumnElement:
    """The number of ``edges`` at or below ``value`` (0 ... len(edges)); -1 for NULL.

    Bin k is [edges[k-1], edges[k]) with open outer bins. PostgreSQL: ``width_bucket(value, array)``,
    a binary search in C. Elsewhere a balanced CASE tree: about log2(len(edges)) comparisons per row.
    """
    if dialect == "postgresql" and edges:
        array = sa.cast(sa.literal(list(map(float, edges)), sa.ARRAY(sa.Double)), sa.ARRAY(sa.Double))
        return sa.func.coalesce(sa.func.width_bucket(value, array), -1)

    def tree(lo: int, hi: int) -> ColumnElement:
        if lo == hi:
            return sa.literal(lo)
        mid = (lo + hi) // 2
        return sa.case((value < sa.literal(float(edges[mid])), tree(lo, mid)), else_=tree(mid + 1, hi))

    return sa.case((value.is_(None), sa.literal(-1)), else_=tree(0, len(edges)))


# The per-row quantities that can be summed per version, segment and score bin (y: label, s: score,
# d = s - y): count, y, y², s, s², |d|, d², d⁴.
BIN_MEASURES = ("n", "y", "y2", "s", "s2", "ad", "d2", "d4")


def binned_aggregates(
    conn: Connection,
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    label_asof: datetime,
    segment_columns: Sequence[str],
    score_edges: Sequence[float],
    measures: Sequence[str] = BIN_MEASURES,
) -> list[dict[str, Any]]:
    """Per version, segment (``column``/``value``; "*" for the whole arm) and score bin, the sums of
    ``measures`` (names from :data:`BIN_MEASURES`; the rest are 0) over the label-complete rows of
    ``[start, end)``.

    One scan in every dialect: a single hash GROUP BY over (version, every segment column, score bin),
    streamed back and rolled up here into the per-segment marginals. Its result depends on the
    segments' cardinalities and the bins, never on the number of rows, and only the marginals are
    kept. (GROUPING SETS were measured slower: PostgreSQL ran one sort per set.)
    """
    label, score = t.col("label"), t.col("score")
    d = score - label
    y, s = sa.cast(label, sa.Double), sa.cast(score, sa.Double)
    available = {
        "n": sa.func.count(),
        "y": sa.func.sum(y),
        "y2": sa.func.sum(y * y),
        "s": sa.func.sum(s),
        "s2": sa.func.sum(s * s),
        "ad": sa.func.sum(sa.func.abs(d)),
        "d2": sa.func.sum(d * d),
        "d4": sa.func.sum(d * d * d * d),
    }
    wanted = [m for m in BIN_MEASURES if m == "n" or m in measures]
    sums = [available[m] for m in wanted]
    keys = [t.col("version"), *(t.col(c) for c in segment_columns), bin_index(score, score_edges, conn.dialect.name)]
    stmt = (
        sa.select(*keys, *sums)
        .where(
            t.col("model") == model,
            t.col("version").in_(list(versions)),
            t.col("ts") >= start,
            t.col("ts") < end,
            label.is_not(None),
            t.col("label_ts") <= label_asof,
        )
        .group_by(*keys)
    )
    k = len(segment_columns)
    marginals: dict[tuple[str, str, str, int], list[float]] = {}
    positions = [BIN_MEASURES.index(m) for m in wanted]

    def add(key: tuple[str, str, str, int], values: Sequence[Any]) -> None:
        acc = marginals.setdefault(key, [0.0] * len(BIN_MEASURES))
        for i, v in zip(positions, values, strict=True):
            acc[i] += float(v or 0.0)

    postgres = conn.dialect.name == "postgresql"
    if postgres:
        # PostgreSQL cannot estimate the number of score bins, takes every row for a group, and sorts
        # the whole window to disk (15 s at 10 M rows). The groups are bounded by the segment cube,
        # so hash them (7 s), and skip JIT compilation (1 s). Reset right after the statement.
        conn.execute(sa.text("SET LOCAL enable_sort = off"))
        conn.execute(sa.text("SET LOCAL jit = off"))
    try:
        result = conn.execute(stmt).all()  # no server-side cursor: PostgreSQL would not parallelise it
    finally:
        if postgres:
            conn.execute(sa.text("RESET enable_sort"))
            conn.execute(sa.text("RESET jit"))
    for row in result:
        version, segs, b, values = row[0], row[1 : 1 + k], int(row[1 + k]), row[2 + k :]
        add((version, OVERALL, OVERALL, b), values)
        for name, value in zip(segment_columns, segs, strict=True):
            if value is not None:
                add((version, name, str(value), b), values)
    return [
        dict(version=v, column=c, value=val, bin=b, **dict(zip(BIN_MEASURES, acc, strict=True)))
        for (v, c, val, b), acc in marginals.items()
    ]
