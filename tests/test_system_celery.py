"""The distributed topology natively on this machine (``make system-test``): Airflow 3.3 with the
CeleryExecutor, Redis as the broker (127.0.0.1:6379, a database of its own) and PostgreSQL
(127.0.0.1:5432) for the metadata database, Celery's results and the warehouse (databases of their
own, created here and dropped at the end), api-server, scheduler, dag-processor, triggerer and a
``celery worker`` each a process group of its own on free ports; the live simulator writes the
traffic into the PostgreSQL warehouse. Everything through the REST API, as operators do.

Phase 1, five independent models at once: a healthy candidate is promoted, a latency fault rolled
back by the guardrails, a CTR drop by the analysis, a person approves the final stage
(``PATCH .../hitlDetails``), a post-hoc backfill fills its windows.

Phase 2, three models at once, each with a real fault of a component (serialised: one at a time):
(a) ``kill -9`` of the Celery worker (its process group and the task processes it forked) while a
stage's traffic shift runs on it, then a new worker: the task is retried there; (b) the triggerer
killed mid-bake and stopped mid-bake again (SIGTERM): the bake is not shortened and a breach after
the restart is caught; (c) the scheduler killed while a question waits for a person: the question's
timeout still resolves it. Each asserts the final split, the lock and the audit rows.

Prints the wall time of each rollout, the stack's peak resident memory (every process of its
process groups and their tasks, sampled each second) and the faults injected and survived.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import make_url

from airflow_stack import CELERY_WORKER, AirflowStack
from conftest import base_spec
from mlcanary import posthoc, registry
from mlcanary import rollout as steps
from mlcanary.lifecycle import Status
from mlcanary.routers.base import Split
from mlcanary.simulator import Fault, SimConfig, simulate_batch
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, measurements, traffic_history, traffic_split
from test_faults_airflow import BAKE, QUICK_ANALYSIS, Traffic, _applied, _decisions, _rollout, _serving

pytestmark = [pytest.mark.system, pytest.mark.faults, pytest.mark.airflow, pytest.mark.timeout(600)]

# the Redis server (override with MLCANARY_TEST_REDIS, as MLCANARY_TEST_PG overrides PostgreSQL's)
_REDIS = urlsplit(os.environ.get("MLCANARY_TEST_REDIS", "redis://127.0.0.1:6379"))
REDIS_HOST, REDIS_PORT = _REDIS.hostname or "127.0.0.1", _REDIS.port or 6379
CTR_FELL = r"analysis( stage \d: failing look 1 of 1 during the bake)?: ctr fell"
ASK_TIMEOUT = 45  # seconds a question of s_ask waits for a person
PROMOTED = [20.0, 50.0, 100.0, 100.0]  # the applied steps of a promoted two-stage rollout


def _spec(name: str, **overrides: Any) -> dict[str, Any]:
    data = base_spec(
        name=name,
        model=name.replace("_", "-"),
        stages=[{"percent": 20, "bake": BAKE}, {"percent": 50, "bake": BAKE}],
        guardrails={**base_spec()["guardrails"], "min_requests": 10, "success_rate_min": 0.9},
        analysis=QUICK_ANALYSIS,
        policies={"inconclusive": "rollback"},
        retries={"traffic": 2, "rollback": 2, "delay": "2s"},
    )
    data.update(overrides)
    return data


# The post-hoc windows: hours 0-1 of three days ago v1 alone, 2-5 the canary v2 at 10 %.
DAY = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
HOURS = [DAY + timedelta(hours=h) for h in range(6)]
CANARY_FROM = 2
POSTHOC = base_spec(
    name="s_posthoc",
    model="s-posthoc",
    analysis={
        "interval": "1m",
        "window": "1m",
        "label_delay": "5m",
        "min_samples": 50,
        "allow_short_bakes": True,
        "sequential": False,
        "segments": [],
        "metrics": [{"name": "ctr", "tolerance": 0.2}],
    },
    posthoc={"schedule": "0 * * * *", "since": (DAY - timedelta(days=1)).isoformat()},
)

SPECS = {
    # phase 1
    "s_healthy": _spec("s_healthy"),
    "s_latency": _spec("s_latency"),
    "s_ctr": _spec(
        "s_ctr",
        analysis={**QUICK_ANALYSIS, "metrics": [{"name": "ctr", "tolerance": 0.1}]},
        policies={"inconclusive": "extend", "max_extension": "30s"},
    ),
    "s_approve": _spec("s_approve", approval={"before_final_stage": True, "timeout": "30m"}),
    "s_posthoc": POSTHOC,
    # phase 2
    "s_worker": _spec("s_worker"),
    # long bakes: the triggerer is restarted 4 s into each, maybe after another component's fault
    "s_trigger": _spec("s_trigger", stages=[{"percent": 20, "bake": "30s"}, {"percent": 50, "bake": "45s"}]),
    "s_ask": _spec(
        "s_ask",
        stages=[{"percent": 50, "bake": BAKE}],
        analysis={**QUICK_ANALYSIS, "min_samples": 10_000_000},  # never enough: INCONCLUSIVE, a person is asked
        policies={"inconclusive": "ask", "ask_timeout": f"{ASK_TIMEOUT}s"},
    ),
}

FIGURES: dict[str, Any] = {"rollouts": {}, "faults": []}
FAULT_LOCK = threading.Lock()  # one component fault at a time


# --- the services: PostgreSQL and Redis, each with databases of its own -------------------------------


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI must run the system test for real")
    pytest.skip(message)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis database of its own (one that is empty now, not 0), flushed before and after."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=3)
    problem, count = None, 16
    try:
        client.ping()
        count = int(client.config_get("databases").get("databases", 16))
    except redis.RedisError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    if problem:
        _missing(f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT} ({problem})")
    offset = uuid.uuid4().int
    for n in range(count - 1):
        db = 1 + (offset + n) % (count - 1)
        own = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=3)
        if own.dbsize() == 0:
            break
        own.close()
    else:
        pytest.fail("no empty Redis database to run the system test in")
    own.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    finally:
        own.flushdb()
        own.close()


@pytest.fixture(scope="module")
def databases(pg_base_url: str) -> Iterator[dict[str, str]]:
    """Two PostgreSQL databases of their own: Airflow's metadata (and Celery's results), the
    warehouse. Created now, dropped at the end, pass or fail."""
    suffix = uuid.uuid4().hex[:10]
    names = {"metadata": f"mlcanary_sys_meta_{suffix}", "warehouse": f"mlcanary_sys_wh_{suffix}"}
    admin = sa.create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
    base = make_url(pg_base_url)
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield {
            "metadata": base.set(drivername="postgresql+psycopg2", database=names["metadata"]).render_as_string(False),
            "warehouse": base.set(drivername="postgresql+psycopg", database=names["warehouse"]).render_as_string(False),
            "warehouse_name": names["warehouse"],
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class RssSampler:
    """The stack's memory each second, over every process of its groups and their tasks: the sum of
    their RSS (pages shared by the forked workers count once per process) and of their PSS (shared
    pages split between the processes that share them: what the stack really holds)."""

    def __init__(self, stack: AirflowStack) -> None:
        self.stack = stack
        self.peak, self.peak_pss, self.most_processes, self.samples = 0, 0, 0, 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.stop_event.wait(1.0):
            rss = pss = 0
            try:
                processes = self.stack.processes()
            except Exception:  # a process list read while components start or die
                continue
            for proc in processes:
                with contextlib.suppress(psutil.Error):
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            self.samples += 1
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.most_processes = max(self.most_processes, len(processes))


@pytest.fixture(scope="module")
def warehouse(databases: dict[str, str]) -> sa.Engine:
    engine = make_engine(databases["warehouse"])
    create_schema(engine)
    return engine


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, databases: dict[str, str], redis_url: str, warehouse: sa.Engine
) -> Iterator[AirflowStack]:
    began = time.monotonic()
    spec_dir = tmp_path_factory.mktemp("system-specs")
    for name, data in SPECS.items():
        (spec_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
    wh = make_url(databases["warehouse"])
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": databases["metadata"],
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE": json.dumps(
            {"conn_type": "postgres", "host": wh.host, "port": wh.port, "schema": wh.database, "login": wh.username}
        ),
        "AIRFLOW__CORE__PARALLELISM": "8",
        "MLCANARY_WATCHDOG_SECONDS": "3600",  # keep the worker's slots for the rollouts
        # a dead worker's task is failed (and retried) 20 s after its last heartbeat, not 300 s
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # a killed scheduler's or triggerer's work is taken over within seconds, not 30 s
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
        # a task sent to a worker that died before starting it is sent again (Redis keeps it 6 h)
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "15",
    }
    airflow = AirflowStack(
        tmp_path_factory.mktemp("system-airflow-home"),
        spec_dir,
        env,
        executor="celery",
        broker_url=redis_url,
        worker_concurrency=4,
    )
    sampler = RssSampler(airflow)
    sampler.thread.start()
    try:
        airflow.start()
        for name in SPECS:
            airflow.wait_dag(f"rollout__{name}")
        airflow.wait_dag("posthoc__s_posthoc")
        FIGURES["stack_up_s"] = round(time.monotonic() - began)
        print(f"\nCelery stack up with every DAG in {FIGURES['stack_up_s']} s")
        yield airflow
    except Exception:
        print(airflow.logs())
        raise
    finally:
        sampler.stop_event.set()
        sampler.thread.join(timeout=5)
        running = airflow.processes()  # every process of the groups, and the tasks in groups of their own
        airflow.stop()
        left = [p for p in running if _alive(p.pid)]
        FIGURES.update(
            peak_rss_mb=round(sampler.peak / 2**20),
            peak_pss_mb=round(sampler.peak_pss / 2**20),
            most_processes=sampler.most_processes,
            rss_samples=sampler.samples,
            processes_at_stop=len(running),
            processes_left=len(left),
            module_wall_s=round(time.monotonic() - began),
        )
        print("\nsystem test figures:\n" + json.dumps(FIGURES, indent=2))
        (airflow.home / "figures.json").write_text(json.dumps(FIGURES, indent=2))
        assert not left, f"processes outlived the stack: {left}"


# --- rollouts ------------------------------------------------------------------------------------


@dataclass
class Launch:
    name: str
    candidate: str
    traffic: Traffic
    run_id: str = ""
    done: dict[str, Any] = field(default_factory=dict)

    @property
    def dag_id(self) -> str:
        return f"rollout__{self.name}"

    @property
    def model(self) -> str:
        return self.name.replace("_", "-")

    @property
    def rollout_id(self) -> str:
        return f"{self.dag_id}/{self.run_id}"


def _launch(
    stack: AirflowStack, engine: sa.Engine, wanted: dict[str, tuple[str, tuple[str, ...], float]]
) -> dict[str, Launch]:
    """Start the traffic of each model (name: (candidate, faults, rate)), then trigger every rollout."""
    launches = {}
    for name, (candidate, faults, rate) in wanted.items():
        model = name.replace("_", "-")
        _serving(engine, model)
        traffic = Traffic(engine, model, faults=faults)
        traffic.sim.rate = rate
        traffic.thread.start()
        launches[name] = Launch(name, candidate, traffic)
    time.sleep(2)  # some baseline traffic before the rollouts start
    for launch in launches.values():
        launch.run_id = stack.trigger(launch.dag_id, {"candidate_version": launch.candidate})
    return launches


def _finish(stack: AirflowStack, launch: Launch, timeout: float = 300) -> str:
    """Wait for the run to end, stop its traffic, record its wall time (the run's start to end)."""
    try:
        final = stack.wait_run(launch.dag_id, launch.run_id, timeout)
    finally:
        launch.traffic.__exit__()
    run = stack.call("GET", f"/dags/{launch.dag_id}/dagRuns/{launch.run_id}")
    took = datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])
    FIGURES["rollouts"][launch.name] = {"final": final, "wall_s": round(took.total_seconds(), 1)}
    print(f"\n{launch.name}: run {final} after {took.total_seconds():.0f} s")
    return final


