"""Post-hoc analysis: the spec's section, which versions served in a window (from the traffic history
as the rollouts write it), the analysis of exactly that window, the results' upsert, and the DAG."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pendulum
import pytest
import sqlalchemy as sa
import yaml

from conftest import ROOT, base_spec
from mlcanary import posthoc
from mlcanary import rollout as steps
from mlcanary.posthoc import Served, analyse_window, served_in
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import SimConfig, simulate_batch
from mlcanary.spec import RolloutSpec, SpecError, load_spec, parse_spec
from mlcanary.warehouse.engine import naive_utc, utcnow
from mlcanary.warehouse.schema import posthoc_results, predictions, rollouts, traffic_history

MODEL = "unit-ranker"
DAY = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
ANALYSIS = {**base_spec()["analysis"], "label_delay": "5m", "min_samples": 50, "allow_short_bakes": True}


def _spec(**overrides: Any) -> RolloutSpec:
    data = base_spec(analysis=ANALYSIS, posthoc={"since": DAY.date().isoformat()})
    data.update(overrides)
    return parse_spec(data)


def at(hour: float) -> datetime:
    return DAY + timedelta(hours=hour)


def _history(
    engine: sa.Engine,
    when: datetime,
    baseline: str,
    canary: str | None,
    percent: float | None,
    *,
    applied: bool = True,
    rollout_id: str | None = None,
    model: str = MODEL,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(traffic_history).values(
                model=model,
                rollout_id=rollout_id,
                baseline_version=baseline,
                canary_version=canary,
                to_percent=percent,
                applied=applied,
                note="test",
                applied_at=when,
            )
        )


def _simulate(
    engine: sa.Engine, start: datetime, end: datetime, split: Split, rate: float = 1.0, seed: int = 1
) -> None:
    config = SimConfig(model=MODEL, seed=seed, label_delay=timedelta(minutes=10), scrape_interval=3600)
    simulate_batch(engine, config, start, end, rate, split, labels_asof=end + timedelta(days=1))


def _rows(engine: sa.Engine, name: str = "unit_ranker") -> list[sa.Row]:
    with engine.connect() as conn:
        return posthoc.results(conn, name)


# --- the spec's section --------------------------------------------------------------------------


def test_posthoc_section_defaults_and_times_in_utc() -> None:
    assert parse_spec(base_spec()).posthoc is None
    spec = parse_spec(base_spec(posthoc={"since": "2026-11-01"}))
    assert spec.posthoc is not None
    assert spec.posthoc.schedule == "0 * * * *"
    assert spec.posthoc.since == datetime(2026, 11, 1, tzinfo=UTC)
    assert spec.posthoc_dag_id == "posthoc__unit_ranker"
    naive = parse_spec(base_spec(posthoc={"since": "2026-11-01T06:30:00", "schedule": "@daily"})).posthoc
    assert naive is not None and naive.since == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    assert naive.schedule == "0 0 * * *"  # the preset as Airflow resolves it
    aware = parse_spec(base_spec(posthoc={"since": "2026-11-01T02:00:00+02:00"})).posthoc
    assert aware is not None and aware.since == datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    assert aware.since.tzinfo is UTC
    again = parse_spec(spec.model_dump(mode="json", by_alias=True))  # what the DAG's operators get back
    assert again == spec


def test_posthoc_section_from_yaml_with_an_unquoted_date(tmp_path: Path) -> None:
    data = base_spec()
    path = tmp_path / "unit_ranker.yaml"
    path.write_text(yaml.safe_dump(data) + "posthoc:\n  schedule: '*/30 * * * *'\n  since: 2026-11-01\n")
    spec = load_spec(path)
    assert spec.posthoc is not None and spec.posthoc.since == datetime(2026, 11, 1, tzinfo=UTC)
    assert spec.posthoc.schedule == "*/30 * * * *"


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"schedule": "0 * * *", "since": "2026-11-01"}, "posthoc.schedule", "not a cron expression of 5 fields"),
        ({"schedule": "61 * * * *", "since": "2026-11-01"}, "posthoc.schedule", "not a cron expression"),
        ({"schedule": "0 * * * * *", "since": "2026-11-01"}, "posthoc.schedule", "5 fields"),
        ({"schedule": "@once", "since": "2026-11-01"}, "posthoc.schedule", "@hourly"),
        ({"schedule": 5, "since": "2026-11-01"}, "posthoc.schedule", "valid string"),
        ({"since": "soon"}, "posthoc.since", "valid datetime"),
        ({}, "posthoc.since", "Field required"),
        ({"since": "2026-11-01", "window": "1h"}, "posthoc.window", "Extra inputs are not permitted"),
    ],
)
def test_broken_posthoc_section_names_the_field(section: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(base_spec(posthoc=section), "specs/unit_ranker.yaml")
    text = str(caught.value)
    assert f"specs/unit_ranker.yaml: {field}: " in text
    assert message in text


# --- which versions served -----------------------------------------------------------------------


def test_a_window_before_any_canary_and_before_any_history(engine: sa.Engine) -> None:
    _history(engine, at(5), "v1", "v2", 0.0, applied=False)  # a rollout's start: the router reports v1 alone
    _history(engine, at(8), "v1", "v2", 10.0)
    with engine.connect() as conn:
        assert served_in(conn, MODEL, at(3), at(4)) == []  # nothing recorded yet
        (only,) = served_in(conn, MODEL, at(6), at(7))
        assert served_in(conn, "other-model", at(6), at(7)) == []
    assert only == Served("v1", "v2", 0.0) and not only.compared and only.alone == "v1"


def test_a_canary_starting_mid_window_and_rows_on_the_bounds(engine: sa.Engine) -> None:
    _history(engine, at(5), "v1", "v2", 0.0, applied=False)
    _history(engine, at(7.5), "v1", "v2", 10.0)
    _history(engine, at(9), "v1", "v2", 30.0)  # exactly at a window's end: not in it; at its start: in force
    with engine.connect() as conn:
        assert served_in(conn, MODEL, at(7), at(8)) == [Served("v1", "v2", 0.0), Served("v1", "v2", 10.0)]
        assert served_in(conn, MODEL, at(8), at(9)) == [Served("v1", "v2", 10.0)]
        assert served_in(conn, MODEL, at(9), at(10)) == [Served("v1", "v2", 30.0)]


def test_a_canary_rolled_back_before_the_window(engine: sa.Engine) -> None:
    _history(engine, at(5), "v1", "v2", 10.0)
    _history(engine, at(6), "v1", "v2", 0.0)  # the rollback ...
    _history(engine, at(6), "v1", "v2", 0.0, applied=False)  # ... and the final split read back
    _history(engine, at(6.5), "v1", "v2", None, applied=False)  # unknown: the platform could not be read
    with engine.connect() as conn:
        assert served_in(conn, MODEL, at(7), at(8)) == [Served("v1", "v2", 0.0)]
        assert served_in(conn, MODEL, at(5.5), at(6.5)) == [Served("v1", "v2", 10.0), Served("v1", "v2", 0.0)]


def test_a_split_superseded_at_the_same_moment_never_served(engine: sa.Engine) -> None:
    _history(engine, at(1), "v1", None, 0.0)
    _history(engine, at(2.5), "v1", "v2", 100.0)  # promotion: canary to 100 % ...
    _history(engine, at(2.5), "v1", "v2", 0.0)  # ... replaced in the same instant
    with engine.connect() as conn:
        assert served_in(conn, MODEL, at(2), at(3)) == [Served("v1", None, 0.0), Served("v1", "v2", 0.0)]


def test_two_canaries_in_one_window_are_both_analysed(engine: sa.Engine) -> None:
    _history(engine, at(13), "v1", None, 0.0)
    _history(engine, at(14.1), "v1", "v2", 10.0)
    _history(engine, at(14.3), "v1", "v2", 0.0)
    _history(engine, at(14.5), "v1", "v3", 0.0, applied=False)
    _history(engine, at(14.6), "v1", "v3", 20.0)
    with engine.connect() as conn:
        found = served_in(conn, MODEL, at(14), at(15))
    assert [(s.baseline_version, s.canary_version) for s in found if s.compared] == [("v1", "v2"), ("v1", "v3")]
    _simulate(engine, at(14), at(15), Split(MODEL, "v1", "v2", 20.0), rate=0.5)
    results = analyse_window(engine, _spec(), at(14), at(15))
    assert [(r.baseline_version, r.canary_version, r.status) for r in results] == [
        ("v1", "v2", "analysed"),
        ("v1", "v3", "analysed"),
    ]
    assert {(r.baseline_version, r.canary_version) for r in _rows(engine)} == {("v1", "v2"), ("v1", "v3")}
    v3 = next(r for r in results if r.canary_version == "v3")
    assert v3.canary_n == 0 and v3.verdict == "INCONCLUSIVE"  # it served no simulated rows


def _rollout(engine: sa.Engine, spec: RolloutSpec, rollout_id: str, canary: str, dry_run: bool) -> None:
    """A real rollout through the core's steps: start, stage 1, rollback, finish."""
    router = WarehouseRouter(engine)
    steps.begin_rollout(engine, router, spec, rollout_id, canary, dry_run=dry_run)
    ref = steps.RolloutRef(rollout_id, spec.model, "v1", canary, dry_run)
    steps.shift_to_stage(engine, router, spec, ref, 1)
    steps.rollback(engine, router, ref, "test")
    steps.finish(engine, router, ref)


