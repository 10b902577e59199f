"""Aggregate queries. Every statistic mlcanary computes starts from what these return.

Nothing here fetches raw rows: each query is a GROUP BY (or a single ordered lookup for a quantile)
whose result size depends on the number of versions and segments, never on the number of rows.
Table and column names come from specs and are passed to SQLAlchemy as identifiers, which quotes them
where needed; values are always bound parameters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

OVERALL = "*"
OTHER = "(other)"  # the segment that holds a column's values beyond its cap
FLOAT_MAX = 1.7976931348623157e308


def not_finite(x: ColumnElement) -> ColumnElement:
    """NaN or an infinity (NULL is neither): NaN sorts above every number in PostgreSQL and DuckDB,
    and SQLite keeps infinities (it stores NaN as NULL), so one range test finds both everywhere."""
    return sa.not_(x.between(-FLOAT_MAX, FLOAT_MAX))


class CountWhere(FunctionElement[int]):
    """How many rows of the group meet a condition: ``coalesce(sum(CASE WHEN c THEN 1 ELSE 0 END), 0)``;
    ``count(*) FILTER (WHERE c)`` on PostgreSQL and ``count_if(c)`` on DuckDB, which run the drift
    histograms' 45 counts at 1 M rows in 0.39 s instead of 0.51 s and 47 ms instead of 96 ms."""

    type = sa.BigInteger()
    name = "count_where"
    inherit_cache = True


# The wrappers are fixed text around the compiled condition (whose values stay bound parameters):
# cheaper to compile than the same built from SQLAlchemy elements, 45 times a look.
@compiles(CountWhere)
def _count_where(element: CountWhere, compiler: Any, **kw: Any) -> str:
    (condition,) = element.clauses
    return f"coalesce(sum(CASE WHEN {compiler.process(condition, **kw)} THEN 1 ELSE 0 END), 0)"


@compiles(CountWhere, "postgresql")
def _count_filter(element: CountWhere, compiler: Any, **kw: Any) -> str:
    (condition,) = element.clauses
    return compiler.process(sa.func.count().filter(condition), **kw)


@compiles(CountWhere, "duckdb")
def _count_if(element: CountWhere, compiler: Any, **kw: Any) -> str:
    (condition,) = element.clauses
    return f"coalesce(count_if({compiler.process(condition, **kw)}), 0)"  # NULL over no rows


def count_where(condition: ColumnElement) -> ColumnElement:
    """How many rows of the group meet ``condition`` (a data check, in the same pass as the sums)."""
    return CountWhere(condition)


@dataclass(frozen=True)
class Requests:
    """One arm's requests in a window, with the rows that break the data's rules."""

    n: int
    ok: int  # success = 1
    bad_success: int  # success neither 0 nor 1 (a status code or an enum mapped as success)
    bad_latency: int  # negative, NaN or infinite latency


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


def _versions_filter(t: MappedTable, model: str, versions: Sequence[str], start: datetime, end: datetime) -> list:
    return [t.col("model") == model, t.col("version").in_(list(versions)), t.col("ts") >= start, t.col("ts") < end]


def request_counts(
    conn: Connection, t: MappedTable, model: str, version: str, start: datetime, end: datetime
) -> Requests:
    """Requests and successful requests of one version in ``[start, end)``, and in the same pass the
    rows whose ``success`` or latency break the contract."""
    success, latency = t.col("success"), t.col("latency_ms")
    q = sa.select(
        sa.func.count(),
        count_where(success == 1),
        count_where(success.not_in([0, 1])),
        count_where(sa.or_(latency < 0, not_finite(latency))),
    ).where(*_arm_filter(t, model, version, start, end))
    n, ok, bad_success, bad_latency = conn.execute(q).one()
    return Requests(int(n or 0), int(ok), int(bad_success), int(bad_latency))


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


def count_slower(
    conn: Connection, t: MappedTable, model: str, version: str, start: datetime, end: datetime, latency_ms: float
) -> int:
    """Requests of one version in ``[start, end)`` that took longer than ``latency_ms``."""
    stmt = sa.select(sa.func.count()).where(
        *_arm_filter(t, model, version, start, end), t.col("latency_ms") > latency_ms
    )
    return int(conn.execute(stmt).scalar() or 0)


@dataclass(frozen=True)
class Resources:
    """One arm's resource samples in a window, with the samples outside 0-1 (or NaN, infinite)."""

    samples: int
    cpu: float | None
    memory: float | None
    bad_cpu: int
    bad_memory: int