def _stop_all(launches: dict[str, Launch]) -> None:
    for launch in launches.values():
        launch.traffic.sim.stop_event.set()


def _split(engine: sa.Engine, model: str) -> Split | None:
    from mlcanary.routers.warehouse import WarehouseRouter

    return WarehouseRouter(engine).get_split(model)


def _audit(engine: sa.Engine, launch: Launch) -> tuple[steps.Rollout, list[tuple[float | None, str]]]:
    """The rollout's row and its applied traffic steps; every history row's share is known."""
    with engine.connect() as conn:
        unknown = conn.execute(
            sa.select(sa.func.count()).where(
                traffic_history.c.rollout_id == launch.rollout_id, traffic_history.c.to_percent.is_(None)
            )
        ).scalar_one()
    assert unknown == 0, f"{launch.name}: {unknown} traffic-history rows with an unknown split"
    return _rollout(engine, launch.rollout_id), _applied(engine, launch.rollout_id)


def _assert_promoted(engine: sa.Engine, launch: Launch) -> None:
    split = _split(engine, launch.model)
    assert split == Split(launch.model, launch.candidate, None, 0.0) and split.owner == launch.rollout_id
    rollout, applied = _audit(engine, launch)
    assert rollout.status is Status.PROMOTED and not rollout.holds_lock
    assert [p for p, _ in applied] == PROMOTED, applied
    with engine.connect() as conn:
        assert steps.lock_holder(conn, launch.model) is None
        assert registry.get(conn, launch.model, launch.candidate).status == "baseline"  # type: ignore[union-attr]
    assert any(a == "promote" for a, _ in _decisions(engine, launch.rollout_id))


