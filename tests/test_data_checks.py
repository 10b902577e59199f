"""Broken data is INVALID with the column, the rule and the count, never a PASS and never a crash:
on SQLite, PostgreSQL (which keeps NaN) and DuckDB (which keeps NaN too)."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.sources.warehouse import WarehouseMetrics
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.schema import predictions, resource_metrics


@pytest.fixture(params=["sqlite", "postgres", "duckdb"])
def any_engine(request: pytest.FixtureRequest) -> sa.Engine:
    return request.getfixturevalue(
        {"sqlite": "engine", "postgres": "pg_engine", "duckdb": "duckdb_engine"}[request.param]
    )


def _spec(*metrics: dict) -> RolloutSpec:
    data = base_spec()
    data["analysis"] |= {"segments": [], "metrics": list(metrics) or [{"name": "ctr", "tolerance": 0.1}]}
    return parse_spec(data)


def _corrupt(
    engine: sa.Engine, table: sa.Table, version: str, limit: int, before: object = None, **values: object
) -> int:
    """Set ``values`` on the version's ``limit`` most recent rows (before ``before``): how many changed."""
    with engine.begin() as conn:
        ids = sa.select(table.c.id if "id" in table.c else table.c.request_id).where(table.c.model_version == version)
        if before is not None:
            ids = ids.where(table.c.ts < before)
        if table is predictions:
            ids = ids.where(table.c.label.is_not(None))
        ids = ids.order_by(table.c.ts.desc()).limit(limit)
        key = table.c.id if "id" in table.c else table.c.request_id
        return conn.execute(sa.update(table).where(key.in_(ids.scalar_subquery())).values(**values)).rowcount


def _poll(engine: sa.Engine, spec: RolloutSpec, at: object) -> tuple[Verdict, list[str]]:
    result = evaluate_guardrails(WarehouseMetrics(engine, spec), spec, "v2", at, "v1")
    return result.verdict, [c.reason for c in result.checks]


def test_status_codes_in_success_are_invalid_not_a_pass(any_engine: sa.Engine, write_batch: Writer) -> None:
    """The review's case: HTTP codes mapped as ``success`` read as "success_rate 32178 %" and passed."""
    spec = _spec()
    end = write_batch(any_engine, minutes=1, rate=100, faults=("v2:error_rate=0.4",))
    at = end + timedelta(seconds=1)
    with any_engine.begin() as conn:
        p = predictions.c
        conn.execute(sa.update(predictions).where(p.model_version == "v2", p.success == 1).values(success=200))
        conn.execute(sa.update(predictions).where(p.model_version == "v2", p.success == 0).values(success=500))
        n = conn.execute(
            sa.select(sa.func.count()).where(p.model_version == "v2", p.ts >= at - spec.guardrails.window, p.ts < at)
        ).scalar_one()
    verdict, reasons = _poll(any_engine, spec, at)
    assert verdict is Verdict.INVALID
    assert reasons == [
        f"data check: predictions.success of v2: {n:,} of {n:,} rows neither 0 nor 1 "
        "(a status code or an enum mapped as success?)"
    ]


@pytest.mark.parametrize("bad", [-5.0, math.inf, math.nan])
def test_negative_nan_or_infinite_latency_is_invalid(any_engine: sa.Engine, write_batch: Writer, bad: float) -> None:
    spec = _spec()
    end = write_batch(any_engine, minutes=1, rate=100)
    changed = _corrupt(any_engine, predictions, "v1", limit=3, latency_ms=bad)
    verdict, reasons = _poll(any_engine, spec, end + timedelta(seconds=1))
    if math.isnan(bad) and any_engine.dialect.name == "sqlite":  # SQLite stores NaN as NULL: no latency
        assert verdict is not Verdict.INVALID and changed == 3
        return
    assert verdict is Verdict.INVALID
    assert len(reasons) == 1 and reasons[0].startswith("data check: predictions.latency_ms of v1: 3 of ")
    assert reasons[0].endswith("rows negative, NaN or infinite")


