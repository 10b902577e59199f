"""The guardrail trigger on its own, run the way dag.test() runs it: the first event of run()."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import time
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.spec import parse_spec
from mlcanary.warehouse.schema import measurements
from mlcanary_airflow.triggers import GuardrailTrigger

GUARDRAIL = measurements.c.tier == "guardrail"  # the polls' rows, not the background looks'


def _trigger(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bake: float,
    limit: float,
    started_ago: float = 120,
    **guardrails: Any,
) -> GuardrailTrigger:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")})
    )
    stages = [{"percent": 20, "bake": "4s"}, {"percent": 60, "bake": "4s"}]  # write_batch's split: 20 % canary
    spec = parse_spec(base_spec(stages=stages, guardrails={**base_spec()["guardrails"], **guardrails}))
    return GuardrailTrigger(
        spec=spec.model_dump(mode="json", by_alias=True),
        rollout_id="r",
        stage=1,
        baseline_version="v1",
        canary_version="v2",
        bake_seconds=bake,
        deadline_epoch=time.time() + limit,
        stage_started_epoch=time.time() - started_ago,
    )


def _first_event(trigger: GuardrailTrigger) -> dict:
    classpath, kwargs = trigger.serialize()  # rebuilt from its serialized form, as a triggerer does
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    return asyncio.run(anext(rebuilt.run())).payload


def _polls(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count(sa.distinct(measurements.c.measured_at))).where(GUARDRAIL)).scalar()


def test_no_data_never_bakes_and_the_deadline_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    started = time.monotonic()
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=3))
    assert event["status"] == "timeout"
    assert "deadline passed with 0 s of 1 s baked healthy" in event["reason"]
    assert "no data" in event["reason"]
    assert 2 <= time.monotonic() - started < 6
    assert _polls(engine) == event["polls"] >= 3


def test_breach_ends_at_the_first_failing_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    started = time.monotonic()
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=30, limit=60))
    assert event["status"] == "breach" and event["polls"] == 1
    assert event["reason"].startswith("p99_latency_ms")
    assert time.monotonic() - started < 3


def test_healthy_after_a_full_bake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    from datetime import timedelta

    from mlcanary.warehouse.engine import utcnow

    # traffic up to 30 s ahead, so the sliding window keeps seeing requests while the stage bakes
    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=2, limit=20))
    assert event["status"] == "healthy"
    assert event["healthy_seconds"] >= 2 and event["polls"] >= 3
    with engine.connect() as conn:  # every poll is audited with its values, sample sizes and limits
        rows = conn.execute(sa.select(measurements).where(GUARDRAIL)).all()
    assert len(rows) == 5 * event["polls"]  # four limits and the sample ratio
    assert {r.check_name for r in rows if r.verdict == "PASS"} >= {"sample_ratio"}
    for r in (r for r in rows if r.check_name != "sample_ratio"):  # its counts are the stage's
        assert (r.tier, r.stage, r.rollout_id, r.verdict) == ("guardrail", 1, "r", "PASS")
        assert r.canary_n > 0 and r.baseline_n > 0 and r.threshold is not None
        if r.check_name in ("success_rate", "p99_latency_ms"):
            assert r.baseline_n > r.canary_n  # requests: the baseline has 80 % of the traffic
        assert r.canary_value is not None and r.baseline_value is not None
        assert (r.window_end - r.window_start).total_seconds() == 4.0 and r.reason


def test_no_data_fails_after_the_limit_under_policy_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=30, no_data_limit=3, no_data_policy="fail"))
    assert event["status"] == "no_data" and event["polls"] == 3
    assert event["reason"].startswith("3 polls in a row without enough data (success_rate, p99_latency_ms")
    assert _polls(engine) == 3


def test_no_data_holds_until_the_deadline_under_policy_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=1, limit=3, no_data_limit=1, no_data_policy="hold"))
    assert event["status"] == "timeout" and event["polls"] >= 3


def test_source_errors_are_retried_then_fail_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    """Prometheus unreachable: each error is recorded, retried, and the 4th in a row fails the stage."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9})
    )
    queries = {"requests": "sum(r)", "failures": "sum(f)", "p99_latency_ms": "p", "cpu": "c", "memory": "m"}
    started = time.monotonic()
    event = _first_event(
        _trigger(tmp_path, monkeypatch, bake=1, limit=60, source={"kind": "prometheus", "queries": queries})
    )
    assert event["status"] == "error" and event["polls"] == 4
    assert "metric source error 4 of 4 in a row" in event["reason"] and "unreachable" in event["reason"]
    assert time.monotonic() - started < 10  # retried after 1, 1, 1 s (the interval caps the backoff)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(measurements).where(GUARDRAIL).order_by(measurements.c.id)).all()
    assert [(r.check_name, r.verdict) for r in rows] == [("metric_source", "INVALID")] * 4
    assert rows[0].reason.startswith("metric source error 1 of 4 in a row: MetricSourceError: Prometheus at")