def _assert_rolled_back(engine: sa.Engine, launch: Launch) -> steps.Rollout:
    assert _split(engine, launch.model) == Split(launch.model, "v1", launch.candidate, 0.0)
    rollout, applied = _audit(engine, launch)
    assert rollout.status is Status.ROLLED_BACK and not rollout.holds_lock
    assert applied and applied[-1][0] == 0.0 and 100.0 not in [p for p, _ in applied], applied
    with engine.connect() as conn:
        assert steps.lock_holder(conn, launch.model) is None
        assert registry.get(conn, launch.model, launch.candidate).status == "rejected"  # type: ignore[union-attr]
    assert sum(a == "rollback" for a, _ in _decisions(engine, launch.rollout_id)) == 1
    return rollout


def _stage_start(engine: sa.Engine, launch: Launch, stage: int) -> datetime:
    with engine.connect() as conn:
        at = steps.stage_started_at(conn, launch.rollout_id, stage)
    assert at is not None, f"{launch.name}: stage {stage} never started"
    return at.replace(tzinfo=UTC)


def _when(ti: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(ti[key])


# --- phase 1: five independent models at once ------------------------------------------------------


def _seed_posthoc_history(engine: sa.Engine) -> None:
    model = POSTHOC["model"]
    with engine.begin() as conn:
        for when, canary, percent, applied in [
            (DAY - timedelta(hours=1), None, 0.0, False),
            (HOURS[CANARY_FROM] - timedelta(minutes=10), "v2", 0.0, False),
            (HOURS[CANARY_FROM], "v2", 10.0, True),
        ]:
            conn.execute(
                sa.insert(traffic_history).values(
                    model=model,
                    rollout_id="rollout__s_posthoc/manual__x",
                    baseline_version="v1",
                    canary_version=canary,
                    to_percent=percent,
                    applied=applied,
                    note="simulated",
                    applied_at=when.replace(tzinfo=None),
                )
            )
    config = SimConfig(model=model, seed=11, label_delay=timedelta(seconds=60), scrape_interval=3600)
    naive = [h.replace(tzinfo=None) for h in HOURS]
    end = naive[-1] + timedelta(hours=1)
    for start, stop, split in [
        (naive[0], naive[CANARY_FROM], Split(model, "v1", None, 0.0)),
        (naive[CANARY_FROM], end, Split(model, "v1", "v2", 10.0)),
    ]:
        simulate_batch(
            engine, config, start, stop, 0.3, split, labels_asof=end + timedelta(hours=1), chunk_seconds=3600
        )


@pytest.fixture(scope="module")
def phase_one(stack: AirflowStack, warehouse: sa.Engine) -> Iterator[dict[str, Any]]:
    _seed_posthoc_history(warehouse)
    launches = _launch(
        stack,
        warehouse,
        {
            "s_approve": ("v2", (), 200),
            "s_healthy": ("v2", (), 200),
            "s_latency": ("v3", ("v3:latency_ms=300;min_percent=50",), 200),
            "s_ctr": ("v4", ("v4:ctr_drop=0.3",), 400),
        },
    )
    backfill = stack.call(
        "POST",
        "/backfills",
        json={
            "dag_id": "posthoc__s_posthoc",
            "from_date": HOURS[0].isoformat(),
            "to_date": HOURS[-1].isoformat(),
            "reprocess_behavior": "none",
            "max_active_runs": 3,
        },
    )
    try:
        yield {"launches": launches, "backfill": backfill, "started": time.monotonic()}
    finally:
        _stop_all(launches)


def test_a_person_approves_the_final_stage(stack: AirflowStack, warehouse: sa.Engine, phase_one: dict) -> None:
    launch = phase_one["launches"]["s_approve"]
    stack.wait_task(launch.dag_id, launch.run_id, "approve_final_stage", ("deferred",), 300)
    path = f"/dags/{launch.dag_id}/dagRuns/{launch.run_id}/taskInstances/approve_final_stage/-1/hitlDetails"
    question = stack.call("GET", path)
    assert "Approve" in question["options"] and not question["response_received"]
    assert _split(warehouse, launch.model) == Split(launch.model, "v1", "v2", 20.0)  # waits at stage 1
    stack.call("PATCH", path, json={"chosen_options": ["Approve"], "params_input": {}})
    assert _finish(stack, launch) == "success", stack.states(launch.dag_id, launch.run_id)
    _assert_promoted(warehouse, launch)
    approvals = [r for a, r in _decisions(warehouse, launch.rollout_id) if a == "approve"]
    assert len(approvals) == 1 and approvals[0].startswith("final stage approved by "), approvals
    answered = stack.call("GET", path)
    assert answered["response_received"] and answered["chosen_options"] == ["Approve"]


def test_a_healthy_candidate_is_promoted(stack: AirflowStack, warehouse: sa.Engine, phase_one: dict) -> None:
    launch = phase_one["launches"]["s_healthy"]
    assert _finish(stack, launch) == "success", stack.states(launch.dag_id, launch.run_id)
    _assert_promoted(warehouse, launch)
    states = stack.states(launch.dag_id, launch.run_id)
    assert states["promote"] == "success" and states["rollback"] == "skipped" and states["report"] == "success"


def test_a_latency_fault_is_rolled_back_by_the_guardrails(
    stack: AirflowStack, warehouse: sa.Engine, phase_one: dict
) -> None:
    launch = phase_one["launches"]["s_latency"]
    assert _finish(stack, launch) == "failed"
    rollout = _assert_rolled_back(warehouse, launch)
    assert rollout.reason is not None and rollout.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert [p for p, _ in _applied(warehouse, launch.rollout_id)] == [20.0, 50.0, 0.0]  # the fault shows at 50 %
    states = stack.states(launch.dag_id, launch.run_id)
    assert states["stage_1.guardrails"] == "success" and states["stage_2.guardrails"] == "failed"
    assert states["promote"] == "upstream_failed" and states["rollback"] == "success"
    FIGURES["faults"].append("latency v3:latency_ms=300;min_percent=50: rolled back by the guardrails at 50 %")


def test_a_ctr_drop_is_rolled_back_by_the_analysis(stack: AirflowStack, warehouse: sa.Engine, phase_one: dict) -> None:
    launch = phase_one["launches"]["s_ctr"]
    assert _finish(stack, launch) == "failed"
    rollout = _assert_rolled_back(warehouse, launch)
    assert rollout.reason is not None and re.match(CTR_FELL, rollout.reason), rollout.reason
    with warehouse.connect() as conn:
        m = measurements.c
        breaches = conn.execute(
            sa.select(sa.func.count()).where(
                m.rollout_id == launch.rollout_id, m.tier == "guardrail", m.verdict == "FAIL"
            )
        ).scalar_one()
    assert breaches == 0  # the infrastructure stayed healthy: the analysis alone rolled back
    FIGURES["faults"].append("CTR v4:ctr_drop=0.3: rolled back by the analysis")


def test_a_posthoc_backfill_fills_its_windows(stack: AirflowStack, warehouse: sa.Engine, phase_one: dict) -> None:
    backfill = phase_one["backfill"]
    done = stack.wait_for(
        f"backfill {backfill['id']} to complete",
        lambda: (b := stack.call("GET", f"/backfills/{backfill['id']}"))["completed_at"] and b,
        300,
        every=2,
    )
    took = datetime.fromisoformat(done["completed_at"]) - datetime.fromisoformat(done["created_at"])
    FIGURES["rollouts"]["s_posthoc backfill (6 windows)"] = {
        "final": "completed",
        "wall_s": round(took.total_seconds()),
    }
    runs = stack.call(
        "GET",
        "/dags/posthoc__s_posthoc/dagRuns",
        params={"run_type": "backfill", "limit": 100, "order_by": "logical_date"},
    )["dag_runs"]
    assert len(runs) == len(HOURS) and all(r["state"] == "success" for r in runs), [
        (r["logical_date"], r["state"]) for r in runs
    ]
    with warehouse.connect() as conn:
        rows = posthoc.results(conn, "s_posthoc", HOURS[0], HOURS[-1] + timedelta(hours=1))
    naive = [h.replace(tzinfo=None) for h in HOURS]
    assert [r.window_start for r in rows] == naive
    assert [(r.baseline_version, r.canary_version, r.status) for r in rows] == [
        ("v1", "", "no_canary") if h < CANARY_FROM else ("v1", "v2", "analysed") for h in range(len(HOURS))
    ]
    assert all(r.verdict and r.canary_n > 0 for r in rows if r.status == "analysed")
    assert {r.run_id for r in rows} == {r["dag_run_id"] for r in runs}


# --- phase 2: three models, a component fault each ---------------------------------------------------


def _busy(stack: AirflowStack, but: tuple[str, str, str]) -> list[str]:
    """The task instances scheduled, queued or running anywhere, but ``(dag_id, run_id, task_id)``."""
    found = stack.call(
        "GET",
        "/dags/~/dagRuns/~/taskInstances",
        params={"state": ["scheduled", "queued", "running"], "limit": 100},
    )["task_instances"]
    return [
        f"{t['dag_id']}.{t['task_id']}:{t['state']}"
        for t in found
        if (t["dag_id"], t["dag_run_id"], t["task_id"]) != but
    ]


def _lock_waiters(engine: sa.Engine, database: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"),
                {"db": database},
            ).scalar_one()
        )


