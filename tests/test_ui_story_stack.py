"""The UI's story against a real Airflow (scheduler, DAG processor, triggerer, API server): what a
person sees of a rollout that the guardrails roll back in stage 2, read through the REST API the
UI reads. ``dag.test()`` cannot show these: the scheduler's start of a run (its first note), the
triggerer's log lines in the guardrails task's log, and the "Trigger fired event" it logs.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from airflow_stack import AirflowStack
from conftest import base_spec
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, rollouts

pytestmark = [pytest.mark.airflow]

NAME, MODEL = "story_ranker", "story-ranker"
DAG_ID = f"rollout__{NAME}"
# 12 s bakes at least (see test_faults_airflow: Airflow 3.3's race of a trigger that fires at once).
SPEC = base_spec(
    name=NAME,
    model=MODEL,
    stages=[{"percent": 20, "bake": "12s"}, {"percent": 50, "bake": "12s"}],
    guardrails={**base_spec()["guardrails"], "min_requests": 10, "success_rate_min": 0.9},
    analysis={
        "interval": "5s",
        "window": "10m",
        "label_delay": "1s",
        "min_label_window": "1s",
        "min_samples": 100,
        "sequential": False,
        "segments": [],
        "metrics": [{"name": "ctr", "tolerance": 0.5}],
    },
    policies={"inconclusive": "rollback"},
    retries={"traffic": 2, "rollback": 2, "delay": "2s"},
)


@pytest.fixture(scope="module")
def warehouse_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("story-warehouse") / "warehouse.db"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, warehouse_db: Path) -> Iterator[AirflowStack]:
    if os.environ.get("CI") != "true" and os.environ.get("MLCANARY_SKIP_AIRFLOW_STACK"):
        pytest.skip("MLCANARY_SKIP_AIRFLOW_STACK is set")
    spec_dir = tmp_path_factory.mktemp("story-specs")
    (spec_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(SPEC))
    create_schema(make_engine(f"sqlite:///{warehouse_db}"))
    env = {"AIRFLOW_CONN_MLCANARY_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)})}
    airflow = AirflowStack(tmp_path_factory.mktemp("airflow-home"), spec_dir, env)
    try:
        airflow.start()
        airflow.wait_dag(DAG_ID)
        yield airflow
    except Exception:
        print(airflow.logs())
        raise
    finally:
        airflow.stop()


def _log(stack: AirflowStack, run_id: str, task_id: str) -> list[dict]:
    """The task's log as the UI's log view gets it: one dict per line (event, level, ...)."""
    found = stack.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1")
    return [line for line in found["content"] if isinstance(line, dict)]


def test_a_rolled_back_run_as_the_ui_shows_it(stack: AirflowStack, warehouse_db: Path) -> None:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    WarehouseRouter(engine).set_split(Split(MODEL, "v1", None, 0.0), None)
    config = SimConfig(
        model=MODEL, seed=5, label_delay=timedelta(seconds=1), faults=[Fault.parse("v2:latency_ms=300;min_percent=40")]
    )
    sim = LiveSimulator(engine, config, rate=400, tick=0.5)
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    time.sleep(2)
    try:
        run_id = stack.trigger(DAG_ID, {"candidate_version": "v2"})
        # the runs list while it runs: the scheduler's start wrote the note
        note = stack.wait_for(
            "the run's first note", lambda: stack.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["note"], 60
        )
        assert note == "serving → v2: running"
        assert stack.wait_run(DAG_ID, run_id, timeout=300) == "failed"
    finally:
        sim.stop_event.set()
        thread.join(timeout=30)

    run = stack.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
    assert run["note"].startswith("v1 → v2: rolled back at stage 2: guardrails stage 2 breach: p99_latency_ms "), run
    states = stack.states(DAG_ID, run_id)
    assert states["stage_2.guardrails"] == "failed" and states["report"] == "failed", states

    # the guardrails task's log: the triggerer's one line per poll, and a small event
    log = _log(stack, run_id, "stage_1.guardrails")
    events = [str(line.get("event", "")) for line in log]
    polls = [e for e in events if e.startswith("poll ")]
    assert len(polls) >= 10, events
    assert polls[0].startswith("poll 1 (stage 1, 20 %, 0 s of 12 s healthy): success_rate "), polls[0]
    assert any(re.match(r"poll \d+ \(stage 1, 20 %, 12 s of 12 s healthy\)", p) for p in polls), polls
    fired = [line for line in log if line.get("event") == "Trigger fired event"]
    assert len(fired) == 1 and len(json.dumps(fired[0])) < 1500, fired
    breach = _log(stack, run_id, "stage_2.guardrails")
    failing = [line for line in breach if str(line.get("event", "")).startswith("poll ")]
    assert failing and failing[-1]["level"] == "warning" and " FAIL" in failing[-1]["event"], failing

    # the failed run's reason: one line at error level in the report task's log, no traceback
    report = _log(stack, run_id, "report")
    said = [(line.get("level"), str(line.get("event"))) for line in report]
    assert ("error", f"mlcanary: rolled back at stage 2: {run['note'].split(': ', 2)[2]}") in said, said
    assert not any(e == "Task failed with exception" for _, e in said)
    assert not any("error_detail" in line or "exc_info" in line for line in report)

    if os.environ.get("STORY_DUMP"):  # what the UI showed, for a person to read
        seen = {"note": run["note"], "polls": polls, "fired": fired, "breach": breach, "report": said}
        Path(os.environ["STORY_DUMP"]).write_text(json.dumps(seen, indent=1, default=str))

    # the grid: each stage's share, the ids unchanged
    nodes = stack.api.get(f"{stack.url}/ui/grid/structure/{DAG_ID}").json()
    labels = {n["id"]: n["label"] for n in nodes}
    assert labels["stage_1"] == "stage_1 (20 %)" and labels["stage_2"] == "stage_2 (50 %)"
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(rollouts)).scalar() == 1