def resource_means(
    conn: Connection, t: MappedTable, model: str, version: str, start: datetime, end: datetime
) -> Resources:
    """Samples and mean CPU and memory utilisation of one version's hosts in ``[start, end)``, and in
    the same pass the samples that are no fraction (a percentage, NaN, infinite)."""
    cpu, memory = t.col("cpu"), t.col("memory")

    def bad(x: ColumnElement) -> ColumnElement:
        return count_where(sa.or_(x < 0, x > 1, not_finite(x)))

    q = sa.select(sa.func.count(), sa.func.avg(cpu), sa.func.avg(memory), bad(cpu), bad(memory)).where(
        *_arm_filter(t, model, version, start, end)
    )
    n, mean_cpu, mean_mem, bad_cpu, bad_mem = conn.execute(q).one()
    return Resources(
        int(n or 0),
        None if mean_cpu is None else float(mean_cpu),
        None if mean_mem is None else float(mean_mem),
        int(bad_cpu),
        int(bad_mem),
    )


def _tail_sample(
    t: MappedTable,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    values: Sequence[ColumnElement],
    rows: int,
    tag: int | None = None,
) -> sa.Subquery:
    """The version's most recent ``rows`` rows of the window, as columns ``c0, c1, ...`` (and ``arm``
    = ``tag``). Index-friendly on (model, version, ts): one bounded lookup, whatever the window."""
    tagged = [] if tag is None else [sa.literal(tag).label("arm")]
    return (
        sa.select(*tagged, *(v.label(f"c{i}") for i, v in enumerate(values)))
        .where(*_arm_filter(t, model, version, start, end))
        .order_by(t.col("ts").desc())
        .limit(sa.literal_column(str(int(rows))))  # a literal: DuckDB plans a top-N only for a constant
        .subquery()
    )


def _materialized(cte: sa.CTE) -> sa.CTE:
    """Compute the CTE once, however often it is read (``AS MATERIALIZED`` where the dialect has it;
    DuckDB would otherwise run the sample once per reference)."""
    for dialect in ("sqlite", "postgresql", "duckdb"):
        cte = cte.prefix_with("MATERIALIZED", dialect=dialect)
    return cte


def _tails(
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    values: Sequence[ColumnElement],
    rows: int,
) -> sa.CTE:
    """Each version's tail sample (:func:`_tail_sample`, ``arm`` = its index), in one materialised CTE."""
    arms = [sa.select(_tail_sample(t, model, v, start, end, values, rows, tag=j)) for j, v in enumerate(versions)]
    return _materialized(sa.union_all(*arms).cte("tails"))


def indexed(dialect: str) -> bool:
    """Whether "the most recent N rows" of a version is one bounded index lookup on (model, version,
    ts), as on SQLite and PostgreSQL. DuckDB has no such index: a top-N of the window scans it all
    and keeps a heap, so there the most recent rows are those since a time (:func:`_recent_since`)."""
    return dialect != "duckdb"


RECENT_MARGIN = 1.25  # _recent_since reaches back this much further than an even rate would need


def _recent_since(
    conn: Connection, t: MappedTable, model: str, versions: Sequence[str], start: datetime, end: datetime, rows: int
) -> dict[str, datetime]:
    """Per version, the time from which its rows of ``[start, end)`` are about its most recent
    ``rows`` (``start`` where it has no more): ``last - (last - first) * 1.25 rows / n`` from each
    version's count, first and last ``ts`` (one filtered aggregate each, in one UNION ALL), so at
    an even rate the range holds 1.25 ``rows``. Deterministic, and on a table appended in time
    order DuckDB reads the range from the row groups its zone maps keep (10 M rows: 10 ms for the
    9 M baseline rows' span, 12 ms for the edges over its 62,000 most recent rows, against 0.22 s
    for a Bernoulli sample of the window; a seeded ``SYSTEM`` sample is as fast but not repeatable
    on more than one thread)."""
    ts = t.col("ts")
    spans = [  # one filtered aggregate per version: on DuckDB faster than a GROUP BY version
        sa.select(sa.literal(j).label("j"), sa.func.count(), sa.func.min(ts), sa.func.max(ts)).where(
            *_arm_filter(t, model, v, start, end)
        )
        for j, v in enumerate(versions)
    ]
    since = dict.fromkeys(versions, start)
    for j, n, first, last in conn.execute(sa.union_all(*spans)):
        if n > rows and first is not None and last > first:
            since[versions[j]] = max(start, last - (last - first) * min(1.0, RECENT_MARGIN * rows / n))
    return since


