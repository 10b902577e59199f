"""Backfills of the post-hoc DAG against a real Airflow (scheduler, DAG processor, triggerer, API
server, LocalExecutor; its metadata in PostgreSQL, see ``metadata_db``): ``airflow backfill create``
and ``POST /api/v2/backfills`` fill hourly windows once, a second backfill adds nothing, a reprocess
after a spec change recomputes every window in place; a backfill of a scheduled rollout DAG is
refused and moves no traffic.

The simulated day: hours 0-5 the baseline v1 alone, 6-17 canary v2 at 10 %, from 18 v2 promoted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import make_url

from airflow_stack import BIN, AirflowStack
from conftest import base_spec
from mlcanary import posthoc
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import SimConfig, simulate_batch
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, traffic_history, traffic_split

pytestmark = pytest.mark.airflow

NAME, MODEL = "ph_ranker", "ph-ranker"
DAG_ID = f"posthoc__{NAME}"
NIGHTLY = "ph_nightly"  # a scheduled rollout spec: its DAG must refuse backfills
DAY = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
HOURS = [DAY + timedelta(hours=h) for h in range(24)]
CANARY_FROM, PROMOTED_AT = 6, 18


def _spec_data(tolerance: float) -> dict[str, Any]:
    return base_spec(
        name=NAME,
        model=MODEL,
        analysis={
            "interval": "1m",
            "window": "1m",
            "label_delay": "5m",
            "min_samples": 50,
            "allow_short_bakes": True,
            "sequential": False,
            "segments": [],
            "metrics": [{"name": "ctr", "tolerance": tolerance}],
        },
        posthoc={"schedule": "0 * * * *", "since": (DAY - timedelta(days=1)).isoformat()},
    )


def _expected(hour: int) -> tuple[str, str, str]:
    """(baseline, canary, status) of the window starting at ``hour``."""
    if hour < CANARY_FROM:
        return "v1", "", "no_canary"
    if hour < PROMOTED_AT:
        return "v1", "v2", "analysed"
    return "v2", "", "no_canary"


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sa.Engine]:
    db = tmp_path_factory.mktemp("posthoc-warehouse") / "warehouse.db"
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    history = [
        (DAY - timedelta(hours=1), "v1", None, 0.0, False),  # the split read back: v1 alone
        (HOURS[CANARY_FROM] - timedelta(minutes=10), "v1", "v2", 0.0, False),  # a rollout starts
        (HOURS[CANARY_FROM], "v1", "v2", 10.0, True),  # stage 1
        (HOURS[PROMOTED_AT], "v1", "v2", 100.0, True),  # promoted
    ]
    with engine.begin() as conn:
        for when, baseline, canary, percent, applied in history:
            conn.execute(
                sa.insert(traffic_history).values(
                    model=MODEL,
                    rollout_id=f"rollout__{NAME}/manual__x",
                    baseline_version=baseline,
                    canary_version=canary,
                    to_percent=percent,
                    applied=applied,
                    note="simulated",
                    applied_at=when.replace(tzinfo=None),
                )
            )
    config = SimConfig(model=MODEL, seed=11, label_delay=timedelta(seconds=60), scrape_interval=3600)
    naive = [h.replace(tzinfo=None) for h in HOURS]
    end = naive[-1] + timedelta(hours=1)
    for start, stop, split in [
        (naive[0], naive[CANARY_FROM], Split(MODEL, "v1", None, 0.0)),
        (naive[CANARY_FROM], naive[PROMOTED_AT], Split(MODEL, "v1", "v2", 10.0)),
        (naive[PROMOTED_AT], end, Split(MODEL, "v2", None, 0.0)),
    ]:
        simulate_batch(
            engine, config, start, stop, 0.3, split, labels_asof=end + timedelta(hours=1), chunk_seconds=3600
        )
    WarehouseRouter(engine).set_split(Split("ph-nightly", "v1", None, 0.0), None)
    return db, engine


@pytest.fixture(scope="module")
def metadata_db(pg_base_url: str) -> Iterator[str]:
    """A PostgreSQL database of its own for Airflow's metadata, dropped afterwards.

    Not SQLite: Airflow 3.3.2 creates a backfill's runs one savepoint at a time, and on SQLite each
    one commits apart and meets the scheduler's commits: ``database is locked`` halfway, an orphan
    backfill left "running" (apache/airflow#66726, #68699). Here the reprocess of 24 runs failed so
    in 2 runs out of 2.
    """
    name = f"mlcanary_airflow_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_base_url).set(drivername="postgresql+psycopg2", database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, warehouse: tuple[Path, sa.Engine], metadata_db: str
) -> Iterator[AirflowStack]:
    if os.environ.get("CI") != "true" and os.environ.get("MLCANARY_SKIP_AIRFLOW_STACK"):
        pytest.skip("MLCANARY_SKIP_AIRFLOW_STACK is set")
    spec_dir = tmp_path_factory.mktemp("posthoc-specs")
    (spec_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(_spec_data(0.2)))
    nightly = base_spec(name=NIGHTLY, model="ph-nightly", schedule="0 6 * * *")
    (spec_dir / f"{NIGHTLY}.yaml").write_text(yaml.safe_dump(nightly))
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse[0])}),
        "AIRFLOW__CORE__PARALLELISM": "8",
        "MLCANARY_WATCHDOG_SECONDS": "3600",  # keep the executor's slots for the backfills
    }
    airflow = AirflowStack(tmp_path_factory.mktemp("posthoc-airflow-home"), spec_dir, env)
    started = time.monotonic()
    try:
        airflow.start()
        airflow.wait_dag(DAG_ID)
        airflow.wait_dag(f"rollout__{NIGHTLY}")
        print(f"\nAirflow up with both DAGs in {time.monotonic() - started:.0f} s")
        yield airflow
    except Exception:
        print(airflow.logs())
        raise
    finally:
        airflow.stop()


# --- helpers -------------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def stack_time(moment: datetime) -> str:
    """A time as the REST API writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cli(stack: AirflowStack, dag_id: str, start: datetime, end: datetime, *extra: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "airflow"), "backfill", "create", "--dag-id", dag_id]
    command += ["--from-date", _iso(start), "--to-date", _iso(end), "--max-active-runs", "8", *extra]
    return subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=180)