class SteppingClock:
    """A fake clock for the trigger: each sleep passes at once; the wall clock steps by ``steps[k]``
    (seconds, forward or back) on the k-th sleep, the monotonic clock never steps."""

    def __init__(self, steps: dict[int, float] | None = None, stop_at: int | None = None) -> None:
        self.w, self.m, self.sleeps = time.time(), 1000.0, 0
        self.steps, self.stop_at = steps or {}, stop_at

    def wall(self) -> float:
        return self.w

    def monotonic(self) -> float:
        return self.m

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.sleeps == self.stop_at:
            raise TriggererStopped  # the triggerer process dies here
        self.w += seconds + self.steps.get(self.sleeps, 0.0)
        self.m += seconds
        await asyncio.sleep(0)


class TriggererStopped(Exception):
    pass


def _use(clock: SteppingClock, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlcanary_airflow import triggers

    monkeypatch.setattr(triggers, "CLOCK", triggers.Clock(clock.wall, clock.monotonic, clock.sleep))


@pytest.mark.parametrize("step", [600.0, -600.0])
def test_a_clock_that_steps_neither_shortens_nor_stretches_the_bake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer, step: float
) -> None:
    """A 10-minute step of the wall clock (forward or back) on the 3rd poll: the 30 s bake still
    takes 30 s of monotonic time, one poll a second."""
    from datetime import timedelta

    from mlcanary.warehouse.engine import utcnow

    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    clock = SteppingClock({3: step})
    _use(clock, monkeypatch)
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=30, limit=3600))
    assert event["status"] == "healthy"
    assert 30 <= event["healthy_seconds"] < 31.5
    assert 31 <= event["polls"] <= 33
    assert clock.m - 1000.0 == pytest.approx(event["healthy_seconds"], abs=1.5)


def test_the_deadline_is_the_wall_clocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """The absolute deadline is a wall-clock moment: a step past it ends the watch at that poll."""
    from datetime import timedelta

    from mlcanary.warehouse.engine import utcnow

    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    _use(SteppingClock({4: 4000.0}), monkeypatch)
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=30, limit=3600))
    assert event["status"] == "timeout" and event["polls"] == 4
    assert event["reason"].startswith("deadline passed with 3 s of 30 s baked healthy")


def test_a_restarted_trigger_goes_on_from_its_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """The triggerer dies after 6 polls of a 10 s bake; the trigger rebuilt from its serialized form
    (as another triggerer does) loads the counters and bakes only what is left, then clears them."""
    from datetime import timedelta

    from mlcanary import progress
    from mlcanary.warehouse.engine import utcnow

    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    trigger = _trigger(tmp_path, monkeypatch, bake=10, limit=3600)
    _use(SteppingClock(stop_at=7), monkeypatch)  # the first sleep is the wait for the first poll
    with pytest.raises(TriggererStopped):
        _first_event(trigger)
    with engine.connect() as conn:
        saved = progress.load(conn, "r", "guardrails:stage_1")
    assert saved is not None and saved["polls"] == 6 and saved["healthy_seconds"] == 5.0
    _use(SteppingClock(), monkeypatch)
    event = _first_event(trigger)
    assert event["status"] == "healthy" and event["healthy_seconds"] >= 10
    assert event["polls"] == 6 + 6  # a new stretch of 5 s: the bake lost one interval, it gained none
    assert _polls(engine) == event["polls"]
    with engine.connect() as conn:
        assert progress.load(conn, "r", "guardrails:stage_1") is None  # a cleared task starts afresh


def test_the_window_starts_at_the_stages_shift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """A minute of slow canary traffic from the stage before: the new stage's first poll, one
    interval after its shift, does not see it (no data yet), and no window reaches back before it."""
    from datetime import datetime

    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    trigger = _trigger(tmp_path, monkeypatch, bake=30, limit=2.5, started_ago=0)
    shifted = datetime.fromtimestamp(trigger.stage_started_epoch or 0, UTC).replace(tzinfo=None)
    event = _first_event(trigger)
    assert event["status"] == "timeout" and "no data" in event["reason"]
    with engine.connect() as conn:
        starts = conn.execute(sa.select(measurements.c.window_start).where(GUARDRAIL)).scalars().all()
    assert starts and min(starts) >= shifted.replace(microsecond=0)


