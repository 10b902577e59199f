"""Rollout steps without Airflow: the start checks, the lock, guarded and idempotent traffic steps,
promotion, rollback, the end (finish) and abort."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from mlcanary import registry
from mlcanary import rollout as steps
from mlcanary.lifecycle import Status
from mlcanary.routers.base import Split, TrafficShiftError
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.schema import decisions, rollouts, traffic_history


class FlakyRouter(WarehouseRouter):
    """Fails the first ``failures`` writes; with ``lie`` it stores a different split than asked.
    Its routing table is not treated as the audit database's (no shared transaction)."""

    def __init__(self, engine: sa.Engine, failures: int = 0, lie: bool = False) -> None:
        super().__init__(engine)
        self.failures, self.lie, self.writes = failures, lie, 0

    def shares_database_with(self, engine: sa.Engine) -> bool:
        return False

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


def _row(engine: sa.Engine, rollout_id: str) -> steps.Rollout:
    with engine.connect() as conn:
        found = steps.get_rollout(conn, rollout_id)
    assert found is not None
    return found


def _serving(router: WarehouseRouter, spec: RolloutSpec, version: str = "v1") -> None:
    router.set_split(Split(spec.model, version, None, 0.0), None)


def test_the_baseline_is_the_version_serving(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    with pytest.raises(steps.RolloutError, match="pass baseline_version"):
        steps.begin_rollout(engine, router, spec, "r1", "v2")
    _serving(router, spec, "v2")
    with pytest.raises(steps.RolloutError, match=r"baseline v1 was asked for, but the router reports v2 serving"):
        steps.begin_rollout(engine, router, spec, "r1", "v3", "v1")
    with pytest.raises(steps.RolloutError, match="already serves all the traffic"):
        steps.begin_rollout(engine, router, spec, "r1", "v2")
    started = steps.begin_rollout(engine, router, spec, "r1", "v3")
    assert started.baseline_version == "v2" and started.status is Status.RUNNING and started.holds_lock
    assert started.spec is not None and started.spec["name"] == spec.name  # stored with the rollout
    assert router.get_split(spec.model) == Split(spec.model, "v2", None, 0.0)  # nothing written at the start
    assert _history(engine)[-1].note == "start: the router reports v2 100 %"


def test_a_leftover_canary_blocks_a_start(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    router.set_split(Split(spec.model, "v1", "v5", 50.0), "rollout__old/run-7")
    with pytest.raises(
        steps.RolloutError,
        match=r"a canary still has traffic: v1 50 %, v5 50 % \(set by rollout__old/run-7\), left by rollout__old/run-7",
    ):
        steps.begin_rollout(engine, router, spec, "r1", "v2")
    router.set_split(Split(spec.model, "v1", "v5", 0.0), "rollout__old/run-7")  # rolled back: at 0 % it is fine
    assert steps.begin_rollout(engine, router, spec, "r1", "v2").baseline_version == "v1"


def test_a_rejected_candidate_needs_a_reason(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    first = steps.begin_rollout(engine, router, spec, "r1", "v4")
    steps.shift_to_stage(engine, router, spec, first, 1)
    steps.rollback(engine, router, first, "analysis: ctr fell 0.24 → 0.17")
    steps.finish(engine, router, first)
    with pytest.raises(steps.RolloutError, match=r"v4 was rolled back before \(r1: analysis: ctr fell"):
        steps.begin_rollout(engine, router, spec, "r2", "v4")
    assert steps.begin_rollout(engine, router, spec, "r2-dry", "v4", dry_run=True).dry_run  # a dry run is harmless
    steps.finish(engine, router, _row(engine, "r2-dry"))
    again = steps.begin_rollout(engine, router, spec, "r3", "v4", force_reason="the CTR join was fixed")
    with engine.connect() as conn:
        forced = conn.execute(sa.select(decisions).where(decisions.c.action == "force")).one()
        entry = registry.get(conn, spec.model, "v4")
    assert forced.rollout_id == again.rollout_id and "the CTR join was fixed" in forced.reason
    assert entry is not None and entry.status == "rolling_out"


def test_one_active_rollout_per_model(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    first = steps.begin_rollout(engine, router, spec, "dag/run-1", "v2")
    with pytest.raises(steps.RolloutError, match=r"already has an active rollout: dag/run-1"):
        steps.begin_rollout(engine, router, spec, "dag/run-2", "v3")
    assert steps.begin_rollout(engine, router, spec, "dag/run-1", "v2").rollout_id == "dag/run-1"  # a retry
    steps.shift_to_stage(engine, router, spec, first, 1)
    steps.rollback(engine, router, first, "test")
    assert steps.finish(engine, router, first).released
    with pytest.raises(steps.RolloutError, match="this run's rollout already ended"):  # a cleared start
        steps.begin_rollout(engine, router, spec, "dag/run-1", "v2")
    assert steps.begin_rollout(engine, router, spec, "dag/run-3", "v3").baseline_version == "v1"


def test_an_ended_rollout_changes_no_traffic(engine: sa.Engine, spec: RolloutSpec) -> None:
    """Run A promoted v2; run B promoted v3; A's cleared tasks must not touch B's split."""
    router = WarehouseRouter(engine)
    _serving(router, spec)
    a = steps.begin_rollout(engine, router, spec, "dag/A", "v2")
    steps.shift_to_stage(engine, router, spec, a, 1)
    steps.promote(engine, router, a, "ok")
    steps.finish(engine, router, a)
    b = steps.begin_rollout(engine, router, spec, "dag/B", "v3")
    steps.shift_to_stage(engine, router, spec, b, 2)
    steps.promote(engine, router, b, "ok")
    steps.finish(engine, router, b)
    final = router.get_split(spec.model)
    with pytest.raises(steps.StepRefused, match="no longer holds its model's lock"):
        steps.shift_to_stage(engine, router, spec, a, 1)
    with pytest.raises(steps.StepRefused, match="was promoted"):
        steps.rollback(engine, router, a, "cleared")
    assert router.get_split(spec.model) == final == Split(spec.model, "v3", None, 0.0)
    with engine.connect() as conn:
        assert registry.get(conn, spec.model, "v3").status == "baseline"  # type: ignore[union-attr]


def test_a_step_changes_only_its_own_split(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, r, 1)
    router.set_split(Split(spec.model, "v1", "v2", 50.0), "someone-else")  # changed behind the rollout's back
    with pytest.raises(steps.StepRefused, match="which this rollout did not set"):
        steps.shift_to_stage(engine, router, spec, r, 2)
    with pytest.raises(steps.StepRefused, match="which this rollout did not set"):
        steps.rollback(engine, router, r, "breach")
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 50.0)
    assert _history(engine)[-1].note.startswith(
        "REFUSED rollback: canary to 0 %: the router reports v1 50 %, v2 50 % (set by someone-else)"
    )
    router.set_split(Split(spec.model, "v1", "v9", 30.0), "someone-else")  # another canary: ours has no traffic
    done = steps.rollback(engine, router, r, "breach")
    assert done.records.note == "rollback: canary to 0 % (already in force)"
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v9", 30.0)  # not ours: untouched


def test_a_rollback_whose_records_were_lost_is_not_undone_by_a_later_step(engine: sa.Engine, spec: RolloutSpec) -> None:
    """The triggerer set the canary to 0 % and could not record it (the warehouse was down): the row
    still says running at stage 1. A person's Approve (the next shift) or a promotion, resumed
    afterwards, must not bring the canary back."""
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, r, 1)
    router.set_split(Split(spec.model, "v1", "v2", 0.0), "r")  # the rollback's write; its records lost
    assert _row(engine, "r").status.value == "running" and _row(engine, "r").canary_percent == 10.0
    with pytest.raises(steps.StepRefused, match="it was rolled back"):
        steps.shift_to_stage(engine, router, spec, r, 2)
    with pytest.raises(steps.StepRefused, match="it was rolled back"):
        steps.promote(engine, router, r, "approved")
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 0.0)


def test_shift_is_idempotent_and_recorded_once(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    writes = router.writes
    steps.shift_to_stage(engine, router, spec, r, 2)
    steps.shift_to_stage(engine, router, spec, r, 2)  # an Airflow retry of the same step
    assert router.writes == writes + 1
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 30.0)
    history = _history(engine)[1:]
    assert [(h.to_percent, h.applied) for h in history] == [(30.0, True), (30.0, False)]
    assert "already in force" in history[1].note
    with engine.connect() as conn:  # the retry decided nothing new
        advances = conn.execute(sa.select(decisions).where(decisions.c.action == "advance")).all()
    assert len(advances) == 1


def test_a_step_applied_but_not_recorded_says_so_on_the_retry(engine: sa.Engine, spec: RolloutSpec) -> None:
    """An attempt killed between the router's write and its records: the retry must not say
    "already in force" (it was this rollout that changed it)."""
    router = FlakyRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    router.set_split(Split(spec.model, "v1", "v2", 10.0), "r")  # what the killed attempt did
    steps.shift_to_stage(engine, router, spec, r, 1)
    last = _history(engine)[-1]
    assert last.applied and (last.from_percent, last.to_percent) == (0.0, 10.0)
    assert last.note == "stage 1: canary to 10 % (applied by an earlier attempt, whose record was lost)"


def test_the_warehouse_router_writes_the_split_and_its_records_in_one_transaction(
    engine: sa.Engine, spec: RolloutSpec
) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    with engine.begin() as conn:  # a real fault: the history table refuses writes
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON mlcanary_traffic_history "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    with pytest.raises(sa.exc.IntegrityError, match="disk full"):
        steps.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)  # the split went back with it
    assert _row(engine, "r").stage_reached == 0