def _backfills(stack: AirflowStack, dag_id: str) -> list[dict[str, Any]]:
    found = stack.call("GET", "/backfills", params={"dag_id": dag_id, "limit": 100})
    return sorted(found["backfills"], key=lambda b: b["id"])


def _wait_backfill(stack: AirflowStack, backfill_id: int, timeout: float = 240) -> dict[str, Any]:
    return dict(
        stack.wait_for(
            f"backfill {backfill_id} to complete",
            lambda: (b := stack.call("GET", f"/backfills/{backfill_id}"))["completed_at"] and b,
            timeout,
            every=2,
        )
    )


def _runs(stack: AirflowStack, dag_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    found = stack.call(
        "GET",
        f"/dags/{dag_id}/dagRuns",
        params={
            "logical_date_gte": _iso(start),
            "logical_date_lte": _iso(end),
            "limit": 100,
            "order_by": "logical_date",
        },
    )
    return list(found["dag_runs"])


def _results(engine: sa.Engine, start: datetime, end: datetime) -> list[sa.Row]:
    with engine.connect() as conn:
        return posthoc.results(conn, NAME, start, end)


def _wait_parsed(stack: AirflowStack, spec: RolloutSpec, timeout: float = 120) -> None:
    """Until the DAG processor has parsed the spec as it is now (its analysis hash is in the DAG's doc)."""
    wanted = posthoc.spec_hash(spec)
    stack.wait_for(
        f"{DAG_ID} parsed with analysis hash {wanted}",
        lambda: wanted in (stack.call("GET", f"/dags/{DAG_ID}/details").get("doc_md") or ""),
        timeout,
        every=2,
    )


def _current_spec(stack: AirflowStack) -> RolloutSpec:
    return parse_spec(yaml.safe_load((stack.spec_dir / f"{NAME}.yaml").read_text()))


# --- the backfills -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled(stack: AirflowStack, warehouse: tuple[Path, sa.Engine]) -> dict[str, Any]:
    """The day filled by ``airflow backfill create`` (once per module)."""
    _wait_parsed(stack, _current_spec(stack))
    started = time.monotonic()
    done = _cli(stack, DAG_ID, HOURS[0], HOURS[-1])
    assert done.returncode == 0, done.stdout + done.stderr
    (backfill,) = _backfills(stack, DAG_ID)
    _wait_backfill(stack, backfill["id"])
    print(f"\nbackfill of 24 windows: {time.monotonic() - started:.0f} s")
    return {"backfill": backfill, "runs": _runs(stack, DAG_ID, HOURS[0], HOURS[-1])}


def test_backfill_fills_each_window_once(
    stack: AirflowStack, warehouse: tuple[Path, sa.Engine], filled: dict[str, Any]
) -> None:
    runs = filled["runs"]
    assert [r["logical_date"] for r in runs] == [stack_time(h) for h in HOURS]
    assert all(r["run_type"] == "backfill" and r["state"] == "success" for r in runs), [
        (r["logical_date"], r["state"]) for r in runs
    ]
    assert [(r["data_interval_start"], r["data_interval_end"]) for r in runs] == [
        (stack_time(h), stack_time(h + timedelta(hours=1))) for h in HOURS
    ]
    rows = _results(warehouse[1], HOURS[0], HOURS[-1] + timedelta(hours=1))
    naive = [h.replace(tzinfo=None) for h in HOURS]
    assert [(r.window_start, r.window_end) for r in rows] == [(h, h + timedelta(hours=1)) for h in naive]
    assert [(r.baseline_version, r.canary_version, r.status) for r in rows] == [_expected(h) for h in range(24)]
    by_window = {r["data_interval_start"]: r["dag_run_id"] for r in runs}
    assert [r.run_id for r in rows] == [by_window[stack_time(h)] for h in HOURS]
    spec_hash = posthoc.spec_hash(_current_spec(stack))
    assert {r.spec_hash for r in rows} == {spec_hash}
    analysed = [r for r in rows if r.status == "analysed"]
    assert all(r.verdict and r.baseline_n > 0 and r.canary_n > 0 for r in analysed)
    assert all(r.verdict is None and "no canary served" in r.reason for r in rows if r.status == "no_canary")
    log = stack.task_log(DAG_ID, by_window[stack_time(HOURS[CANARY_FROM])], "analyse", 1)
    assert f"mlcanary post-hoc: {HOURS[CANARY_FROM]:%Y-%m-%d} 06:00-07:00 UTC v1 vs v2: " in log


def test_a_second_identical_backfill_adds_nothing(
    stack: AirflowStack, warehouse: tuple[Path, sa.Engine], filled: dict[str, Any]
) -> None:
    before = _results(warehouse[1], HOURS[0], HOURS[-1] + timedelta(hours=1))
    runs_before = stack.call("GET", f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill", "limit": 1})
    done = _cli(stack, DAG_ID, HOURS[0], HOURS[-1])
    assert done.returncode == 0, done.stdout + done.stderr
    second = _backfills(stack, DAG_ID)[-1]
    assert second["id"] != filled["backfill"]["id"]
    _wait_backfill(stack, second["id"])
    runs_after = stack.call("GET", f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill", "limit": 1})
    assert runs_after["total_entries"] == runs_before["total_entries"]
    assert [r["dag_run_id"] for r in _runs(stack, DAG_ID, HOURS[0], HOURS[-1])] == [
        r["dag_run_id"] for r in filled["runs"]
    ]
    after = _results(warehouse[1], HOURS[0], HOURS[-1] + timedelta(hours=1))
    assert [tuple(r) for r in after] == [tuple(r) for r in before]  # not one row recomputed


def test_reprocess_after_a_spec_change_recomputes_in_place(
    stack: AirflowStack, warehouse: tuple[Path, sa.Engine], filled: dict[str, Any]
) -> None:
    before = _results(warehouse[1], HOURS[0], HOURS[-1] + timedelta(hours=1))
    path = stack.spec_dir / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(_spec_data(0.3)))
    changed = _current_spec(stack)
    assert posthoc.spec_hash(changed) not in {r.spec_hash for r in before}
    _wait_parsed(stack, changed)
    started = time.monotonic()
    done = _cli(stack, DAG_ID, HOURS[0], HOURS[-1], "--reprocess-behavior", "completed")
    assert done.returncode == 0, done.stdout + done.stderr
    _wait_backfill(stack, _backfills(stack, DAG_ID)[-1]["id"])
    print(f"\nreprocess of 24 windows: {time.monotonic() - started:.0f} s")
    runs = _runs(stack, DAG_ID, HOURS[0], HOURS[-1])
    assert [r["dag_run_id"] for r in runs] == [r["dag_run_id"] for r in filled["runs"]]  # cleared, not new
    assert all(r["state"] == "success" for r in runs), [(r["logical_date"], r["state"]) for r in runs]
    after = _results(warehouse[1], HOURS[0], HOURS[-1] + timedelta(hours=1))
    assert [(r.window_start, r.baseline_version, r.canary_version) for r in after] == [
        (r.window_start, r.baseline_version, r.canary_version) for r in before
    ]
    assert {r.spec_hash for r in after} == {posthoc.spec_hash(changed)}
    assert [r.run_id for r in after] == [r.run_id for r in before]
    assert all(a.computed_at > b.computed_at for a, b in zip(after, before, strict=True))
    thresholds = {json.loads(r.checks)["checks"][0]["threshold"] for r in after if r.status == "analysed"}
    assert thresholds and thresholds.isdisjoint(
        {json.loads(r.checks)["checks"][0]["threshold"] for r in before if r.status == "analysed"}
    )


def test_rest_backfill_fills_a_range_not_yet_filled(stack: AirflowStack, warehouse: tuple[Path, sa.Engine]) -> None:
    """The evening before the day: before any traffic history, then v1 read back at 23:00."""
    start, end = DAY - timedelta(hours=4), DAY - timedelta(hours=1)
    _wait_parsed(stack, _current_spec(stack))
    body = {
        "dag_id": DAG_ID,
        "from_date": _iso(start),
        "to_date": _iso(end),
        "reprocess_behavior": "none",
        "max_active_runs": 4,
    }
    response = stack.api.post("/backfills", json=body)
    assert response.status_code == 200, response.text
    backfill = response.json()
    _wait_backfill(stack, backfill["id"])
    runs = _runs(stack, DAG_ID, start, end)
    assert [r["logical_date"] for r in runs] == [stack_time(start + timedelta(hours=h)) for h in range(4)]
    assert all(r["state"] == "success" and r["run_type"] == "backfill" for r in runs)
    rows = _results(warehouse[1], start, end + timedelta(hours=1))
    assert [(r.window_start, r.baseline_version, r.canary_version, r.status) for r in rows] == [
        *[((start + timedelta(hours=h)).replace(tzinfo=None), "", "", "no_history") for h in range(3)],
        (end.replace(tzinfo=None), "v1", "", "no_canary"),
    ]
    assert {r.spec_hash for r in rows} == {posthoc.spec_hash(_current_spec(stack))}


def test_a_scheduled_rollout_dag_refuses_backfills(stack: AirflowStack, warehouse: tuple[Path, sa.Engine]) -> None:
    dag_id = f"rollout__{NIGHTLY}"
    engine = warehouse[1]

    def traffic() -> tuple[list[tuple], int]:
        with engine.connect() as conn:
            split = [tuple(r) for r in conn.execute(sa.select(traffic_split)).all()]
            history = conn.execute(
                sa.select(sa.func.count()).where(traffic_history.c.model == "ph-nightly")
            ).scalar_one()
        return split, history

    before = traffic()
    details = stack.call("GET", f"/dags/{dag_id}/details")
    assert sorted(details["allowed_run_types"]) == ["manual", "scheduled"]
    start, end = DAY, DAY + timedelta(days=1)
    done = _cli(stack, dag_id, start, end)
    assert done.returncode != 0
    assert f"Dag with dag_id: '{dag_id}' does not allow backfill runs" in done.stdout + done.stderr
    response = stack.api.post(
        "/backfills", json={"dag_id": dag_id, "from_date": _iso(start), "to_date": _iso(end), "max_active_runs": 1}
    )
    assert response.status_code == 400 and "does not allow backfill runs" in response.text
    assert _backfills(stack, dag_id) == []
    assert stack.call("GET", f"/dags/{dag_id}/dagRuns", params={"run_type": "backfill"})["total_entries"] == 0
    assert _runs(stack, dag_id, start, end) == []
    time.sleep(3)  # a run created anyway would have touched the split by now
    assert traffic() == before