def test_a_hung_source_delays_no_other_rollouts_breach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """Two rollouts' triggers on one triggerer: one metric source hangs; the other rollout's breach
    is caught at its first poll all the same, and the hung one fails closed after its poll limit."""
    import threading

    from mlcanary_airflow import triggers

    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    release = threading.Event()
    real = triggers.metric_source

    class Hung:
        def measure(self, *args: Any) -> Any:
            release.wait(60)
            raise RuntimeError("released")

    monkeypatch.setattr(triggers, "metric_source", lambda spec: Hung() if spec.name == "hung" else real(spec))
    breaching = _trigger(tmp_path, monkeypatch, bake=30, limit=60)
    hung = _trigger(tmp_path, monkeypatch, bake=30, limit=60, error_limit=1)
    hung.spec = {**hung.spec, "name": "hung"}

    async def both() -> tuple[dict, float, dict, float]:
        started = time.monotonic()
        waiting = asyncio.ensure_future(anext(hung.run()))
        await asyncio.sleep(0.2)  # the hung poll has started
        caught = (await anext(breaching.run())).payload
        caught_after = time.monotonic() - started
        failed = (await waiting).payload
        failed_after = time.monotonic() - started
        release.set()  # before the loop closes: it waits for its threads
        return caught, caught_after, failed, failed_after

    try:
        caught, caught_after, failed, failed_after = asyncio.run(both())
    finally:
        release.set()
    assert caught["status"] == "breach" and caught_after < 2
    assert failed["status"] == "error" and "poll took longer than 5 s" in failed["reason"]
    assert 5 <= failed_after < 8


def test_a_breach_is_rolled_back_by_the_trigger_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """The canary is at 0 % when the event leaves the triggerer: the task, resumed seconds later,
    only confirms (its worker slot and process start are not on the rollback's path)."""
    from mlcanary import rollout as steps
    from mlcanary.routers.base import Split
    from mlcanary.routers.warehouse import WarehouseRouter

    trigger = _trigger(tmp_path, monkeypatch, bake=30, limit=60)
    spec = parse_spec(trigger.spec)
    router = WarehouseRouter(engine)
    router.set_split(Split(spec.model, "v1", None, 0.0), None)
    rollout = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, rollout.ref, 1)
    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    event = _first_event(trigger)
    assert event["status"] == "breach"
    done = event["rolled_back"]
    assert done["reason"].startswith("guardrails stage 1 breach: p99_latency_ms") and "error" not in done
    assert done["pending"] is None  # recorded: nothing left for the report
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 0.0)
    with engine.connect() as conn:
        row = steps.get_rollout(conn, "r")
    assert row is not None and row.status.value == "rolled_back" and row.holds_lock  # report releases it


def test_a_split_mismatch_rolls_back_under_the_invalid_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """The stage's split says 20 %, the canary really gets 5 %: INVALID, and the spec's invalid
    policy (rollback, the default) ends the watch."""
    write_batch(engine, minutes=1.5, rate=200, canary_percent=5)
    event = _first_event(_trigger(tmp_path, monkeypatch, bake=30, limit=60))
    assert event["status"] == "invalid" and event["polls"] == 1
    assert event["reason"].startswith("traffic split mismatch: configured 20 %, observed ")
    observed = float(event["reason"].split("observed ")[1].split(" %")[0])
    assert 3 < observed < 7


def _running_rollout(engine: sa.Engine, spec: Any, started_ago: timedelta) -> Any:
    """Rollout ``r`` at stage 1 (20 %), recorded as started ``started_ago``: its analysis window
    covers the traffic written for it."""
    from mlcanary import rollout as steps
    from mlcanary.routers.base import Split
    from mlcanary.routers.warehouse import WarehouseRouter
    from mlcanary.warehouse.schema import rollouts

    router = WarehouseRouter(engine)
    router.set_split(Split(spec.model, "v1", None, 0.0), None)
    rollout = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, rollout.ref, 1)
    with engine.begin() as conn:
        conn.execute(sa.update(rollouts).values(started_at=rollout.started_at - started_ago))
    return router