def _drive_worker_kill(stack: AirflowStack, engine: sa.Engine, database: str, launch: Launch) -> dict[str, Any]:
    """Stage 2's shift blocks on the routing table's row (held here, as a slow platform would hold
    it); while it runs on the worker, the worker's process group and its task processes get SIGKILL."""
    dag_id, run_id, task = launch.dag_id, launch.run_id, "stage_2.shift_traffic"
    stack.wait_task(dag_id, run_id, "stage_1.guardrails", ("deferred",), 240)
    blocker = engine.connect()
    held = blocker.begin()
    blocker.execute(
        sa.select(traffic_split.c.model).where(traffic_split.c.model == launch.model).with_for_update()
    ).all()
    try:
        ti = stack.wait_task(dag_id, run_id, task, ("running",), 240)
        stack.wait_for("the shift to wait on the split's row", lambda: _lock_waiters(engine, database) >= 1, 90)
        while True:  # no other task may be on the worker, nor on its way there: the kill is this rollout's only
            stack.wait_for(
                "the other rollouts' tasks to be idle", lambda: not _busy(stack, (dag_id, run_id, task)), 180, 0.25
            )
            with FAULT_LOCK:
                if _busy(stack, (dag_id, run_id, task)):
                    continue
                ti = stack.tasks(dag_id, run_id)[task]
                assert ti["state"] == "running" and ti["try_number"] == 1 and ti["pid"], ti
                killed = stack.restart(CELERY_WORKER, signal.SIGKILL)
                held.rollback()  # the dead task's transaction goes with its connection: nothing it wrote commits
                blocker.close()
                task_process_gone = not _alive(ti["pid"])
                stack.wait_worker()
                ready = time.time()
            break
    finally:
        if held.is_active:
            held.rollback()
        blocker.close()
    final = _finish(stack, launch)
    return {
        "killed": killed,
        "ready": ready,
        "task_pid": ti["pid"],
        "task_process_gone": task_process_gone,
        "final": final,
    }


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _drive_triggerer_restarts(stack: AirflowStack, engine: sa.Engine, launch: Launch) -> dict[str, Any]:
    """Stage 1: kill -9 of the triggerer 4 s into the 30 s bake, a new one started. Stage 2: SIGTERM
    4 s into the 45 s bake, a new one started, then the canary's latency jumps."""
    dag_id, run_id = launch.dag_id, launch.run_id
    out: dict[str, Any] = {}
    for stage, sig in ((1, signal.SIGKILL), (2, signal.SIGTERM)):
        stack.wait_task(dag_id, run_id, f"stage_{stage}.guardrails", ("deferred",), 300)
        start = _stage_start(engine, launch, stage).timestamp()
        time.sleep(max(0.0, start + 4 - time.time()))
        with FAULT_LOCK:
            state = stack.tasks(dag_id, run_id)[f"stage_{stage}.guardrails"]["state"]
            assert state == "deferred", (
                f"stage {stage}'s bake was over before the triggerer could be restarted: {state}"
            )
            restarted = stack.restart("triggerer", sig)
            stack.wait_healthy("triggerer", restarted)
        out[f"restart_{stage}"] = restarted
        out[f"back_{stage}"] = time.time()
    launch.traffic.config.faults.append(Fault.parse(f"{launch.candidate}:latency_ms=400"))
    out["injected"] = time.time()
    out["final"] = _finish(stack, launch)
    return out


