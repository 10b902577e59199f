"""Aggregate queries against brute force on small data, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mlcanary.warehouse.queries import OVERALL, labelled_sums, latency_quantile, mapped_table, request_counts
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


@pytest.fixture(params=["sqlite", "postgres"])
def any_engine(request: pytest.FixtureRequest) -> sa.Engine:
    return request.getfixturevalue("engine" if request.param == "sqlite" else "pg_engine")


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
        n, ok = request_counts(conn, t, "m", "v2", start, end)
        assert (n, ok) == (len(sel), int(sel.success.sum()))
        for q in (0.5, 0.9, 0.99):
            got = latency_quantile(conn, t, "m", "v2", start, end, q)
            assert got == pytest.approx(np.percentile(sel.latency_ms, 100 * q, method="linear"), rel=1e-9)
        assert latency_quantile(conn, t, "m", "v9", start, end, 0.99) is None
        assert request_counts(conn, t, "m", "v9", start, end) == (0, 0)


def test_labelled_sums_match_a_pandas_groupby(any_engine: sa.Engine) -> None:
    df = _frame(seed=5)
    _load(any_engine, df)
    t = mapped_table("predictions", None, COLUMNS, extra=["user_cohort"])
    start, end, asof = T0, T0 + timedelta(seconds=400), T0 + timedelta(seconds=420)
    label, score = t.col("label"), t.col("score")
    values = {"label": sa.cast(label, sa.Float), "abs_error": sa.func.abs(score - label)}
    with any_engine.connect() as conn:
        got = labelled_sums(conn, t, "m", ["v1", "v2"], start, end, asof, ["user_cohort"], values)
    sel = df[(df.ts >= start) & (df.ts < end) & df.label.notna() & (df.label_ts <= asof)].copy()
    sel["abs_error"] = (sel.score - sel.label).abs()
    expected = {}
    for version, g in sel.groupby("model_version"):
        expected[(version, OVERALL, OVERALL)] = g
        for cohort, gg in g.dropna(subset=["user_cohort"]).groupby("user_cohort"):
            expected[(version, "user_cohort", cohort)] = gg
    assert {(s.version, s.column, s.value) for s in got} == set(expected)
    for s in got:
        g = expected[(s.version, s.column, s.value)]
        assert s.n == len(g)
        assert s.sums["label"] == pytest.approx((g.label.sum(), (g.label**2).sum()))
        assert s.sums["abs_error"] == pytest.approx((g.abs_error.sum(), (g.abs_error**2).sum()))


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
        assert request_counts(conn, t, "m", "v1", T0, T0 + timedelta(minutes=1)) == (2, 1)
        assert latency_quantile(conn, t, "m", "v1", T0, T0 + timedelta(minutes=1), 0.5) == 15.0