def test_a_dry_run_rollout_is_not_a_canary_serving(engine: sa.Engine) -> None:
    spec = _spec()
    WarehouseRouter(engine).set_split(Split(MODEL, "v1", None, 0.0), None)
    before = utcnow()
    _rollout(engine, spec, "rollout__unit_ranker/dry", "v2", dry_run=True)
    after = utcnow() + timedelta(seconds=1)
    with engine.connect() as conn:
        dry_rows = conn.execute(
            sa.select(traffic_history.c.to_percent).where(traffic_history.c.rollout_id.like("%dry"))
        )
        assert 10.0 in {r.to_percent for r in dry_rows}  # the dry run recorded its step as if at 10 %
        assert served_in(conn, MODEL, before, after) == []
    _rollout(engine, spec, "rollout__unit_ranker/real", "v3", dry_run=False)
    later = utcnow() + timedelta(seconds=1)
    with engine.connect() as conn:
        found = served_in(conn, MODEL, before, later)
        assert conn.execute(sa.select(rollouts.c.dry_run).order_by(rollouts.c.started_at)).scalars().all() == [
            True,
            False,
        ]
    assert [s for s in found if s.compared] == [Served("v1", "v3", 10.0)]
    assert all(s.canary_version != "v2" for s in found)


def test_a_promotion_leaves_the_canary_serving_alone(engine: sa.Engine) -> None:
    spec = _spec()
    router = WarehouseRouter(engine)
    router.set_split(Split(MODEL, "v1", None, 0.0), None)
    before = utcnow()
    steps.begin_rollout(engine, router, spec, "rollout__unit_ranker/p", "v2")
    ref = steps.RolloutRef("rollout__unit_ranker/p", MODEL, "v1", "v2", False)
    steps.shift_to_stage(engine, router, spec, ref, 1)
    steps.promote(engine, router, ref, "passed")
    steps.finish(engine, router, ref)
    promoted = utcnow()
    with engine.connect() as conn:
        during = served_in(conn, MODEL, before, promoted)
        after = served_in(conn, MODEL, promoted, promoted + timedelta(hours=1))
    assert Served("v1", "v2", 10.0) in during
    assert [s.alone for s in after] == ["v2"] and not any(s.compared for s in after)