def _drive_scheduler_kill(stack: AirflowStack, launch: Launch) -> dict[str, Any]:
    """kill -9 of the scheduler while ``decide`` asks a person; a new one started; nobody answers."""
    dag_id, run_id = launch.dag_id, launch.run_id
    stack.wait_task(dag_id, run_id, "decide", ("deferred",), 300)
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/decide/-1/hitlDetails"
    asked = stack.call("GET", path)
    with FAULT_LOCK:
        restarted = stack.restart("scheduler", signal.SIGKILL)
        stack.wait_healthy("scheduler", restarted)
    back = time.time()
    waiting = stack.call("GET", path)  # still unanswered once the new scheduler runs
    final = _finish(stack, launch)
    return {
        "asked": asked,
        "restarted": restarted,
        "back": back,
        "waiting": waiting,
        "answered": stack.call("GET", path),
        "final": final,
    }


@pytest.fixture(scope="module")
def phase_two(stack: AirflowStack, warehouse: sa.Engine, databases: dict[str, str]) -> Iterator[dict[str, Any]]:
    launches = _launch(
        stack, warehouse, {"s_trigger": ("v2", (), 200), "s_worker": ("v2", (), 200), "s_ask": ("v2", (), 200)}
    )
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="fault")
    drivers: dict[str, Future[dict[str, Any]]] = {
        "s_worker": pool.submit(
            _drive_worker_kill, stack, warehouse, databases["warehouse_name"], launches["s_worker"]
        ),
        "s_trigger": pool.submit(_drive_triggerer_restarts, stack, warehouse, launches["s_trigger"]),
        "s_ask": pool.submit(_drive_scheduler_kill, stack, launches["s_ask"]),
    }
    try:
        yield {"launches": launches, "drivers": drivers}
    finally:
        _stop_all(launches)
        pool.shutdown(wait=False, cancel_futures=True)