def quantile_edges(
    conn: Connection,
    t: MappedTable,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    columns: Mapping[str, tuple[ColumnElement, int]],
    sample_rows: int,
) -> dict[str, list[float]]:
    """For each named ``(value, bins)``: the inner edges of ``bins`` equal-count tiles of ``value``
    for one version (distinct, ascending), from about its most recent ``sample_rows`` rows.

    One statement. Indexed dialects (:func:`indexed`): NTILE per value over the version's most recent
    ``sample_rows`` rows, a bounded sort whatever the size of the window (a materialised CTE).
    DuckDB, for a window of more than ``sample_rows`` rows: ``quantile_disc`` at k / bins over its
    rows since :func:`_recent_since`, one pass with no sort of them.
    """
    names = list(columns)
    if not indexed(conn.dialect.name):
        since = _recent_since(conn, t, model, [version], start, end, sample_rows)[version]
        if since > start:  # else the "tail" is the whole window, as on every dialect
            return _recent_edges(conn, _arm_filter(t, model, version, since, end), columns)
    sample = _tail_sample(t, model, version, start, end, [columns[n][0] for n in names], sample_rows)
    cte = _materialized(sa.select(sample).cte("tail"))
    branches = []
    for i, name in enumerate(names):
        v = cte.c[f"c{i}"]
        tiles = (
            sa.select(v.label("v"), sa.func.ntile(columns[name][1]).over(order_by=v).label("tile"))
            .where(v.is_not(None))
            .subquery()
        )
        branches.append(
            sa.select(sa.literal(i).label("k"), tiles.c.tile, sa.func.max(tiles.c.v).label("upper")).group_by(
                tiles.c.tile
            )
        )
    uppers: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for k, tile, upper in conn.execute(sa.union_all(*branches)):
        if upper is not None:
            uppers[names[int(k)]].append((int(tile), float(upper)))
    return {n: sorted({u for _, u in sorted(found)[:-1]}) for n, found in uppers.items()}


def _recent_edges(
    conn: Connection, where: Sequence[ColumnElement], columns: Mapping[str, tuple[ColumnElement, int]]
) -> dict[str, list[float]]:
    """DuckDB's :func:`quantile_edges`: ``quantile_disc`` at k / bins of each value over the rows of
    ``where`` (the value of rank floor(q (n - 1)), numpy's ``method="lower"``), in one pass."""
    names = list(columns)

    def fractions(bins: int) -> ColumnElement:  # generated numbers, never input: a literal list
        return sa.literal_column("[" + ", ".join(repr(k / bins) for k in range(1, bins)) + "]")

    stmt = sa.select(*(sa.func.quantile_disc(columns[n][0], fractions(columns[n][1])) for n in names)).where(*where)
    found = conn.execute(stmt).one()
    return {n: sorted({float(v) for v in (found[i] or []) if v is not None}) for i, n in enumerate(names)}


def window_histograms(
    conn: Connection,
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    columns: Mapping[str, tuple[ColumnElement, Sequence[float]]],
    slices: int | None = None,
) -> dict[tuple[str, str], list[int]]:
    """Counts per bin (``len(edges) + 1`` bins as :func:`bin_index` numbers them, NULLs left out) of
    each named ``(value, edges)`` over every row of each version in ``[start, end)``, keyed by
    (version, name).

    One aggregate per version, their rows in one UNION ALL, with per value its non-NULL count and
    its count below each edge: the bins are their differences. A pass over the window with no
    groups and no sort (DuckDB, 10 M rows: 0.25 s, where a GROUP BY version took 0.30 s); in time
    slices run at once, as :func:`binned_frame`'s scan.
    """
    names = list(columns)
    sums: list[ColumnElement] = []
    for name in names:
        value, edges = columns[name]
        sums.append(sa.func.count(value))
        sums += [count_where(value < sa.literal(float(e))) for e in edges]

    def statement(lo: datetime, hi: datetime) -> sa.CompoundSelect:
        arms = [
            sa.select(sa.literal(j).label("j"), *sums).where(*_arm_filter(t, model, v, lo, hi))
            for j, v in enumerate(versions)
        ]
        return sa.union_all(*arms)

    found = np.zeros((len(versions), len(sums)), dtype=np.int64)
    for row in _sliced(conn, _slice_bounds(conn, t, model, versions, start, end, slices), statement):
        found[int(row[0])] += np.array([int(x or 0) for x in row[1:]], dtype=np.int64)
    counts: dict[tuple[str, str], list[int]] = {}
    for j, v in enumerate(versions):
        row = found[j]
        at = 0
        for name in names:
            k = len(columns[name][1])
            total, below = row[at], row[at + 1 : at + 1 + k]
            counts[(v, name)] = np.diff([0, *below, total]).tolist()  # the bins between the cumulative counts
            at += k + 1
    return counts


