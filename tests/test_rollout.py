"""Rollout lifecycle without Airflow: the lock, idempotent and verified traffic steps, promote, rollback."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from mlcanary import rollout as lifecycle
from mlcanary.routers.base import Split, TrafficShiftError
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.schema import rollouts, traffic_history


class FlakyRouter(WarehouseRouter):
    """Fails the first ``failures`` writes; with ``lie`` it stores a different split than asked."""

    def __init__(self, engine: sa.Engine, failures: int = 0, lie: bool = False) -> None:
        super().__init__(engine)
        self.failures, self.lie, self.writes = failures, lie, 0

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        self.writes += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("serving platform unavailable")
        if self.lie:
            split = Split(split.model, split.baseline_version, split.canary_version, split.canary_percent / 2)
        super().set_split(split, rollout_id)


def _history(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.select(traffic_history).order_by(traffic_history.c.id)).all()


def test_first_rollout_needs_a_baseline(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    with pytest.raises(lifecycle.RolloutError, match="pass baseline_version"):
        lifecycle.begin_rollout(engine, router, spec, "r1", "v2")
    started = lifecycle.begin_rollout(engine, router, spec, "r1", "v2", "v1")
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)
    assert started.status == "running"
    with pytest.raises(lifecycle.RolloutError, match="same version"):
        lifecycle.begin_rollout(engine, router, spec, "r2", "v1", "v1")


def test_one_active_rollout_per_model(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    first = lifecycle.begin_rollout(engine, router, spec, "dag/run-1", "v2", "v1")
    lifecycle.shift_to_stage(engine, router, spec, first, 1)
    before = router.get_split(spec.model)
    with pytest.raises(lifecycle.RolloutError, match=r"already has an active rollout: dag/run-1"):
        lifecycle.begin_rollout(engine, router, spec, "dag/run-2", "v3")
    assert router.get_split(spec.model) == before  # the second trigger touched no traffic
    assert lifecycle.begin_rollout(engine, router, spec, "dag/run-1", "v2").rollout_id == "dag/run-1"
    lifecycle.release(engine, "dag/run-1", "test")
    assert lifecycle.begin_rollout(engine, router, spec, "dag/run-3", "v3").baseline_version == "v1"


def test_shift_is_idempotent_and_recorded(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine)
    r = lifecycle.begin_rollout(engine, router, spec, "r", "v2", "v1")
    writes = router.writes
    lifecycle.shift_to_stage(engine, router, spec, r, 2)
    lifecycle.shift_to_stage(engine, router, spec, r, 2)  # an Airflow retry of the same step
    assert router.writes == writes + 1
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 30.0)
    history = _history(engine)
    assert [(h.to_percent, h.applied) for h in history] == [(30.0, True), (30.0, False)]
    assert "already in force" in history[1].note


def test_failed_shift_raises_and_a_retry_lands(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine)
    r = lifecycle.begin_rollout(engine, router, spec, "r", "v2", "v1")
    router.failures = 1
    with pytest.raises(TrafficShiftError, match="serving platform unavailable"):
        lifecycle.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)  # known, unchanged
    failed = _history(engine)[-1]  # the failure is recorded with the split the platform reports after it
    assert not failed.applied and failed.to_percent == 0.0
    assert failed.note.startswith("FAILED stage 1: canary to 10 %: ConnectionError: serving platform unavailable")
    assert failed.note.endswith("the platform reports v1 100 %")
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model).share("v2") == 10.0


def test_a_split_that_does_not_read_back_is_an_error(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine, lie=True)
    r = lifecycle.begin_rollout(engine, router, spec, "r", "v2", "v1")
    with pytest.raises(TrafficShiftError, match="reads back"):
        lifecycle.shift_to_stage(engine, router, spec, r, 1)


def test_promote_and_rollback_end_states(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    r = lifecycle.begin_rollout(engine, router, spec, "r1", "v2", "v1")
    lifecycle.shift_to_stage(engine, router, spec, r, 3)
    lifecycle.promote(engine, router, spec, r, "ok")
    split = router.get_split(spec.model)
    assert split.share("v2") == 100.0 and split.baseline_version == "v2"
    lifecycle.release(engine, "r1", "unused")
    r2 = lifecycle.begin_rollout(engine, router, spec, "r2", "v3")
    assert r2.baseline_version == "v2"
    lifecycle.shift_to_stage(engine, router, spec, r2, 1)
    lifecycle.rollback(engine, router, spec, r2, "p99 breach")
    assert router.get_split(spec.model).share("v3") == 0.0
    ended = lifecycle.release(engine, "r2", "unused")
    assert ended.status == "rolled_back" and ended.reason == "p99 breach"
    with engine.connect() as conn:
        assert conn.execute(sa.select(rollouts.c.active_model).where(rollouts.c.active_model.is_not(None))).all() == []


def test_dry_run_changes_no_traffic(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    router.set_split(Split(spec.model, "v1", None, 0.0), None)
    r = lifecycle.begin_rollout(engine, router, spec, "r", "v2", dry_run=True)
    lifecycle.shift_to_stage(engine, router, spec, r, 2)
    lifecycle.rollback(engine, router, spec, r, "test")
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)
    assert all(not h.applied and "dry run" in h.note for h in _history(engine))
