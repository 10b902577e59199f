"""The DAG factory: every example loads, a broken spec takes only its own DAG down, parsing is offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import TriggerRule
from airflow.sdk.definitions.param import ParamsDict

from conftest import ROOT, base_spec
from mlcanary.spec import load_spec, parse_spec
from mlcanary_airflow import snapshots
from mlcanary_airflow.dag_factory import SpecWarning, build_dag, build_dags
from mlcanary_airflow.sensors import GuardrailSensor


def _bag(monkeypatch: pytest.MonkeyPatch, spec_dir: Path | None = None) -> DagBag:
    if spec_dir is not None:
        monkeypatch.setenv("MLCANARY_SPEC_DIR", str(spec_dir))
    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_loads_every_example_without_import_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    bag = _bag(monkeypatch)
    assert bag.import_errors == {}
    expected = {f"rollout__{p.stem}" for p in (ROOT / "include/rollouts").glob("*.yaml")}
    assert set(bag.dag_ids) == expected | {"mlcanary_watchdog", "posthoc__feed_ranker"}
    watchdog = bag.dags["mlcanary_watchdog"]
    assert not watchdog.is_paused_upon_creation and watchdog.max_active_runs == 1


def test_a_broken_spec_leaves_only_its_own_dag_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "good_one.yaml").write_text(yaml.safe_dump(base_spec(name="good_one")))
    (tmp_path / "good_two.yaml").write_text(yaml.safe_dump(base_spec(name="good_two", model="m2")))
    broken = base_spec(name="broken")
    broken["guardrails"] = {**broken["guardrails"], "cpu_max": 7}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bag = _bag(monkeypatch, tmp_path)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"rollout__good_one", "rollout__good_two", "mlcanary_watchdog"}
    with pytest.warns(SpecWarning) as caught:
        build_dags(tmp_path)
    text = str(caught[0].message)
    assert f"{tmp_path / 'broken.yaml'}: guardrails.cpu_max:" in text


def test_parsing_touches_no_database_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("DAG parsing tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sqlalchemy, "create_engine", refuse)
    monkeypatch.setattr("mlcanary.warehouse.engine.sa.create_engine", refuse)
    dags = build_dags(ROOT / "include" / "rollouts")
    rollout_dags = [d for d in dags if d.startswith("rollout__")]
    assert len(rollout_dags) == len(list((ROOT / "include/rollouts").glob("*.yaml")))
    assert [d for d in dags if d.startswith("posthoc__")] == ["posthoc__feed_ranker"]  # the spec with `posthoc`


def test_trigger_form_asks_for_candidate_baseline_dry_run_and_a_force_reason() -> None:
    dag = build_dag(load_spec(ROOT / "include/rollouts/feed_ranker.yaml"))
    params = dag.params
    assert list(params.keys()) == ["candidate_version", "baseline_version", "dry_run", "force_reason"]
    assert params["force_reason"] is None  # nothing forced unless asked
    schema = params.get_param("candidate_version").schema
    assert schema["type"] == "string" and schema["pattern"]
    good = ParamsDict({**params.dump(), "candidate_version": "v7"})
    assert dict(good.validate())["candidate_version"] == "v7"
    from airflow.sdk.exceptions import ParamValidationError

    for bad in ("", "v7; drop table", None):
        with pytest.raises(ParamValidationError):
            p = ParamsDict(dict(params.items()))
            p["candidate_version"] = bad
    assert dag.schedule is None or str(dag.timetable.summary) == "None"


def test_dag_shape_and_rollback_wiring() -> None:
    dag = build_dag(load_spec(ROOT / "include/rollouts/feed_ranker.yaml"))
    ids = set(dag.task_dict)
    for n in (1, 2, 3):
        assert {f"stage_{n}.shift_traffic", f"stage_{n}.guardrails", f"stage_{n}.analysis"} <= ids
    assert dag.task_dict["stage_1.analysis"].downstream_task_ids == {"stage_2.shift_traffic", "rollback"}
    assert dag.task_dict["decide"].downstream_task_ids == {"promote"}  # a branch: it may skip its children
    rollback = dag.task_dict["rollback"]
    # Teardowns of validate_and_lock: Airflow runs them however the run ends (marking it failed or
    # success skips every other pending task, never a teardown), once the start took the lock.
    assert rollback.is_teardown and rollback.trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS
    # Every stage task and the promotion lead straight to the rollback; the branching decision does
    # not (skipping it would leave nothing to roll back with), the rollback waits for it through promote.
    stage_tasks = {t for t in ids if t.startswith("stage_")}
    assert rollback.upstream_task_ids == stage_tasks | {"validate_and_lock", "promote"}
    report = dag.task_dict["report"]
    assert report.upstream_task_ids == {"rollback", "validate_and_lock"} and not report.downstream_task_ids
    assert report.is_teardown and report.trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS
    assert report.on_failure_fail_dagrun  # a rollback fails the run, so Airflow's alerting fires
    assert dag.task_dict["validate_and_lock"].is_setup
    assert not {"approve_final_stage", "extend"} & ids  # not asked for by this spec


def test_approval_and_ask_add_their_tasks() -> None:
    data = base_spec(
        policies={"inconclusive": "ask", "ask_timeout": "10m"},
        approval={"before_final_stage": True, "timeout": "30m", "assignees": ["alice"]},
        notifications={"slack": {"conn_id": "slack_rollouts"}},
    )
    dag = build_dag(parse_spec(data))
    approve = dag.task_dict["approve_final_stage"]
    assert approve.upstream_task_ids == {"stage_2.analysis"}
    assert approve.downstream_task_ids == {"stage_3.shift_traffic"}
    assert approve.defaults == ["Reject"] and approve.response_timeout.total_seconds() == 1800
    assert approve.assigned_users == [{"id": "alice", "name": "alice"}] and len(approve.notifiers) == 1
    decide = dag.task_dict["decide"]
    assert decide.options == ["Promote", "Extend", "Roll back"] and decide.defaults == ["Roll back"]
    assert decide.downstream_task_ids == {"promote", "extend"}
    assert dag.task_dict["extend"].downstream_task_ids == {"promote_after_extension"}
    assert not {"approve_final_stage", "decide", "extend"} & dag.task_dict["rollback"].upstream_task_ids
    assert dag.task_dict["rollback"].on_failure_callback  # a failed rollback is announced


def test_guardrails_never_soft_fail() -> None:
    dag = build_dag(load_spec(ROOT / "include/rollouts/feed_ranker.yaml"))
    guards = [t for t in dag.tasks if isinstance(t, GuardrailSensor)]
    assert len(guards) == 3
    assert all(not getattr(g, "soft_fail", False) for g in guards)
    assert dag.max_active_runs == 1


def test_a_running_rollouts_dag_is_built_from_the_spec_it_started_with(tmp_path: Path) -> None:
    """Edited, broken or deleted while a rollout runs: the DAG keeps the stages the rollout began
    with, until its snapshot is removed with the lock."""
    path = tmp_path / "unit_ranker.yaml"
    started = parse_spec(base_spec())
    path.write_text(yaml.safe_dump(base_spec()))
    store = snapshots.snapshot_dir(tmp_path)
    snapshots.save(store, started.model_dump(mode="json", by_alias=True), "rollout__unit_ranker/run-1")
    for change, said in (
        (lambda: path.write_text(yaml.safe_dump(base_spec(stages=[{"percent": 50, "bake": "1m"}]))), "was edited"),
        (lambda: path.write_text("stages: [{percent: 10\n"), "is broken, renamed or deleted"),
        (lambda: path.unlink(), "is broken, renamed or deleted"),
    ):
        change()
        with pytest.warns(SpecWarning) as caught:
            dags = build_dags(tmp_path)
        assert "stage_3.shift_traffic" in dags["rollout__unit_ranker"].task_dict  # three stages, as started
        assert any(said in str(w.message) and "rollout__unit_ranker/run-1" in str(w.message) for w in caught)
        begin = dags["rollout__unit_ranker"].task_dict["validate_and_lock"]
        assert begin.built_from == "rollout__unit_ranker/run-1" and begin.snapshot_dir == str(store)
    assert not snapshots.remove(store, "unit_ranker", "rollout__unit_ranker/another-run")  # not its to remove
    assert snapshots.remove(store, "unit_ranker", "rollout__unit_ranker/run-1")
    assert build_dags(tmp_path) == {}  # the YAML is gone, and now the snapshot too