# --- the analysis of a window, stored --------------------------------------------------------------


def test_the_analysis_counts_exactly_the_window(engine: sa.Engine) -> None:
    _history(engine, at(0), "v1", "v2", 20.0)
    _simulate(engine, at(0), at(3), Split(MODEL, "v1", "v2", 20.0))
    start, end = at(1), at(2)
    # rows exactly on the bounds: the one at the end belongs to the next window, the one before the start to the last
    edge = dict(model=MODEL, score=0.5, label=1.0, latency_ms=50.0, success=1)
    with engine.begin() as conn:
        for i, ts in enumerate([end, start - timedelta(microseconds=1), start]):
            for version in ("v1", "v2"):
                conn.execute(
                    sa.insert(predictions).values(
                        request_id=f"edge-{i}-{version}", ts=ts, label_ts=ts, model_version=version, **edge
                    )
                )
    spec = _spec()
    results = analyse_window(engine, spec, start.replace(tzinfo=UTC), end.replace(tzinfo=UTC), run_id="r1")
    assert len(results) == 1
    result = results[0]
    asof = end + spec.analysis.label_delay
    p = predictions.c

    def count(version: str, *extra: Any) -> int:
        where = [p.model == MODEL, p.model_version == version, p.label.is_not(None), *extra]
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one())

    window = [p.ts >= start, p.ts < end]
    assert result.baseline_n == count("v1", *window, p.label_ts <= asof)
    assert result.canary_n == count("v2", *window, p.label_ts <= asof)
    assert result.canary_n < count("v2", *window)  # labels that came after label_asof are not counted
    assert result.baseline_n < count("v1", p.ts >= start - timedelta(minutes=1), p.ts <= end, p.label_ts <= asof)
    assert result.window_start == start and result.window_end == end and result.label_asof == asof
    (row,) = _rows(engine)
    assert (row.window_start, row.window_end, row.baseline_version, row.canary_version) == (start, end, "v1", "v2")
    assert row.status == "analysed" and row.verdict == result.verdict and row.run_id == "r1"
    assert row.versions_from == "history" and row.spec_hash == posthoc.spec_hash(spec)
    checks = json.loads(row.checks)
    assert checks["window_start"] == start.isoformat() and checks["checks"][0]["segment"] == "*"
    assert (row.baseline_n, row.canary_n) == (result.baseline_n, result.canary_n)
    assert result.line().startswith(f"{start:%Y-%m-%d} 01:00-02:00 UTC v1 vs v2: {result.verdict} (labelled rows:")