def test_failed_shift_raises_and_a_retry_lands(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    router.failures = 1
    with pytest.raises(TrafficShiftError, match="serving platform unavailable"):
        steps.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)  # known, unchanged
    failed = _history(engine)[-1]  # the failure is recorded with the split the platform reports after it
    assert not failed.applied and failed.to_percent == 0.0
    assert failed.note.startswith("FAILED stage 1: canary to 10 %: ConnectionError: serving platform unavailable")
    assert failed.note.endswith("the platform reports v1 100 %")
    steps.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model).share("v2") == 10.0  # type: ignore[union-attr]


def test_a_split_that_does_not_read_back_is_an_error(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine, lie=True)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    with pytest.raises(TrafficShiftError, match="reads back"):
        steps.shift_to_stage(engine, router, spec, r, 1)


def test_promote_and_rollback_end_states(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r1", "v2")
    steps.shift_to_stage(engine, router, spec, r, 3)
    steps.promote(engine, router, r, "ok")
    split = router.get_split(spec.model)
    assert split is not None and split.share("v2") == 100.0 and split.baseline_version == "v2"
    assert split.owner == "r1"
    done = steps.finish(engine, router, r)
    assert done.released and done.rollout.status is Status.PROMOTED and not done.rollout.holds_lock
    r2 = steps.begin_rollout(engine, router, spec, "r2", "v3")
    assert r2.baseline_version == "v2"
    steps.shift_to_stage(engine, router, spec, r2, 1)
    steps.rollback(engine, router, r2, "p99 breach")
    again = steps.rollback(engine, router, r2, "an upstream task failed")  # the teardown after the sensor
    assert again.records.note == "rollback: canary to 0 % (already in force)" and not again.records.applied
    ended = steps.finish(engine, router, r2)
    assert router.get_split(spec.model).share("v3") == 0.0  # type: ignore[union-attr]
    assert ended.rollout.status is Status.ROLLED_BACK and ended.rollout.reason == "p99 breach"
    with engine.connect() as conn:
        assert conn.execute(sa.select(rollouts.c.active_model).where(rollouts.c.active_model.is_not(None))).all() == []
        assert registry.get(conn, spec.model, "v3").status == "rejected"  # type: ignore[union-attr]
        rollbacks = conn.execute(sa.select(decisions).where(decisions.c.action == "rollback")).all()
    assert [d.reason for d in rollbacks] == ["p99 breach"]  # decided once


def test_a_failed_rollback_keeps_the_lock(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = FlakyRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, r, 2)
    router.failures = 10
    with pytest.raises(TrafficShiftError):
        steps.rollback(engine, router, r, "breach")
    assert _row(engine, "r").status is Status.ROLLING_BACK  # no later task goes on
    ended = steps.finish(engine, router, r)
    assert not ended.released and ended.rollout.status is Status.ROLLBACK_FAILED and ended.rollout.holds_lock
    assert ended.state.problem == "the canary still has traffic: v1 70 %, v2 30 % (set by r)"
    with pytest.raises(
        steps.RolloutError, match=r"locked by r, which ended rollback_failed.*mlcanary abort --rollout r"
    ):
        steps.begin_rollout(engine, router, spec, "r-next", "v3")
    router.failures = 0  # the platform is back: a person aborts
    aborted = steps.abort(engine, router, "r", "router fixed, rolling back", by="oncall")
    assert aborted.released and aborted.rollout.status is Status.ROLLED_BACK
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 0.0)
    with engine.connect() as conn:
        abort = conn.execute(sa.select(decisions).where(decisions.c.action == "abort")).one()
    assert abort.reason == "aborted by oncall: router fixed, rolling back"