def _driven(phase_two: dict[str, Any], name: str) -> tuple[Launch, dict[str, Any]]:
    return phase_two["launches"][name], phase_two["drivers"][name].result(timeout=420)


def test_a_killed_celery_worker_s_task_is_retried_on_a_new_worker(
    stack: AirflowStack, warehouse: sa.Engine, phase_two: dict[str, Any]
) -> None:
    launch, out = _driven(phase_two, "s_worker")
    assert out["task_process_gone"], f"the task process {out['task_pid']} outlived its worker"
    assert out["final"] == "success", stack.states(launch.dag_id, launch.run_id)
    shift = stack.tasks(launch.dag_id, launch.run_id)["stage_2.shift_traffic"]
    assert shift["state"] == "success" and shift["try_number"] == 2, shift  # retried, once
    retried = _when(shift, "start_date").timestamp()
    assert retried > out["killed"]
    first = stack.call(
        "GET", f"/dags/{launch.dag_id}/dagRuns/{launch.run_id}/taskInstances/stage_2.shift_traffic/tries/1"
    )
    assert first["state"] == "failed", first  # failed by the scheduler: no heartbeat from the dead worker
    FIGURES["worker_kill"] = {
        "new_worker_ready_s": round(out["ready"] - out["killed"], 1),
        "retry_started_s_after_kill": round(retried - out["killed"], 1),
    }
    _assert_promoted(warehouse, launch)  # [20, 50, 100, 100]: the killed attempt wrote nothing
    with warehouse.connect() as conn:
        history = conn.execute(
            sa.select(traffic_history.c.to_percent, traffic_history.c.note).where(
                traffic_history.c.rollout_id == launch.rollout_id
            )
        ).all()
    assert all(r.to_percent is not None for r in history)
    assert sum("stage 2: canary to 50 %" in r.note for r in history) == 1, history  # recorded once
    FIGURES["faults"].append("kill -9 of the celery worker's process group (and its task) mid-shift: retried, promoted")