def test_an_airflow_data_interval_is_stored_as_plain_utc(engine: sa.Engine) -> None:
    """Airflow gives pendulum DateTimes, a datetime subclass the sqlite3 driver does not bind (unless
    Airflow's own SQLite metadata set-up registered an adapter in the process: a worker on PostgreSQL has none)."""
    start = pendulum.instance(at(3), tz="UTC").in_timezone("Europe/Berlin")
    assert type(naive_utc(start)) is datetime and naive_utc(start) == at(3)
    _history(engine, at(0), "v1", "v2", 20.0)
    (result,) = analyse_window(engine, _spec(), start, start.add(hours=1))
    assert type(result.window_start) is datetime and type(result.window_end) is datetime
    assert (result.window_start, result.window_end) == (at(3), at(4))
    (row,) = _rows(engine)
    assert (row.window_start, row.window_end) == (at(3), at(4))


def test_a_window_without_a_canary_is_recorded_as_such(engine: sa.Engine) -> None:
    spec = _spec()
    (unknown,) = analyse_window(engine, spec, at(0), at(1))
    assert unknown.status == "no_history" and unknown.baseline_version == "" and unknown.canary_version is None
    assert "no version is known to have served" in unknown.reason
    _history(engine, at(1.5), "v1", "v2", 0.0, applied=False)
    (alone,) = analyse_window(engine, spec, at(2), at(3), run_id="r")
    assert (alone.status, alone.baseline_version, alone.verdict) == ("no_canary", "v1", None)
    assert alone.reason == "no canary served in this window: v1 served alone, nothing to compare"
    assert alone.line() == f"{at(2):%Y-%m-%d} 02:00-03:00 UTC v1 alone: no_canary: {alone.reason}"
    rows = {(r.window_start, r.baseline_version, r.canary_version, r.status) for r in _rows(engine)}
    assert rows == {(at(0), "", "", "no_history"), (at(2), "v1", "", "no_canary")}