def test_a_promotion_the_platform_reverted_is_not_an_all_clear(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2")
    steps.shift_to_stage(engine, router, spec, r, 1)
    steps.promote(engine, router, r, "ok")
    router.set_split(Split(spec.model, "v1", None, 0.0), "platform-revert")  # the platform went back
    ended = steps.finish(engine, router, r)
    assert not ended.released and ended.rollout.status is Status.SPLIT_MISMATCH
    assert ended.state.problem == "v2 was promoted, but the platform reports v1 100 % (set by platform-revert)"
    steps.abort(engine, router, "r", "the platform kept v1", by="oncall")
    with engine.connect() as conn:
        assert registry.get(conn, spec.model, "v1").status == "baseline"  # type: ignore[union-attr]
        assert registry.get(conn, spec.model, "v2").status == "rejected"  # type: ignore[union-attr]
    assert not _row(engine, "r").holds_lock


def test_dry_run_changes_no_traffic(engine: sa.Engine, spec: RolloutSpec) -> None:
    router = WarehouseRouter(engine)
    _serving(router, spec)
    r = steps.begin_rollout(engine, router, spec, "r", "v2", dry_run=True)
    steps.shift_to_stage(engine, router, spec, r, 2)
    steps.rollback(engine, router, r, "test")
    assert steps.finish(engine, router, r).released
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)
    assert all(not h.applied for h in _history(engine))
    assert all("dry run" in h.note for h in _history(engine)[1:-1])