def test_cpu_as_a_percentage_is_invalid(any_engine: sa.Engine, write_batch: Writer) -> None:
    spec = _spec()
    end = write_batch(any_engine, minutes=1, rate=100)
    with any_engine.begin() as conn:
        r = resource_metrics.c
        conn.execute(sa.update(resource_metrics).where(r.model_version == "v2").values(cpu_util=r.cpu_util * 100))
    verdict, reasons = _poll(any_engine, spec, end + timedelta(seconds=1))
    assert verdict is Verdict.INVALID
    assert len(reasons) == 1 and reasons[0].startswith("data check: resource_metrics.cpu_util of v2: ")
    assert reasons[0].endswith("rows outside 0-1, NaN or infinite (a percentage, not a fraction?)")


def _look(engine: sa.Engine, spec: RolloutSpec, end: object) -> tuple[Verdict, list[str]]:
    window = AnalysisWindow.ending_at(spec, end)
    with engine.connect() as conn:
        result = analyze(conn, spec, "v1", "v2", window)
    return result.verdict, [c.reason for c in result.checks if c.check == "data"]


def test_labels_coded_0_2_are_invalid_not_a_certain_verdict(any_engine: sa.Engine, write_batch: Writer) -> None:
    """0/2 labels gave a zero-width interval and a certain verdict at n=400."""
    spec = _spec({"name": "ctr", "tolerance": 0.1}, {"name": "auc", "kind": "auc", "tolerance": 0.05})
    end = write_batch(any_engine, minutes=3, rate=40)
    with any_engine.begin() as conn:
        p = predictions.c
        bad = conn.execute(sa.update(predictions).where(p.model_version == "v2", p.label == 1).values(label=2)).rowcount
    verdict, reasons = _look(any_engine, spec, end)
    assert verdict is Verdict.INVALID and len(reasons) == 1
    assert reasons[0].startswith("data check: predictions.label of v2 (canary): ")
    assert reasons[0].endswith("labelled rows neither 0 nor 1 (auc, rate need 0/1 labels)")
    assert int(reasons[0].split(": ")[2].split(" of ")[0].replace(",", "")) <= bad


def test_a_mean_of_a_continuous_label_is_not_a_broken_label(any_engine: sa.Engine, write_batch: Writer) -> None:
    spec = _spec({"name": "mae", "kind": "mean", "value": "abs_error", "higher_is_better": False, "tolerance": 0.5})
    end = write_batch(any_engine, minutes=3, rate=40)
    with any_engine.begin() as conn:
        conn.execute(sa.update(predictions).where(predictions.c.label == 1).values(label=7.5))
    verdict, reasons = _look(any_engine, spec, end)
    assert reasons == [] and verdict is not Verdict.INVALID


@pytest.mark.parametrize(
    ("column", "bad"), [("label", math.nan), ("label", math.inf), ("score", math.nan), ("score", -math.inf)]
)
def test_one_nan_or_infinite_value_is_invalid_not_a_crash(
    any_engine: sa.Engine, write_batch: Writer, column: str, bad: float
) -> None:
    """One NaN label among thousands crashed every look on DuckDB and PostgreSQL."""
    spec = _spec(
        {"name": "ctr", "tolerance": 0.1},
        {"name": "auc", "kind": "auc", "tolerance": 0.05},
        {"name": "ece", "kind": "ece", "tolerance": 0.05},
    )
    end = write_batch(any_engine, minutes=3, rate=40)
    assert _corrupt(any_engine, predictions, "v1", limit=1, before=end - timedelta(minutes=1), **{column: bad}) == 1
    verdict, reasons = _look(any_engine, spec, end)
    if math.isnan(bad) and any_engine.dialect.name == "sqlite":  # stored as NULL: an unlabelled (or unscored) row
        assert reasons == [] and verdict is not Verdict.INVALID
        return
    assert verdict is Verdict.INVALID
    assert reasons == [f"data check: predictions.{column} of v1 (baseline): 1 of " + reasons[0].split(" of ")[2]]
    assert reasons[0].endswith("labelled rows NaN or infinite")