def test_running_a_window_again_replaces_its_row(engine: sa.Engine) -> None:
    _history(engine, at(0), "v1", "v2", 20.0)
    _simulate(engine, at(0), at(1), Split(MODEL, "v1", "v2", 20.0))
    first = analyse_window(engine, _spec(), at(0), at(1), run_id="first")
    (before,) = _rows(engine)
    loose = _spec(analysis={**ANALYSIS, "metrics": [{"name": "ctr", "tolerance": 0.5}]})
    second = analyse_window(engine, loose, at(0), at(1), run_id="second")
    (after,) = _rows(engine)
    assert before.run_id == "first" and after.run_id == "second"
    assert after.spec_hash == posthoc.spec_hash(loose) != before.spec_hash
    assert after.computed_at > before.computed_at
    assert json.loads(after.checks)["checks"][0]["threshold"] != json.loads(before.checks)["checks"][0]["threshold"]
    assert first[0].canary_n == second[0].canary_n


def test_history_rows_that_no_longer_apply_go_and_explicit_versions_stay(engine: sa.Engine) -> None:
    spec = _spec()
    _history(engine, at(0), "v1", None, 0.0)
    analyse_window(engine, spec, at(1), at(2))
    assert [(r.baseline_version, r.canary_version) for r in _rows(engine)] == [("v1", "")]
    (given,) = analyse_window(engine, spec, at(1), at(2), canary="v9")  # the baseline from the history
    assert (given.baseline_version, given.canary_version, given.versions_from) == ("v1", "v9", "params")
    _history(engine, at(0.5), "v1", "v2", 10.0)  # the history corrected: a canary served
    analyse_window(engine, spec, at(1), at(2))
    rows = [(r.baseline_version, r.canary_version, r.versions_from) for r in _rows(engine)]
    assert rows == [("v1", "v2", "history"), ("v1", "v9", "params")]


def test_versions_from_params_are_checked(engine: sa.Engine) -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="without canary_version"):
        analyse_window(engine, spec, at(0), at(1), baseline="v1")
    with pytest.raises(ValueError, match="no baseline serving beside v2"):
        analyse_window(engine, spec, at(0), at(1), canary="v2")
    with pytest.raises(ValueError, match="is not a version"):
        analyse_window(engine, spec, at(0), at(1), baseline="v1", canary="v2; drop table")
    with pytest.raises(ValueError, match="is empty"):
        analyse_window(engine, spec, at(1), at(1))
    (both,) = analyse_window(engine, spec, at(0), at(1), baseline="v1", canary="v2")
    assert (both.baseline_version, both.canary_version, both.status) == ("v1", "v2", "analysed")
    assert both.baseline_n == 0 and both.verdict == "INCONCLUSIVE"


def _upsert_twice(engine: sa.Engine) -> list[sa.Row]:
    common = dict(
        spec_name="unit_ranker",
        model=MODEL,
        window_start=at(0),
        window_end=at(1),
        baseline_version="v1",
        canary_version="v2",
        status="analysed",
        baseline_n=10,
        canary_n=1,
        checks={"checks": []},
        label_asof=at(1),
        versions_from="history",
        spec_hash="a",
        computed_at=at(2),
    )
    posthoc.store(
        engine, [posthoc.PosthocResult(verdict="PASS", reason="one", run_id="r1", **common)], replace_window=True
    )
    common |= dict(spec_hash="b", canary_n=2, computed_at=at(3))
    posthoc.store(
        engine, [posthoc.PosthocResult(verdict="FAIL", reason="two", run_id="r2", **common)], replace_window=True
    )
    with engine.connect() as conn:
        return conn.execute(sa.select(posthoc_results)).all()