@pytest.mark.parametrize("consecutive_fails", [1, 2])
def test_a_ctr_collapse_ends_a_long_bake_at_the_background_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer, consecutive_fails: int
) -> None:
    """Infrastructure healthy, CTR halved: the slow tier looks every analysis interval (2 s) while
    the guardrails poll, and ``consecutive_fails`` failing looks end a 60 s bake and roll back."""
    from mlcanary.routers.base import Split
    from mlcanary.warehouse.engine import utcnow

    trigger = _trigger(tmp_path, monkeypatch, bake=60, limit=90)
    data = parse_spec(trigger.spec).model_dump(mode="json", by_alias=True)
    data["analysis"]["consecutive_fails"] = consecutive_fails
    trigger.spec = data
    spec = parse_spec(data)
    router = _running_rollout(engine, spec, timedelta(minutes=11))
    write_batch(engine, minutes=10.5, rate=50, faults=("v2:ctr_drop=0.5",), end=utcnow() + timedelta(seconds=30))
    started = time.monotonic()
    event = _first_event(trigger)
    took = time.monotonic() - started
    assert event["status"] == "analysis_fail", event
    assert (event["looks"], event["look_fails"]) == (consecutive_fails, consecutive_fails)
    assert event["reason"].startswith(f"failing look {consecutive_fails} of {consecutive_fails} during the bake: ")
    assert "ctr" in event["reason"] and event["polls"] >= 2 * consecutive_fails - 1  # the guardrails polled meanwhile
    assert 2 * consecutive_fails - 1 < took < 2 * consecutive_fails + 8  # looks at 2 s, 4 s; far from the 60 s bake
    done = event["rolled_back"]
    assert done["reason"].startswith(f"analysis stage 1: failing look {consecutive_fails} of {consecutive_fails}")
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 0.0)
    with engine.connect() as conn:
        looks = conn.execute(
            sa.select(sa.func.count(sa.distinct(measurements.c.measured_at))).where(measurements.c.tier == "analysis")
        ).scalar_one()
        failed = conn.execute(
            sa.select(sa.func.count()).where(
                measurements.c.tier == "analysis", measurements.c.check_name == "ctr", measurements.c.verdict == "FAIL"
            )
        ).scalar_one()
    assert looks == consecutive_fails and failed >= consecutive_fails  # every look is audited


def test_healthy_looks_never_end_the_bake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    from mlcanary.warehouse.engine import utcnow

    trigger = _trigger(tmp_path, monkeypatch, bake=5, limit=30)
    _running_rollout(engine, parse_spec(trigger.spec), timedelta(minutes=11))
    write_batch(engine, minutes=10.5, rate=50, end=utcnow() + timedelta(seconds=30))
    event = _first_event(trigger)
    assert event["status"] == "healthy" and event["healthy_seconds"] >= 5
    assert event["looks"] >= 2 and event["look_fails"] == 0


def test_each_poll_is_one_short_line_and_the_event_is_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    """What the guardrails task's log shows while it waits (a trigger's log lines go to its task's log):
    one line per poll with each check's value against its limit, a breach at warning level; and the
    event the triggerer logs ("Trigger fired event") is a few hundred bytes, not every poll's detail."""
    from datetime import timedelta

    from mlcanary.warehouse.engine import utcnow

    write_batch(engine, minutes=1.5, rate=200, end=utcnow() + timedelta(seconds=30))
    trigger = _trigger(tmp_path, monkeypatch, bake=2, limit=20)
    said: list[tuple[str, str]] = []
    monkeypatch.setattr(type(trigger), "log", _Recorder(said), raising=False)
    event = asyncio.run(anext(trigger.run())).payload
    polls = [(level, m) for level, m in said if m.startswith("poll ")]
    assert len(polls) == event["polls"] >= 3
    assert polls[0][0] == "info" and polls[0][1].startswith("poll 1 (stage 1, 20 %, 0 s of 2 s healthy): success_rate ")
    assert polls[-1][1].startswith(f"poll {event['polls']} (stage 1, 20 %, 2 s of 2 s healthy): ")
    for _, line in polls:
        assert re.search(r"p99_latency_ms [\d.]+ ms < 250\.0 ms ok; cpu [\d.]+ % < 90\.00 % ok; memory ", line)
        assert "(n=" not in line and len(line) < 300
    assert "result" not in event and len(json.dumps(event)) < 700

    said.clear()
    write_batch(engine, minutes=1, rate=200, faults=("v2:latency_ms=400",))
    breach = asyncio.run(anext(_trigger(tmp_path, monkeypatch, bake=30, limit=60).run())).payload
    level, line = next((lv, m) for lv, m in said if m.startswith("poll "))
    assert level == "warning" and re.search(r"p99_latency_ms [\d.]+ ms >= 250\.0 ms FAIL", line), line
    assert breach["status"] == "breach" and len(json.dumps(breach)) < 1000


class _Recorder:
    """A logger that keeps (level, message) of every line."""

    def __init__(self, said: list[tuple[str, str]]) -> None:
        self.said = said

    def __get__(self, obj: Any, owner: Any) -> _Recorder:
        return self

    def _at(self, level: str) -> Any:
        return lambda msg, *args, **_: self.said.append((level, msg % args if args else msg))

    def __getattr__(self, name: str) -> Any:
        return self._at(name)
