"""The same data in SQLite, PostgreSQL and DuckDB gives the same verdicts and values.

Runs against the PostgreSQL server of this machine (skipped with a message where there is none,
never under CI=true).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.sources import WarehouseMetrics
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import utcnow

pytestmark = pytest.mark.postgres

SCENARIOS = {
    "healthy": (),
    "ctr_drop": ("v2:ctr_drop=0.3",),
    "segment_drop": ("v2:ctr_drop=0.5;segment=user_cohort:new",),
    "latency": ("v2:latency_ms=300",),
}


@pytest.mark.parametrize("other", ["pg_engine", "duckdb_engine"])
@pytest.mark.parametrize("faults", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_sqlite_postgres_and_duckdb_agree(
    engine: sa.Engine, request: pytest.FixtureRequest, write_batch: Writer, faults: tuple[str, ...], other: str
) -> None:
    other_engine: sa.Engine = request.getfixturevalue(other)
    metrics = [
        {"name": "ctr", "tolerance": 0.1},
        {"name": "auc", "kind": "auc", "tolerance": 0.02},
        {"name": "recall", "kind": "recall", "threshold": 0.3, "tolerance": 0.1},
        {"name": "calibration", "kind": "calibration", "tolerance": 0.05},
        {"name": "ece", "kind": "ece", "tolerance": 0.05},
        {"name": "mae", "kind": "mean", "value": "abs_error", "higher_is_better": False, "tolerance": 0.1},
    ]
    spec = parse_spec(
        base_spec(
            guardrails={**base_spec()["guardrails"], "window": "1m", "baseline": {"p99_latency_ratio_max": 1.2}},
            analysis={
                **base_spec()["analysis"],
                "min_samples": 200,
                "segments": ["user_cohort", "device"],
                "metrics": metrics,
                "edge_sample": 1_000_000,
                "drift": {"features": ["f1", "f2"]},
            },
        )
    )
    end = utcnow().replace(microsecond=0)
    for eng in (engine, other_engine):
        write_batch(eng, minutes=15, rate=30, canary_percent=30, faults=faults, seed=21, end=end)
    window = AnalysisWindow.ending_at(spec, end)
    results = {}
    for name, eng in (("sqlite", engine), ("other", other_engine)):
        with eng.connect() as conn:
            analysis = analyze(conn, spec, "v1", "v2", window)
        results[name] = (analysis, evaluate_guardrails(WarehouseMetrics(eng, spec), spec, "v2", end, "v1"))
    (a_lite, g_lite), (a_pg, g_pg) = results["sqlite"], results["other"]
    assert a_lite.verdict == a_pg.verdict and g_lite.verdict == g_pg.verdict
    assert len(a_lite.checks) == len(a_pg.checks) > 1
    for x, y in zip(a_lite.checks, a_pg.checks, strict=True):
        assert (x.segment, x.verdict, x.canary_n, x.baseline_n) == (y.segment, y.verdict, y.canary_n, y.baseline_n)
        for field in ("canary_value", "baseline_value", "ci_low", "ci_high"):
            a, b = getattr(x, field), getattr(y, field)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (x.check, field)
    for x, y in zip(g_lite.checks, g_pg.checks, strict=True):
        assert (x.check, x.verdict, x.canary_n) == (y.check, y.verdict, y.canary_n)
        assert x.canary_value == pytest.approx(y.canary_value, rel=1e-9)
    if faults:
        assert "FAIL" in {a_lite.verdict.value, g_lite.verdict.value}


def test_router_and_state_tables_on_postgres(pg_engine: sa.Engine) -> None:
    router = WarehouseRouter(pg_engine)
    router.set_split(Split("m", "v1", "v2", 25.0), "r")
    router.set_split(Split("m", "v1", "v2", 25.0), "r")
    assert router.get_split("m") == Split("m", "v1", "v2", 25.0)
