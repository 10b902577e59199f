"""Aggregate queries against brute force on small data, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mlcanary.warehouse.queries import (
    OTHER,
    OVERALL,
    Requests,
    bin_index,
    binned_frame,
    indexed,
    latency_quantile,
    mapped_table,
    quantile_edges,
    request_counts,
    scan_slices,
    window_histograms,
)
from mlcanary.warehouse.schema import predictions

T0 = datetime(2026, 11, 1, 12, 0, 0)
COLUMNS = {
    "request_id": "request_id",
    "ts": "ts",
    "model": "model",
    "version": "model_version",
    "score": "score",
    "label": "label",
    "label_ts": "label_ts",
    "latency_ms": "latency_ms",
    "success": "success",
}


@pytest.fixture(params=["sqlite", "postgres", "duckdb"])
def any_engine(request: pytest.FixtureRequest) -> sa.Engine:
    return request.getfixturevalue(
        {"sqlite": "engine", "postgres": "pg_engine", "duckdb": "duckdb_engine"}[request.param]
    )


def _frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = [T0 + timedelta(seconds=float(s)) for s in rng.uniform(0, 600, n)]
    label = rng.integers(0, 2, n).astype(float)
    labelled = rng.uniform(size=n) < 0.8
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "ts": ts,
            "model": "m",
            "model_version": rng.choice(["v1", "v2"], n),
            "user_cohort": rng.choice(["new", "returning", None], n),
            "score": rng.uniform(size=n),
            "label": np.where(labelled, label, np.nan),
            "label_ts": [t + timedelta(seconds=30) if ok else None for t, ok in zip(ts, labelled, strict=True)],
            "latency_ms": np.round(rng.lognormal(4, 0.5, n), 3),
            "success": (rng.uniform(size=n) > 0.05).astype(int),
        }
    )


def _records(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return list(binned_frame(*args, **kwargs).to_dict("records"))


def _load(eng: sa.Engine, df: pd.DataFrame) -> None:
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    with eng.begin() as conn:
        conn.execute(sa.insert(predictions), rows)


def test_counts_and_interpolated_p99_match_numpy(any_engine: sa.Engine) -> None:
    df = _frame()
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS)
    start, end = T0 + timedelta(seconds=100), T0 + timedelta(seconds=500)
    sel = df[(df.model_version == "v2") & (df.ts >= start) & (df.ts < end)]
    with any_engine.connect() as conn:
        r = request_counts(conn, t, "m", "v2", start, end)
        assert (r.n, r.ok, r.bad_success, r.bad_latency) == (len(sel), int(sel.success.sum()), 0, 0)
        for q in (0.5, 0.9, 0.99):
            got = latency_quantile(conn, t, "m", "v2", start, end, q)
            assert got == pytest.approx(np.percentile(sel.latency_ms, 100 * q, method="linear"), rel=1e-9)
        assert latency_quantile(conn, t, "m", "v9", start, end, 0.99) is None
        assert request_counts(conn, t, "m", "v9", start, end) == Requests(0, 0, 0, 0)


def test_quantile_edges_and_bins_match_numpy(any_engine: sa.Engine) -> None:
    df = _frame(n=2000, seed=2)
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS)
    start, end = T0, T0 + timedelta(seconds=600)
    columns = {"score": (t.col("score"), 10), "latency": (t.col("latency_ms"), 4)}
    with any_engine.connect() as conn:
        edges = quantile_edges(conn, t, "m", "v1", start, end, columns, 100_000)
        sample = quantile_edges(conn, t, "m", "v1", start, end, columns, 200)
    v1 = df[df.model_version == "v1"]

    def tile_uppers(values: np.ndarray, bins: int) -> list[float]:
        # NTILE: the first tiles take the remainder; the last tile's upper is no inner edge
        return sorted({tile.max() for tile in np.array_split(np.sort(values), bins)[:-1]})

    assert edges["score"] == pytest.approx(tile_uppers(v1.score.to_numpy(), 10))  # the sample is the window
    assert edges["latency"] == pytest.approx(tile_uppers(v1.latency_ms.to_numpy(), 4))
    if indexed(any_engine.dialect.name):  # NTILE over the most recent rows
        latest = v1.sort_values("ts").tail(200)
        assert sample["score"] == pytest.approx(tile_uppers(latest.score.to_numpy(), 10))
        assert sample["latency"] == pytest.approx(tile_uppers(latest.latency_ms.to_numpy(), 4))
        return
    # DuckDB: quantile_disc over the rows since the time that holds about 1.25 x 200 of them at an
    # even rate (from the span of the version's rows): deterministic, the same rows every time
    first, last = v1.ts.min(), v1.ts.max()
    recent = v1[v1.ts >= last - (last - first) * 1.25 * 200 / len(v1)]
    assert 200 <= len(recent) <= 300
    for name, values, bins in (("score", recent.score.dropna(), 10), ("latency", recent.latency_ms.dropna(), 4)):
        fractions = [k / bins for k in range(1, bins)]
        assert sample[name] == sorted(set(np.quantile(values.to_numpy(), fractions, method="lower"))), name
    with any_engine.connect() as conn:
        assert quantile_edges(conn, t, "m", "v1", start, end, columns, 200) == sample


def test_binned_aggregates_match_a_pandas_groupby(any_engine: sa.Engine) -> None:
    df = _frame(seed=5)
    df["f1"] = np.random.default_rng(1).normal(size=len(df))
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS, extra=["user_cohort", "f1"])
    start, end, asof = T0, T0 + timedelta(seconds=400), T0 + timedelta(seconds=420)
    edges, f_edges = [0.2, 0.5, 0.9], [-1.0, 0.0, 1.0]
    with any_engine.connect() as conn:
        got = _records(conn, t, "m", ["v1", "v2"], start, end, asof, ["user_cohort"], edges)
        only_y = _records(conn, t, "m", ["v1", "v2"], start, end, asof, [], edges, ["y"])
        wanted = {"f1": (t.col("f1"), f_edges), "score": (t.col("score"), edges)}
        hists = window_histograms(conn, t, "m", ["v1", "v2"], start, end, wanted)
    sel = df[(df.ts >= start) & (df.ts < end) & df.label.notna() & (df.label_ts <= asof)].copy()
    sel["bin"] = np.searchsorted(edges, sel.score, side="right")
    sel["d"] = sel.score - sel.label
    expected = {}
    for (version, b), g in sel.groupby(["model_version", "bin"]):
        expected[(version, OVERALL, OVERALL, b)] = g
    for (version, cohort, b), g in sel.dropna(subset=["user_cohort"]).groupby(["model_version", "user_cohort", "bin"]):
        expected[(version, "user_cohort", cohort, b)] = g
    for version in ("v1", "v2"):
        arm = df[(df.model_version == version) & (df.ts >= start) & (df.ts < end)]
        for name, e in (("f1", f_edges), ("score", edges)):  # every row of the window, NULLs left out
            present = arm[name].dropna()
            assert hists[(version, name)] == list(np.bincount(np.searchsorted(e, present, side="right"), minlength=4))
    assert {(r["version"], r["column"], r["value"], r["bin"]) for r in got} == set(expected)
    for r in only_y:  # a subset of the measures: the others are not computed
        g = expected[(r["version"], OVERALL, OVERALL, r["bin"])]
        assert (r["n"], r["y"], r["s"], r["d2"]) == pytest.approx((len(g), g.label.sum(), 0.0, 0.0))
    for r in got:
        g = expected[(r["version"], r["column"], r["value"], r["bin"])]
        assert r["n"] == len(g)
        want = [
            g.label.sum(),
            (g.label**2).sum(),
            g.score.sum(),
            (g.score**2).sum(),
            g.d.abs().sum(),
            (g.d**2).sum(),
            (g.d**4).sum(),
        ]
        assert [r[k] for k in ("y", "y2", "s", "s2", "ad", "d2", "d4")] == pytest.approx(want)


def test_a_sliced_scan_sums_to_the_single_scan(any_engine: sa.Engine) -> None:
    """The parallel time slices add up to exactly what one statement over the window returns."""
    df = _frame(n=3000, seed=7)
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS, extra=["user_cohort"])
    start, end, asof = T0 - timedelta(hours=1), T0 + timedelta(seconds=600), T0 + timedelta(hours=1)
    edges = [0.25, 0.5, 0.75]

    def by_key(rows: list[dict]) -> dict:
        return {(r["version"], r["column"], r["value"], r["bin"]): r for r in rows}

    with any_engine.connect() as conn:
        whole = by_key(_records(conn, t, "m", ["v1", "v2"], start, end, asof, ["user_cohort"], edges, slices=1))
        sliced = by_key(_records(conn, t, "m", ["v1", "v2"], start, end, asof, ["user_cohort"], edges, slices=3))
        # SQLite numbers the segment values from a sample: one that misses a value takes another scan
        few = by_key(
            _records(conn, t, "m", ["v1", "v2"], start, end, asof, ["user_cohort"], edges, slices=2, sample_rows=2)
        )
        automatic = scan_slices(conn)
    assert sum(r["n"] for k, r in whole.items() if k[1] == OVERALL) == df.label.notna().sum()
    assert sliced.keys() == whole.keys() == few.keys()
    for key, row in whole.items():
        sums = {m: v for m, v in row.items() if m not in ("version", "column", "value", "bin")}
        assert {m: sliced[key][m] for m in sums} == pytest.approx(sums, rel=1e-12)
        assert {m: few[key][m] for m in sums} == pytest.approx(sums, rel=1e-12)
    # SQLite: one slice per core of a file database; PostgreSQL: its parallel workers + 1; DuckDB: 1
    if any_engine.dialect.name == "postgresql":
        with any_engine.connect() as conn:
            workers = int(conn.execute(sa.text("SHOW max_parallel_workers_per_gather")).scalar())
        assert automatic == min(workers + 1, 8)
    else:
        assert automatic == {"sqlite": min(os.cpu_count() or 1, 8), "duckdb": 1}[any_engine.dialect.name]


def test_bin_index_puts_edges_in_the_upper_bin(any_engine: sa.Engine) -> None:
    edges = [0.1, 0.2, 0.3, 0.5, 0.8]
    values = [-5.0, 0.1, 0.15, 0.2, 0.49, 0.5, 0.8, 9.0]
    with any_engine.connect() as conn:
        name = conn.dialect.name
        got = [conn.execute(sa.select(bin_index(sa.literal(v, sa.Double), edges, name))).scalar() for v in values]
        null_bin = conn.execute(sa.select(bin_index(sa.null(), edges, name))).scalar()
    assert got == list(np.searchsorted(edges, values, side="right"))
    assert null_bin == -1


@pytest.mark.parametrize("count", [1, 2, 10, 11, 12, 100, 121, 122])
def test_bin_index_matches_a_binary_search_at_every_size_of_tree(any_engine: sa.Engine, count: int) -> None:
    """Each dialect's tree (balanced; eleven branches a node on DuckDB; ``width_bucket``) puts every
    value, each edge itself among them, where numpy's binary search does."""
    rng = np.random.default_rng(count)
    edges = sorted(set(rng.normal(size=count).round(6).tolist()))
    values = [*edges, *(np.array(edges) + 1e-7), *(np.array(edges) - 1e-7), -1e9, 1e9, *rng.normal(size=200)]
    probe = sa.Table("bin_probe", sa.MetaData(), sa.Column("i", sa.Integer), sa.Column("v", sa.Double))
    probe.drop(any_engine, checkfirst=True)
    probe.create(any_engine)
    try:
        with any_engine.begin() as conn:
            conn.execute(probe.insert(), [{"i": i, "v": float(v)} for i, v in enumerate(values)])
        with any_engine.connect() as conn:
            stmt = sa.select(probe.c.i, bin_index(probe.c.v, edges, conn.dialect.name)).order_by(probe.c.i)
            got = [b for _, b in conn.execute(stmt)]
    finally:
        probe.drop(any_engine)
    assert got == np.searchsorted(edges, values, side="right").tolist()