def test_a_triggerer_restarted_mid_bake_neither_shortens_the_bake_nor_misses_a_breach(
    stack: AirflowStack, warehouse: sa.Engine, phase_two: dict[str, Any]
) -> None:
    launch, out = _driven(phase_two, "s_trigger")
    tis = stack.tasks(launch.dag_id, launch.run_id)
    stage_1 = tis["stage_1.guardrails"]
    start_1 = _stage_start(warehouse, launch, 1)
    assert stage_1["state"] == "success", stage_1
    ended = _when(stage_1, "end_date")
    assert start_1.timestamp() < out["restart_1"] < ended.timestamp()  # the restart fell inside the bake
    assert ended >= start_1 + timedelta(seconds=30), f"stage 1 baked {(ended - start_1).total_seconds():.1f} s of 30"
    assert out["final"] == "failed"
    rollout = _assert_rolled_back(warehouse, launch)
    assert rollout.reason is not None and rollout.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert tis["stage_2.guardrails"]["state"] == "failed"
    with warehouse.connect() as conn:
        rolled_back_at = conn.execute(
            sa.select(sa.func.max(decisions.c.decided_at)).where(
                decisions.c.rollout_id == launch.rollout_id, decisions.c.action == "rollback"
            )
        ).scalar_one()
    caught = rolled_back_at.replace(tzinfo=UTC).timestamp()
    assert out["back_2"] <= out["injected"] < caught, out  # caught by the restarted triggerer, after the fault
    start_2 = _stage_start(warehouse, launch, 2).timestamp()
    assert caught < start_2 + 45, "the breach was not caught before the bake ended"
    FIGURES["triggerer_restarts"] = {
        "kill_9_back_s": round(out["back_1"] - out["restart_1"], 1),
        "sigterm_back_s": round(out["back_2"] - out["restart_2"], 1),
        "stage_1_baked_s": round((ended - start_1).total_seconds(), 1),
        "breach_caught_s_after_fault": round(caught - out["injected"], 1),
    }
    assert [p for p, _ in _applied(warehouse, launch.rollout_id)] == [20.0, 50.0, 0.0]
    FIGURES["faults"].append("kill -9 of the triggerer mid-bake (stage 1): the 30 s bake not shortened")
    FIGURES["faults"].append("SIGTERM of the triggerer mid-bake (stage 2), then latency: caught, rolled back")