def bin_index(value: ColumnElement, edges: Sequence[float], dialect: str = "") -> ColumnElement:
    """The number of ``edges`` at or below ``value`` (0 ... len(edges)); -1 for NULL.

    Bin k is [edges[k-1], edges[k]) with open outer bins. PostgreSQL: ``width_bucket(value, array)``,
    a binary search in C. Elsewhere a CASE tree (:func:`step_index`): balanced on SQLite, about
    log2(len(edges)) comparisons per row; on DuckDB eleven branches a node, which it runs in 0.34 s
    where the balanced tree takes 0.47 s and a flat CASE 0.54 s (100 edges, 10 M rows).
    """
    if dialect == "postgresql" and edges:
        array = sa.cast(sa.literal(list(map(float, edges)), sa.ARRAY(sa.Double)), sa.ARRAY(sa.Double))
        return sa.func.coalesce(sa.func.width_bucket(value, array), -1)
    fan = 11 if dialect == "duckdb" else 2
    return sa.case((value.is_(None), sa.literal(-1)), else_=step_index(value, [float(e) for e in edges], fan=fan))


def step_index(value: ColumnElement, steps: Sequence[Any], below: bool = False, fan: int = 2) -> ColumnElement:
    """How many of the ascending ``steps`` are at or below ``value`` (``below``: strictly below), as a
    CASE tree of bound values (numbers or times) that every dialect runs: each node splits its
    answers into ``fan`` runs (2: a balanced binary tree; a run of at most ``fan`` is a flat CASE)."""

    def before(step: Any) -> ColumnElement:
        return value <= sa.literal(step) if below else value < sa.literal(step)

    def tree(lo: int, hi: int) -> ColumnElement:  # the answer is one of lo ... hi
        if lo == hi:
            return sa.literal(lo)
        size = -(-(hi - lo + 1) // fan)
        runs = [(a, min(hi, a + size - 1)) for a in range(lo, hi + 1, size)]
        return sa.case(*((before(steps[b]), tree(a, b)) for a, b in runs[:-1]), else_=tree(*runs[-1]))

    return tree(0, len(steps))


def slot_steps(start: datetime, end: datetime, slot: float) -> list[datetime]:
    """The boundaries ``start + k * slot`` from ``start`` up to the first at or after ``end``."""
    count = max(0, math.ceil((end - start).total_seconds() / slot - 1e-9))
    return [start + timedelta(seconds=k * slot) for k in range(count + 1)]


MAX_TREE_STEPS = 2048  # SQLite: more boundaries than this compile slowly (and hit its limit on bound values)


def _epoch_us(value: ColumnElement, dialect: str) -> ColumnElement | None:
    """Microseconds since the epoch, exactly, where the dialect can say (None elsewhere). SQLite:
    the whole seconds of the text's first 19 characters plus its six digits of fraction."""
    if dialect == "sqlite":
        seconds = sa.cast(sa.func.strftime("%s", sa.func.substr(value, 1, 19)), sa.BigInteger)
        fraction = sa.cast(sa.func.substr(value.concat("000000"), 21, 6), sa.BigInteger)
        return seconds * 1_000_000 + fraction
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", value) * 1_000_000, sa.BigInteger)
    if dialect == "duckdb":
        return sa.func.epoch_us(value)
    return None


def slot_keys(t: MappedTable, start: datetime, end: datetime, slot: int, lead: int, dialect: str) -> dict[str, Any]:
    """The time keys of a replay's cube (see :class:`mlcanary.analysis.LookCube`): ``ts_slot``, the
    slot of the row, and ``label_slot``, the number of slot boundaries before its label arrived, but
    never less than ``ts_slot + lead``. A CASE tree over the boundaries (one bound value each) where
    they are few and the dialect has no exact epoch (SQLite runs the tree faster than its string
    functions, up to thousands of slots), else integer arithmetic on the microseconds."""
    greatest = sa.func.max if dialect == "sqlite" else sa.func.greatest  # SQLite's two-argument max is scalar
    steps = slot_steps(start, end, slot)
    ts, label_ts = _epoch_us(t.col("ts"), dialect), _epoch_us(t.col("label_ts"), dialect)
    if ts is None or label_ts is None or (dialect == "sqlite" and len(steps) <= MAX_TREE_STEPS):
        row = step_index(t.col("ts"), steps) - 1
        arrived = step_index(t.col("label_ts"), steps, below=True)
    else:
        width, origin = slot * 1_000_000, (start - datetime(1970, 1, 1)) // timedelta(microseconds=1)
        since = ts - origin  # >= 0: the rows are those of [start, end)
        row = sa.cast((since - since % width) // width, sa.BigInteger)  # exact multiples: no rounding anywhere
        up = greatest(label_ts - origin, 0) + (width - 1)  # ceil(d / width): boundaries strictly before
        arrived = sa.cast((up - up % width) // width, sa.BigInteger)
    return {"ts_slot": row, "label_slot": greatest(arrived, row + lead)}


# The per-row quantities that can be summed per version, segment and score bin (y: label, s: score,
# d = s - y): count, y, y², s, s², |d|, d², d⁴; and the data checks' counts, in the same pass: labels
# neither 0 nor 1, NaN or infinite labels, NaN or infinite scores.
BIN_MEASURES = ("n", "y", "y2", "s", "s2", "ad", "d2", "d4", "y_not01", "y_nonfinite", "s_nonfinite")
DATA_CHECKS = ("y_not01", "y_nonfinite", "s_nonfinite")


def binned_frame(
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
    slices: int | None = None,
    sample_rows: int = 50_000,
    max_values: int = 50,
    extra: Mapping[str, ColumnElement] | None = None,
) -> pd.DataFrame:
    """Per version, segment (``column``/``value``; "*" for the whole arm) and score bin, the sums of
    ``measures`` (names from :data:`BIN_MEASURES`; the rest are 0) over the label-complete rows of
    ``[start, end)``; with ``extra``, per value of those integer keys too (a replay's time slots).

    One scan: a single GROUP BY over (score bin, version, every segment column), rolled up here into
    the per-segment marginals. Its result depends on the segments' cardinalities and the bins, never
    on the number of rows. (GROUPING SETS were measured slower: PostgreSQL ran one sort per set.)

    - The scan is split into ``slices`` consecutive time slices, aggregated at once on connections
      of their own and summed here: a parallel partial aggregate for the dialects that run one
      statement on one core (SQLite) or cannot plan one for this GROUP BY (PostgreSQL). ``None``: see
      :func:`scan_slices`.
    - SQLite groups by sorting, and sorts one integer key far faster than several text keys: there
      the keys are packed into one integer, the segment values numbered from the arms' most recent
      ``sample_rows`` rows (:class:`_PackedKeys`). A value the sample missed costs one more scan.
    - A segment column keeps at most ``max_values`` values, its most frequent in the sample; the
      rest are summed as one segment, :data:`OTHER`. A column with more values than that in the
      sample is folded in the scan itself, so neither the scan's result nor the segments grow with
      the column's cardinality; one with more outside the sample is folded here.
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
        "y_not01": count_where(sa.and_(label.not_in([0, 1]), sa.not_(not_finite(label)))),
        "y_nonfinite": count_where(not_finite(label)),
        "s_nonfinite": count_where(not_finite(score)),
    }
    wanted = [m for m in BIN_MEASURES if m == "n" or m in measures]
    sums = [available[m] for m in wanted]
    score_bin = bin_index(score, score_edges, conn.dialect.name)
    where = [
        t.col("model") == model,
        t.col("version").in_(list(versions)),
        label.is_not(None),
        t.col("label_ts") <= label_asof,
    ]
    kept: dict[str, list[Any]] = {}
    capped: set[str] = set()
    if segment_columns:
        for column, counted in sample_value_counts(
            conn, t, model, versions, start, end, segment_columns, sample_rows
        ).items():
            kept[column] = sorted((v for v, _ in counted[:max_values]), key=str)
            if len(counted) > max_values:
                capped.add(column)
    plain = [_folded(t.col(c), kept[c]) if c in capped else t.col(c) for c in segment_columns]
    keys: _PlainKeys | _PackedKeys = _PlainKeys(score_bin, t.col("version"), plain)
    if conn.dialect.name == "sqlite" and segment_columns:
        folded = {j for j, c in enumerate(segment_columns) if c in capped}
        keys = _PackedKeys.build(score_bin, len(score_edges), t.col("version"), versions, t, kept, folded) or keys

    bounds = _slice_bounds(conn, t, model, versions, start, end, slices)
    more = list((extra or {}).values())

    def scan(columns: Sequence[ColumnElement], only: Sequence[ColumnElement] = ()) -> list[sa.Row]:
        columns = [*columns, *more]

        def statement(lo: datetime, hi: datetime) -> sa.Select:
            span = [t.col("ts") >= lo, t.col("ts") < hi]
            return sa.select(*columns, *sums).where(*where, *span, *only).group_by(*columns)

        return _sliced(conn, bounds, statement)

    names = list(extra or {})
    frame = keys.frame(scan(keys.columns), names, wanted)
    parts = [frame.assign(column=OVERALL, value=OVERALL)]
    for j, name in enumerate(segment_columns):
        values = frame[f"seg{j}"]
        if (values.values == _UNSEEN).any():  # values the codebook lacks: this column's marginal for them
            assert isinstance(keys, _PackedKeys)
            column = t.col(name)
            rows = scan([score_bin, t.col("version"), column], [column.not_in(keys.values[j]), column.is_not(None)])
            extra_part = pd.DataFrame(rows, columns=["bin", "version", "value", *names, *wanted])
            parts.append(extra_part.assign(column=name, value=extra_part["value"].map(str)))
        mine = frame[values.notna() & (values.values != _UNSEEN)]
        parts.append(mine.assign(column=name, value=mine[f"seg{j}"].map(str)))
    keys_out = ["version", "column", "value", "bin", *names]
    found = pd.concat([p[[*keys_out, *wanted]] for p in parts], ignore_index=True)
    found[wanted] = found[wanted].astype(float).fillna(0.0)
    found = _fold(found, segment_columns, max_values)
    merged = found.groupby(keys_out, as_index=False, sort=False)[wanted].sum()
    for m in BIN_MEASURES:
        if m not in wanted:
            merged[m] = 0.0
    merged["bin"] = merged["bin"].astype(int)
    return merged[[*keys_out, *BIN_MEASURES]]


_UNSEEN = object()  # a segment value the codebook of packed keys does not have


def _folded(column: ColumnElement, kept: Sequence[Any]) -> ColumnElement:
    """The column's value if it is one of ``kept``, else :data:`OTHER` (NULL stays NULL), as text."""
    return sa.case(
        (column.is_(None), sa.null()),
        (column.in_(list(kept)), sa.cast(column, sa.String)),
        else_=sa.literal(OTHER),
    )


def _fold(found: pd.DataFrame, columns: Sequence[str], max_values: int) -> pd.DataFrame:
    """Keep each column's ``max_values`` most frequent values; sum the rest into :data:`OTHER`."""
    for column in columns:
        mine = found["column"] == column
        sizes = found[mine & (found["value"] != OTHER)].groupby("value")["n"].sum()
        if len(sizes) <= max_values:
            continue
        keep = set(sorted(sizes.index, key=lambda v: (-sizes[v], v))[:max_values])
        found.loc[mine & ~found["value"].isin(keep), "value"] = OTHER
    return found


@dataclass(frozen=True)
class _PlainKeys:
    """GROUP BY (score bin, version, segment columns...), read back as they are."""

    score_bin: ColumnElement
    version: ColumnElement
    segments: list[ColumnElement]

    @property
    def columns(self) -> list[ColumnElement]:
        return [self.score_bin, self.version, *self.segments]

    def frame(self, rows: Sequence[Sequence[Any]], extra: Sequence[str], sums: Sequence[str]) -> pd.DataFrame:
        """The scan's rows as columns ``bin, version, seg0 ... segK, *extra, *sums``."""
        segs = [f"seg{j}" for j in range(len(self.segments))]
        return pd.DataFrame(list(map(tuple, rows)), columns=["bin", "version", *segs, *extra, *sums]).astype(
            {"bin": int}
        )


@dataclass(frozen=True)
class _PackedKeys:
    """GROUP BY one integer: ((version * R_1 + code_1) * R_2 + ...) * (bins + 1) + bin + 1.

    A segment's code is 0 for NULL, 1 ... K for the codebook's values, K + 1 for any other value.
    """

    packed: ColumnElement
    versions: Sequence[str]
    values: list[list[Any]]  # per segment column, the codebook
    bins: int  # score bins: len(edges) + 1, plus one for NULL scores
    folded: frozenset[int] = frozenset()  # columns whose values beyond the codebook are OTHER

    @classmethod
    def build(
        cls,
        score_bin: ColumnElement,
        edges: int,
        version: ColumnElement,
        versions: Sequence[str],
        t: MappedTable,
        codebook: Mapping[str, list[Any]],
        folded: set[int] | frozenset[int] = frozenset(),
    ) -> _PackedKeys | None:
        """The packed key, or None when it would not fit in 63 bits."""
        key: ColumnElement = sa.case(*((version == v, sa.literal(i)) for i, v in enumerate(versions)), else_=0)
        radix = len(versions)
        for name, values in codebook.items():
            column = t.col(name)
            code = sa.case(
                (column.is_(None), sa.literal(0)),
                *((column == v, sa.literal(i + 1)) for i, v in enumerate(values)),
                else_=sa.literal(len(values) + 1),
            )
            key = key * (len(values) + 2) + code
            radix *= len(values) + 2
        bins = edges + 2
        if radix * bins >= 2**62:
            return None
        return cls((key * bins + score_bin + 1).label("k"), versions, list(codebook.values()), bins, frozenset(folded))

    @property
    def columns(self) -> list[ColumnElement]:
        return [self.packed]

    def frame(self, rows: Sequence[Sequence[Any]], extra: Sequence[str], sums: Sequence[str]) -> pd.DataFrame:
        """The scan's rows decoded, vectorised, as :meth:`_PlainKeys.frame`'s columns; a segment value
        beyond the codebook is :data:`OTHER` in a folded column, else ``_UNSEEN``."""
        found = pd.DataFrame(list(map(tuple, rows)), columns=["k", *extra, *sums])
        rest, b = np.divmod(found["k"].to_numpy(dtype=np.int64), self.bins)
        out = {"bin": b - 1}
        for j in reversed(range(len(self.values))):
            values = self.values[j]
            rest, code = np.divmod(rest, len(values) + 2)
            lookup = np.array([None, *values, OTHER if j in self.folded else _UNSEEN], dtype=object)
            out[f"seg{j}"] = lookup[code]
        out["version"] = np.array(list(self.versions), dtype=object)[rest]
        segs = [f"seg{j}" for j in range(len(self.values))]
        return pd.DataFrame({c: out[c] for c in ["bin", "version", *segs]}).join(found[[*extra, *sums]])


def sample_value_counts(
    conn: Connection,
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    columns: Sequence[str],
    sample_rows: int,
) -> dict[str, list[tuple[Any, int]]]:
    """The distinct non-NULL values of each column with their counts, most frequent first, in the
    versions' most recent ``sample_rows`` rows (on DuckDB about as many: their rows since
    :func:`_recent_since`)."""
    values = [t.col(c) for c in columns]
    if indexed(conn.dialect.name):
        cte = _tails(t, model, versions, start, end, values, sample_rows)
        source = [cte.c[f"c{i}"] for i in range(len(columns))]
        where: list[ColumnElement] = []
    else:
        since = _recent_since(conn, t, model, versions, start, end, sample_rows)
        source = values
        version, ts = t.col("version"), t.col("ts")
        recent = sa.or_(*(sa.and_(version == v, ts >= since[v]) for v in versions))
        where = [*_versions_filter(t, model, versions, start, end), recent]
    branches = [
        sa.select(sa.literal(i).label("k"), v.label("v"), sa.func.count().label("n"))
        .where(*where, v.is_not(None))
        .group_by(v)
        for i, v in enumerate(source)
    ]
    found: dict[str, list[tuple[Any, int]]] = {c: [] for c in columns}
    for k, v, n in conn.execute(sa.union_all(*branches)):
        found[columns[int(k)]].append((v, int(n)))
    return {c: sorted(vs, key=lambda vn: (-vn[1], str(vn[0]))) for c, vs in found.items()}


MAX_SLICES = 8


def scan_slices(conn: Connection) -> int:
    """How many time slices :func:`binned_frame` runs at once on this connection's database.

    - SQLite runs a statement on one core: one slice per core of this machine (a file database only;
      an in-memory one is private to its connection).
    - PostgreSQL plans no parallel aggregate for this GROUP BY (it cannot estimate the score bins):
      as many slices as it would run processes for one query, ``max_parallel_workers_per_gather + 1``.
    - Others (DuckDB, warehouses) parallelise a statement themselves: one slice.
    """
    dialect = conn.dialect.name
    if dialect == "sqlite":
        database = conn.engine.url.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return 1
        return max(1, min(os.cpu_count() or 1, MAX_SLICES))
    if dialect == "postgresql":
        workers = conn.execute(sa.text("SELECT current_setting('max_parallel_workers_per_gather')::int")).scalar()
        return max(1, min(int(workers or 0) + 1, MAX_SLICES))
    return 1


def _slice_bounds(
    conn: Connection,
    t: MappedTable,
    model: str,
    versions: Sequence[str],
    start: datetime,
    end: datetime,
    slices: int | None,
) -> list[tuple[datetime, datetime]]:
    """The time slices a scan of ``[start, end)`` runs in (:func:`scan_slices` of them by default)."""
    count = scan_slices(conn) if slices is None else slices
    if count <= 1:
        return [(start, end)]
    return _time_slices(start, end, *_data_span(conn, t, model, versions, start, end), count)


def _sliced(
    conn: Connection,
    bounds: list[tuple[datetime, datetime]],
    statement: Callable[[datetime, datetime], sa.Select | sa.CompoundSelect],
) -> list[sa.Row]:
    """Every slice's rows of ``statement``, the slices aggregated at once on connections of their own."""
    if len(bounds) <= 1:
        lo, hi = bounds[0]
        return _aggregate(conn, statement(lo, hi))
    engine = conn.engine

    def run(bound: tuple[datetime, datetime]) -> list[sa.Row]:
        with engine.connect() as own:
            return _aggregate(own, statement(*bound), sliced=True)

    with ThreadPoolExecutor(len(bounds), thread_name_prefix="mlcanary-scan") as pool:
        return [row for part in pool.map(run, bounds) for row in part]


def _data_span(
    conn: Connection, t: MappedTable, model: str, versions: Sequence[str], start: datetime, end: datetime
) -> tuple[datetime | None, datetime | None]:
    """The first and last timestamp of the versions' rows in ``[start, end)``: index lookups."""
    ts = t.col("ts")
    firsts, lasts = [], []
    for version in versions:
        where = _arm_filter(t, model, version, start, end)
        firsts.append(sa.select(sa.func.min(ts, type_=sa.DateTime)).where(*where).scalar_subquery())
        lasts.append(sa.select(sa.func.max(ts, type_=sa.DateTime)).where(*where).scalar_subquery())
    found = conn.execute(sa.select(*firsts, *lasts)).one()
    first = [v for v in found[: len(versions)] if v is not None]
    last = [v for v in found[len(versions) :] if v is not None]
    return (min(first), max(last)) if first and last else (None, None)


def _time_slices(
    start: datetime, end: datetime, first: datetime | None, last: datetime | None, count: int
) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` cut into ``count`` consecutive slices, the cuts spread evenly over the span
    of the data (``first`` ... ``last``), so that each slice holds a similar share of the rows."""
    if count <= 1 or first is None or last is None or last <= first:
        return [(start, end)]
    step = (last - first) / count
    cuts = [first + step * i for i in range(1, count)]
    return list(zip([start, *cuts], [*cuts, end], strict=True))


def _aggregate(conn: Connection, stmt: sa.Select | sa.CompoundSelect, sliced: bool = False) -> list[sa.Row]:
    """Run a binned GROUP BY; on PostgreSQL as a hash aggregate without JIT."""
    if conn.dialect.name != "postgresql":
        return list(conn.execute(stmt).all())
    # PostgreSQL cannot estimate the number of score bins, takes every row for a group, and sorts the
    # whole window to disk (15 s at 10 M rows). The groups are bounded by the segment cube, so hash
    # them, and skip JIT compilation (1 s). A time slice reads its rows through the (model, version,
    # ts) index rather than the whole table: prediction tables are appended in time order, so each
    # slice reads its own pages (10 M rows: 4.0 s in one statement, 2.4 s in two slices).
    settings = ["enable_sort", "jit", *(["enable_seqscan"] if sliced else [])]
    for name in settings:
        conn.execute(sa.text(f"SET LOCAL {name} = off"))
    try:
        return list(conn.execute(stmt).all())
    finally:
        for name in settings:
            conn.execute(sa.text(f"RESET {name}"))
