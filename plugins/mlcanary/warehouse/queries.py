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
    sample = (
        sa.select(value.label("v"))
        .where(*_arm_filter(t, model, version, start, end), value.is_not(None))
        .order_by(t.col("ts").desc())
        .limit(sample_rows)
        .subquery()
    )
    tiles = sa.select(sample.c.v, sa.func.ntile(bins).over(order_by=sample.c.v).label("tile")).subquery()
    stmt = sa.select(sa.func.max(tiles.c.v)).group_by(tiles.c.tile).order_by(tiles.c.tile)
    uppers = [float(v) for v in conn.execute(stmt).scalars() if v is not None]
    return sorted(set(uppers[:-1]))


def bin_index(value: ColumnElement, edges: Sequence[float]) -> ColumnElement:
    """The number of ``edges`` at or below ``value`` (0 ... len(edges)); -1 for NULL.

    Bin k is [edges[k-1], edges[k]) with open outer bins. A balanced CASE tree: about log2(len(edges))
    comparisons per row, in any dialect.
    """

    def tree(lo: int, hi: int) -> ColumnElement:
        if lo == hi:
            return sa.literal(lo)
        mid = (lo + hi) // 2
        return sa.case((value < sa.literal(float(edges[mid])), tree(lo, mid)), else_=tree(mid + 1, hi))

    return sa.case((value.is_(None), sa.literal(-1)), else_=tree(0, len(edges)))


# The per-row quantities summed per version, segment and score bin (y: label, s: score, d = s - y).
BIN_MEASURES = ("n", "y", "y2", "s", "s2", "sy", "ad", "d2", "d4")


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
    feature_edges: Mapping[str, Sequence[float]],
) -> list[dict[str, Any]]:
    """The slow analysis's whole input, from label-complete rows of ``[start, end)``:

    - ``kind="segment"`` rows: per version, segment (``column``/``value``, "*" for the whole arm) and
      score bin, the sums in :data:`BIN_MEASURES`;
    - ``kind="feature"`` rows: per version, feature (``column``) and feature bin, the row count.

    One scan with GROUPING SETS where the dialect has them (PostgreSQL, DuckDB), else a UNION ALL.
    """
    label, score = t.col("label"), t.col("score")
    d = score - label
    inner = (
        sa.select(
            t.col("version").label("version"),
            *(sa.cast(t.col(c), sa.String).label(f"seg_{i}") for i, c in enumerate(segment_columns)),
            bin_index(score, score_edges).label("sbin"),
            *(bin_index(t.col(f), e).label(f"fbin_{i}") for i, (f, e) in enumerate(feature_edges.items())),
            sa.cast(label, sa.Double).label("y"),
            sa.cast(score, sa.Double).label("s"),
            sa.cast(d, sa.Double).label("d"),
        )
        .where(
            t.col("model") == model,
            t.col("version").in_(list(versions)),
            t.col("ts") >= start,
            t.col("ts") < end,
            label.is_not(None),
            t.col("label_ts") <= label_asof,
        )
        .subquery()
    )
    c = inner.c
    sums = [
        sa.func.count().label("n"),
        sa.func.sum(c.y).label("y"),
        sa.func.sum(c.y * c.y).label("y2"),
        sa.func.sum(c.s).label("s"),
        sa.func.sum(c.s * c.s).label("s2"),
        sa.func.sum(c.s * c.y).label("sy"),
        sa.func.sum(sa.func.abs(c.d)).label("ad"),
        sa.func.sum(c.d * c.d).label("d2"),
        sa.func.sum(c.d * c.d * c.d * c.d).label("d4"),
    ]
    seg_cols = [c[f"seg_{i}"] for i in range(len(segment_columns))]
    f_cols = [c[f"fbin_{i}"] for i in range(len(feature_edges))]
    features = list(feature_edges)
    if conn.dialect.name in ("postgresql", "duckdb"):
        sets = [sa.tuple_(c.version, c.sbin)]
        sets += [sa.tuple_(c.version, s, c.sbin) for s in seg_cols]
        sets += [sa.tuple_(c.version, f) for f in f_cols]
        stmt = sa.select(
            c.version,
            *seg_cols,
            c.sbin,
            *f_cols,
            *(sa.func.grouping(s).label(f"g_seg_{i}") for i, s in enumerate(seg_cols)),
            *(sa.func.grouping(f).label(f"g_f_{i}") for i, f in enumerate(f_cols)),
            sa.func.grouping(c.sbin).label("g_sbin"),
            *sums,
        ).group_by(sa.func.grouping_sets(*sets))
        out = []
        for row in conn.execute(stmt):
            m = row._mapping
            base = {k: float(m[k] or 0.0) for k in BIN_MEASURES}
            if not m["g_sbin"]:
                which = [i for i in range(len(seg_cols)) if not m[f"g_seg_{i}"]]
                column = segment_columns[which[0]] if which else OVERALL
                value = m[f"seg_{which[0]}"] if which else OVERALL
                out.append(
                    dict(kind="segment", version=m["version"], column=column, value=value, bin=int(m["sbin"]), **base)
                )
            else:
                i = next(i for i in range(len(f_cols)) if not m[f"g_f_{i}"])
                out.append(
                    dict(
                        kind="feature",
                        version=m["version"],
                        column=features[i],
                        value=OVERALL,
                        bin=int(m[f"fbin_{i}"]),
                        **base,
                    )
                )
        return [r for r in out if r["kind"] == "feature" or r["value"] is not None]
    parts = [
        sa.select(
            sa.literal("segment").label("kind"),
            c.version,
            sa.literal(OVERALL).label("col"),
            sa.literal(OVERALL).label("val"),
            c.sbin.label("bin"),
            *sums,
        ).group_by(c.version, c.sbin)
    ]
    for name, s in zip(segment_columns, seg_cols, strict=True):
        parts.append(
            sa.select(sa.literal("segment"), c.version, sa.literal(name), s, c.sbin, *sums)
            .where(s.is_not(None))
            .group_by(c.version, s, c.sbin)
        )
    for name, f in zip(features, f_cols, strict=True):
        parts.append(
            sa.select(sa.literal("feature"), c.version, sa.literal(name), sa.literal(OVERALL), f, *sums).group_by(
                c.version, f
            )
        )
    return [
        dict(
            kind=r.kind,
            version=r.version,
            column=r.col,
            value=r.val,
            bin=int(r.bin),
            **{k: float(r._mapping[k] or 0.0) for k in BIN_MEASURES},
        )
        for r in conn.execute(sa.union_all(*parts))
    ]