def test_a_scheduler_killed_while_a_question_waits_leaves_it_to_its_timeout(
    stack: AirflowStack, warehouse: sa.Engine, phase_two: dict[str, Any]
) -> None:
    launch, out = _driven(phase_two, "s_ask")
    assert not out["asked"]["response_received"] and not out["waiting"]["response_received"]
    assert out["final"] == "failed"
    answered = out["answered"]
    assert answered["response_received"] and answered["chosen_options"] == ["Roll back"], answered
    assert answered["responded_by_user"] is None  # the default, not a person
    rollout = _assert_rolled_back(warehouse, launch)
    assert rollout.reason == f"Roll back chosen by default: no answer within {ASK_TIMEOUT} s", rollout.reason
    asked_at = datetime.fromisoformat(out["asked"]["created_at"])
    decided = datetime.fromisoformat(answered["responded_at"])
    assert decided >= asked_at + timedelta(seconds=ASK_TIMEOUT), (asked_at, decided)  # its timeout, not sooner
    assert out["restarted"] < decided.timestamp()
    FIGURES["scheduler_kill"] = {
        "back_s": round(out["back"] - out["restarted"], 1),
        "question_resolved_s_after_asked": round((decided - asked_at).total_seconds(), 1),
    }
    states = stack.states(launch.dag_id, launch.run_id)
    assert states["decide"] == "success" and states["promote"] == "skipped" and states["rollback"] == "success"
    assert [p for p, _ in _applied(warehouse, launch.rollout_id)] == [50.0, 0.0]
    FIGURES["faults"].append("kill -9 of the scheduler while a question waits: resolved by its timeout")


def test_the_worker_runs_a_pool_in_its_process_group(stack: AirflowStack) -> None:
    """``celery worker`` forks its pool into its own process group: what stop() ends with the group."""
    assert set(stack.procs) == {"api-server", "scheduler", "dag-processor", "triggerer", CELERY_WORKER}
    group = stack.procs[CELERY_WORKER].pid
    members = []
    for proc in stack.processes():
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(proc.pid) == group:
                members.append(proc)
    assert len(members) >= 2, members  # the worker and its prefork children