def test_spec_identifiers_are_quoted_not_spliced(engine: sa.Engine) -> None:
    """A table and columns named with reserved words work, because SQLAlchemy quotes them."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                'CREATE TABLE "order" ("select" TEXT, "from" TIMESTAMP, "group" TEXT, "where" TEXT, '
                '"Latency" FLOAT, "ok" INTEGER)'
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO \"order\" VALUES ('m', '2026-11-01 12:00:01', 'v1', 'r1', 10.0, 1),"
                " ('m', '2026-11-01 12:00:02', 'v1', 'r2', 20.0, 0)"
            )
        )
    t = mapped_table(
        "order",
        None,
        {
            "model": "select",
            "ts": "from",
            "version": "group",
            "request_id": "where",
            "latency_ms": "Latency",
            "success": "ok",
        },
    )
    stmt = sa.select(sa.func.count()).select_from(t.table).where(t.col("version") == "v1")
    sql = str(stmt.compile(engine))
    assert '"order"' in sql and '"group"' in sql
    with engine.connect() as conn:
        assert request_counts(conn, t, "m", "v1", T0, T0 + timedelta(minutes=1)) == Requests(2, 1, 0, 0)
        assert latency_quantile(conn, t, "m", "v1", T0, T0 + timedelta(minutes=1), 0.5) == 15.0


@pytest.mark.parametrize("sampled", [True, False])
def test_a_high_cardinality_segment_is_capped_into_one_other_segment(any_engine: sa.Engine, sampled: bool) -> None:
    """2,000 distinct values, cap 20: the 20 most frequent are kept (value v0 is the most frequent),
    the rest summed as "(other)"; nothing is lost, and the result does not grow with the values.
    ``sampled=False``: the sample misses most values, so the fold happens after the scan."""
    df = _frame(n=6000, seed=11)
    rng = np.random.default_rng(3)
    df["region"] = [f"r{i}" for i in rng.integers(0, 2000, len(df))]
    df.loc[df.index[:600], "region"] = "v0"  # the most frequent value by far
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS, extra=["region"])
    start, end, asof = T0 - timedelta(hours=1), T0 + timedelta(seconds=600), T0 + timedelta(hours=1)
    with any_engine.connect() as conn:
        rows = _records(
            conn,
            t,
            "m",
            ["v1", "v2"],
            start,
            end,
            asof,
            ["region"],
            [0.5],
            slices=1,
            sample_rows=50_000 if sampled else 5,
            max_values=20,
        )
    values = {r["value"] for r in rows if r["column"] == "region"}
    assert len(values) <= 21 and OTHER in values and "v0" in values
    labelled = df[df.label.notna()]
    for version in ("v1", "v2"):
        mine = [r for r in rows if r["version"] == version]
        overall = sum(r["n"] for r in mine if r["column"] == OVERALL)
        assert overall == (labelled.model_version == version).sum()
        assert sum(r["n"] for r in mine if r["column"] == "region") == overall  # every row in one segment
        v0 = sum(r["n"] for r in mine if r["value"] == "v0")
        assert v0 == ((labelled.model_version == version) & (labelled.region == "v0")).sum()