@pytest.mark.parametrize("dialect", ["sqlite", "duckdb"])
def test_upsert_replaces_on_each_dialect(engine: sa.Engine, duckdb_engine: sa.Engine, dialect: str) -> None:
    (row,) = _upsert_twice(engine if dialect == "sqlite" else duckdb_engine)  # duckdb: the portable fallback
    assert (row.verdict, row.reason, row.spec_hash, row.canary_n, row.run_id) == ("FAIL", "two", "b", 2, "r2")
    assert row.computed_at == at(3)


@pytest.mark.postgres
def test_upsert_replaces_on_postgres(pg_engine: sa.Engine) -> None:
    (row,) = _upsert_twice(pg_engine)
    assert (row.verdict, row.reason, row.spec_hash, row.canary_n, row.run_id) == ("FAIL", "two", "b", 2, "r2")


def test_create_schema_adds_the_table_to_an_older_warehouse(tmp_path: Path) -> None:
    from mlcanary.warehouse.engine import make_engine
    from mlcanary.warehouse.schema import create_schema

    old = make_engine(f"sqlite:///{tmp_path}/old.db")
    create_schema(old)
    with old.begin() as conn:
        conn.execute(sa.text("DROP TABLE mlcanary_posthoc_results"))
    create_schema(old, contract=False)
    assert "mlcanary_posthoc_results" in sa.inspect(old).get_table_names()
    posthoc.ensure_table(old)  # and again, as every run does: no error


# --- the DAG -------------------------------------------------------------------------------------


def _spec_dir(tmp_path: Path, **overrides: Any) -> Path:
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    data = base_spec(analysis=ANALYSIS, posthoc={"since": DAY.date().isoformat()})
    data.update(overrides)
    (folder / f"{data['name']}.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_posthoc_dag_structure(tmp_path: Path) -> None:
    from airflow.sdk import CronDataIntervalTimetable
    from airflow.serialization.serialized_objects import DagSerialization

    from mlcanary_airflow.dag_factory import build_dags
    from mlcanary_airflow.posthoc_dag import LabelsCompleteSensor

    dags = build_dags(_spec_dir(tmp_path))
    assert set(dags) == {"rollout__unit_ranker", "posthoc__unit_ranker"}
    dag = dags["posthoc__unit_ranker"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert {t.value for t in dag.allowed_run_types} == {"scheduled", "backfill", "manual"}
    assert dag.start_date == DAY.replace(tzinfo=UTC) and not dag.catchup and dag.max_active_runs == 4
    scheduled = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    ten = pendulum.instance(at(10), tz="UTC")
    (info,) = scheduled.iter_dagrun_infos_between(ten, ten)
    assert (info.data_interval.start, info.data_interval.end) == (ten, ten.add(hours=1))
    params = dag.params
    assert list(params.keys()) == ["baseline_version", "canary_version"]
    assert params["canary_version"] is None and params["baseline_version"] is None
    assert params.get_param("canary_version").schema["type"] == ["null", "string"]
    assert params.get_param("canary_version").schema["pattern"]
    assert list(dag.task_dict) == ["labels_complete", "analyse"]
    sensor = dag.task_dict["labels_complete"]
    assert isinstance(sensor, LabelsCompleteSensor) and sensor.deferrable and sensor.delta == timedelta(minutes=5)
    assert dag.task_dict["analyse"].upstream_task_ids == {"labels_complete"}
    assert posthoc.spec_hash(_spec()) in (dag.doc_md or "")
    # the rollout DAG refuses backfills; with a schedule it keeps its scheduled runs
    assert {t.value for t in dags["rollout__unit_ranker"].allowed_run_types} == {"manual"}
    scheduled_rollout = build_dags(_spec_dir(tmp_path, schedule="0 6 * * *"))["rollout__unit_ranker"]
    assert {t.value for t in scheduled_rollout.allowed_run_types} == {"manual", "scheduled"}


def test_a_spec_without_posthoc_gets_no_posthoc_dag(tmp_path: Path) -> None:
    from mlcanary_airflow.dag_factory import build_dags

    folder = _spec_dir(tmp_path)
    (folder / "unit_ranker.yaml").write_text(yaml.safe_dump(base_spec()))
    assert set(build_dags(folder)) == {"rollout__unit_ranker"}


def test_a_broken_posthoc_section_or_build_takes_no_other_dag_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlcanary_airflow import dag_factory
    from mlcanary_airflow.dag_factory import SpecWarning, build_dags

    folder = _spec_dir(tmp_path)
    _spec_dir(tmp_path, name="other_ranker", model="other-ranker")
    broken = base_spec(
        name="broken_ranker", model="broken-ranker", posthoc={"schedule": "every hour", "since": "2026-11-01"}
    )
    (folder / "broken_ranker.yaml").write_text(yaml.safe_dump(broken))
    with pytest.warns(SpecWarning) as caught:
        dags = build_dags(folder)
    assert set(dags) == {
        "rollout__unit_ranker",
        "posthoc__unit_ranker",
        "rollout__other_ranker",
        "posthoc__other_ranker",
    }
    assert any(f"{folder / 'broken_ranker.yaml'}: posthoc.schedule:" in str(w.message) for w in caught)

    real = dag_factory.build_posthoc_dag

    def fails_for_unit(spec: RolloutSpec, source: str = "") -> Any:
        if spec.name == "unit_ranker":
            raise ValueError("no timetable today")
        return real(spec, source)

    monkeypatch.setattr(dag_factory, "build_posthoc_dag", fails_for_unit)
    with pytest.warns(SpecWarning) as caught:
        dags = build_dags(folder)
    assert set(dags) == {"rollout__unit_ranker", "rollout__other_ranker", "posthoc__other_ranker"}
    assert any(
        "posthoc: cannot build the DAG posthoc__unit_ranker: no timetable today" in str(w.message) for w in caught
    )


def test_a_worker_builds_only_the_posthoc_dag_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlcanary_airflow.dag_factory import build_dags

    folder = _spec_dir(tmp_path)
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "posthoc__unit_ranker")
    assert set(build_dags(folder)) == {"posthoc__unit_ranker"}
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "rollout__unit_ranker")
    assert set(build_dags(folder)) == {"rollout__unit_ranker"}


