"""The pre-flight check of the warehouse (``mlcanary check``, and ``validate_and_lock`` before any
traffic moves), against SQLite, PostgreSQL and DuckDB."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from conftest import Writer, base_spec
from mlcanary.cli import main
from mlcanary.preflight import check_warehouse
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.warehouse.engine import make_engine, utcnow


@pytest.fixture(params=["sqlite", "postgres", "duckdb"])
def any_engine(request: pytest.FixtureRequest) -> sa.Engine:
    return request.getfixturevalue(
        {"sqlite": "engine", "postgres": "pg_engine", "duckdb": "duckdb_engine"}[request.param]
    )


def _spec(**warehouse: object) -> RolloutSpec:
    data = base_spec()
    if warehouse:
        data["warehouse"] = warehouse
    return parse_spec(data)


def _messages(engine: sa.Engine, spec: RolloutSpec, baseline: str | None = "v1") -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [(f.level, f.check, f.message) for f in check_warehouse(conn, spec, baseline).findings]


def test_a_warehouse_with_the_contract_passes(any_engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(any_engine, minutes=2, rate=20)
    assert _messages(any_engine, _spec()) == []


def test_a_missing_table_or_column_is_named_with_the_fix(any_engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(any_engine, minutes=2, rate=20)
    missing = _messages(any_engine, _spec(predictions={"table": "predictionz"}))
    assert [(lv, c) for lv, c, _ in missing] == [("error", "tables")]
    assert missing[0][2].startswith("table predictionz not found")
    renamed = _messages(any_engine, _spec(predictions={"columns": {"label": "outcome", "score": "p"}}))
    assert [(lv, c) for lv, c, _ in renamed] == [("error", "columns"), ("error", "columns")]
    assert renamed[0][2].startswith("column predictions.p not found (the table has ")
    assert renamed[1][2].startswith("column predictions.outcome not found")
    assert "fix the spec's column mapping" in renamed[1][2]


def test_unusable_types_are_refused(any_engine: sa.Engine) -> None:
    """A boolean ``success`` cannot be summed; a text score is no number; epoch seconds are no time."""
    meta = sa.MetaData()
    sa.Table(
        "odd_predictions",
        meta,
        sa.Column("ts", sa.Double),
        sa.Column("model", sa.String(64)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("score", sa.String(20)),
        sa.Column("label", sa.Double),
        sa.Column("label_ts", sa.DateTime),
        sa.Column("latency_ms", sa.Double),
        sa.Column("success", sa.Boolean),
    )
    meta.create_all(any_engine)
    found = _messages(any_engine, _spec(predictions={"table": "odd_predictions"}), baseline=None)
    text = "\n".join(m for _, _, m in found)
    assert "odd_predictions.ts is DOUBLE" in text and "(epoch numbers?)" in text
    assert "odd_predictions.score is" in text and "not a number" in text
    if any_engine.dialect.name != "sqlite":  # SQLite stores a boolean as a 0/1 integer: it sums
        assert "odd_predictions.success is BOOLEAN: sums need a 0/1 number" in text
    errors = [c for level, c, _ in found if level == "error"]
    assert errors == ["columns"] * (3 if any_engine.dialect.name == "sqlite" else 4)  # ts, score, user_cohort
    warnings = [c for level, c, _ in found if level == "warning"]
    assert warnings == ([] if any_engine.dialect.name == "duckdb" else ["index"])  # no index: DuckDB scans anyway


def test_sqlite_text_timestamps_in_another_iso_form_are_refused_with_the_fix(
    engine: sa.Engine, write_batch: Writer
) -> None:
    """``2026-12-01T10:00:00Z`` sorts after every ``2026-12-01 ...`` bound: rows silently outside every window."""
    write_batch(engine, minutes=2, rate=20)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE predictions SET ts = replace(ts, ' ', 'T') || 'Z'")
    found = _messages(engine, _spec())
    assert found[0][:2] == ("error", "timestamps")
    assert found[0][2].startswith("predictions.ts holds '20") and "T" in found[0][2].split("'")[1]
    assert "Fix: UPDATE predictions SET ts = strftime('%Y-%m-%d %H:%M:%f', ts)" in found[0][2]
    with engine.begin() as conn:  # the fix it names works
        conn.exec_driver_sql("UPDATE predictions SET ts = strftime('%Y-%m-%d %H:%M:%f', ts)")
    assert _messages(engine, _spec()) == []


def test_local_time_is_refused(any_engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(any_engine, minutes=2, rate=20, end=utcnow() + timedelta(hours=3))  # UTC+3 written as if UTC
    found = _messages(any_engine, _spec(), baseline=None)
    assert [(lv, c) for lv, c, _ in found] == [("error", "timestamps")] * 2
    assert found[0][2].startswith("the newest predictions.ts of unit-ranker is 3.0 h in the future: local time")
    assert found[1][2].startswith("the newest resource_metrics.ts of unit-ranker is 3.0 h in the future")


def test_a_missing_index_is_a_warning_with_its_cost(engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(engine, minutes=2, rate=20)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_predictions_model_version_ts")
    assert _messages(engine, _spec()) == [
        (
            "warning",
            "index",
            "no index on predictions(model, model_version, ts): every guardrail poll and analysis look scans the "
            "whole table instead of its window; CREATE INDEX ix_predictions_model_version_ts ON predictions "
            "(model, model_version, ts)",
        )
    ]


def test_a_baseline_without_recent_rows_is_refused(any_engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(any_engine, minutes=2, rate=20, end=utcnow() - timedelta(hours=2))
    found = _messages(any_engine, _spec())
    assert [(lv, c) for lv, c, _ in found] == [("error", "baseline_rows")]
    assert found[0][2].startswith("no rows of unit-ranker v1 (the baseline) in predictions since ")
    assert "its newest row is from " in found[0][2]
    assert [c for _, c, _ in _messages(any_engine, _spec(), baseline="v7")] == ["baseline_rows"]


def test_postgres_timestamptz_reads_right_in_a_utc_session_and_is_refused_in_another(pg_engine: sa.Engine) -> None:
    """Naive UTC bounds against a ``timestamptz`` column are read in the session's zone: mlcanary's
    engines set UTC; a URL (or a pooler) that sets another zone is refused, naming the column."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE predictions ALTER COLUMN ts TYPE timestamptz USING ts AT TIME ZONE 'UTC'")
        conn.exec_driver_sql(
            "INSERT INTO predictions (request_id, ts, model, model_version, score, latency_ms, success) "
            "VALUES ('r1', now() - interval '1 minute', 'unit-ranker', 'v1', 0.5, 10, 1)"
        )
    window = (utcnow() - timedelta(minutes=2), utcnow())
    query = sa.text("SELECT count(*) FROM predictions WHERE ts >= :a AND ts < :b")
    with pg_engine.connect() as conn:
        assert conn.execute(query, {"a": window[0], "b": window[1]}).scalar() == 1  # UTC session: read right
    assert _messages(pg_engine, _spec()) == []
    url = pg_engine.url.render_as_string(hide_password=False)
    paris = make_engine(url.replace("options=-csearch_path", "options=-cTimeZone%3DAsia/Tokyo%20-csearch_path"))
    with paris.connect() as conn:
        assert conn.execute(query, {"a": window[0], "b": window[1]}).scalar() == 0  # the bug it guards against
    found = _messages(paris, _spec())
    assert found[0][:2] == ("error", "timestamps")
    assert found[0][2].startswith("predictions.ts is TIMESTAMP WITH TIME ZONE and the session time zone is Asia/Tokyo")
    paris.dispose()


def test_the_check_command(
    tmp_path: Path, engine: sa.Engine, write_batch: Writer, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base_spec()))
    url = engine.url.render_as_string()
    assert main(["check", "--spec", str(spec), "--warehouse", url, "--baseline-version", "v1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("pre-flight check of the warehouse:\n- error: no rows of unit-ranker v1 (the baseline)")
    write_batch(engine, minutes=2, rate=20)
    assert main(["check", "--spec", str(spec), "--warehouse", url, "--baseline-version", "v1", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body == {"ok": True, "baseline_version": "v1", "findings": []}