def _posthoc_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_url: str) -> Any:
    """The post-hoc DAG as Airflow loads it (the real DAG file), with its warehouse connection."""
    from airflow.dag_processing.dagbag import DagBag

    folder = _spec_dir(tmp_path)
    monkeypatch.setenv("MLCANARY_SPEC_DIR", str(folder))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE",
        json.dumps({"conn_type": "sqlite", "host": engine_url.removeprefix("sqlite:///")}),
    )
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["posthoc__unit_ranker"]


def test_dag_test_analyses_the_run_window(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, sqlite_url: str
) -> None:
    _history(engine, at(0), "v1", "v2", 20.0)
    _simulate(engine, at(8), at(11), Split(MODEL, "v1", "v2", 20.0), rate=0.5)
    dag = _posthoc_dag(tmp_path, monkeypatch, sqlite_url)
    run = dag.test(logical_date=pendulum.instance(at(10.5), tz="UTC"))  # a manual run: the last whole hour before
    assert str(run.state) == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}
    (row,) = _rows(engine)
    assert (row.window_start, row.window_end, row.baseline_version, row.canary_version) == (at(9), at(10), "v1", "v2")
    assert row.status == "analysed" and row.run_id == run.run_id and row.canary_n > 0


def test_dag_test_without_a_logical_date_fails_with_a_clear_message(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, sqlite_url: str
) -> None:
    from airflow.sdk import Context
    from airflow.sdk.exceptions import AirflowFailException

    from mlcanary_airflow.posthoc_dag import window_of

    with pytest.raises(AirflowFailException, match="trigger it with a logical date, or with data_interval_start"):
        window_of(Context())  # what a run with logical_date null gets: no interval keys at all
    dag = _posthoc_dag(tmp_path, monkeypatch, sqlite_url)
    run = dag.test(logical_date=None)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "failed" and states["labels_complete"] == "failed", states
    assert _rows(engine) == []
