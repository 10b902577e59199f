"""The Airflow UI tells the story on its own (issue 13, item 6), checked where a person looks:

- the runs list: each run's note names its versions and outcome (``v1 → v2: rolled back at stage 2: ...``);
- the grid: stage groups show their canary share (``stage_1 (10 %)``), their tasks the split;
- the task logs: one line per guardrail poll, an INCONCLUSIVE that advances a stage in yellow (warning),
  and a rollback ends the run failed with one line, no traceback;
- the trigger form: a bad version is refused in words;
- ``make ui`` refuses an API port that is one of Airflow's log-server ports, before starting anything.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, base_spec
from mlcanary_airflow.dag_factory import VERSION_HINT, VERSION_RULE
from mlcanary_airflow.links import report_url
from mlcanary_airflow.run_notes import RUN_NOTES, run_note
from rollout_runner import run_rollout

DAG_ID = "rollout__unit_ranker"


@pytest.fixture(scope="module")
def api(airflow_db: None) -> Any:
    """Airflow's REST API in process, as an admin (the test home makes every user one)."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    client = TestClient(create_app())
    client.headers["Authorization"] = f"Bearer {client.get('/auth/token').json()['access_token']}"
    return client


@pytest.fixture
def parsed(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The unit spec's DAG parsed by the real factory file and stored as the DAG processor stores it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "unit_ranker.yaml").write_text(yaml.safe_dump(base_spec()))
    monkeypatch.setenv("MLCANARY_SPEC_DIR", str(specs))
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    bundle = next(b for b in manager.get_all_dag_bundles() if b.name == "dags-folder")
    bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags", bundle_name=bundle.name)
    assert DAG_ID in bag.dags, bag.import_errors
    sync_bag_to_db(bag, bundle.name, None)
    return DAG_ID


# --- the trigger form -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["v 2", "-v2", "v2\n"])
def test_a_bad_version_is_refused_in_words(api: Any, parsed: str, bad: str) -> None:
    """The REST trigger (what the UI's Trigger button calls) answers 400 naming the rule, and no run is created
    (counted before and after: the session's metadata DB may hold other tests' runs of this DAG id)."""
    before = api.get(f"/api/v2/dags/{parsed}/dagRuns").json()["total_entries"]
    reply = api.post(f"/api/v2/dags/{parsed}/dagRuns", json={"logical_date": None, "conf": {"candidate_version": bad}})
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert "Invalid input for param candidate_version" in detail
    assert f"'$comment': '{VERSION_HINT}'" in detail  # "a version: letters, digits, . _ : + - (e.g. v3)"
    assert api.get(f"/api/v2/dags/{parsed}/dagRuns").json()["total_entries"] == before
    form = api.get(f"/api/v2/dags/{parsed}/details").json()["params"]["candidate_version"]
    assert VERSION_RULE in form["description"]  # what the form shows under the field


# --- the grid ---------------------------------------------------------------------------------


def test_stage_groups_show_their_share_in_the_grid(api: Any, parsed: str) -> None:
    """The grid's structure (what the UI draws): ``stage_1 (10 %)``, and the split in the task names;
    the ids stay ``stage_N.<task>``."""
    nodes = api.get(f"/ui/grid/structure/{parsed}").json()
    groups = {n["id"]: n for n in nodes if n.get("children")}
    assert [groups[f"stage_{i}"]["label"] for i in (1, 2, 3)] == ["stage_1 (10 %)", "stage_2 (30 %)", "stage_3 (60 %)"]
    labels = {c["id"]: c["label"] for c in groups["stage_2"]["children"]}
    assert labels == {
        "stage_2.shift_traffic": "shift to 30 %",
        "stage_2.guardrails": "guardrails at 30 % (4 s)",
        "stage_2.analysis": "analysis at 30 %",
    }


# --- the runs list: the run's note ------------------------------------------------------------


def test_a_started_run_is_noted_with_its_versions(api: Any, parsed: str) -> None:
    """Where the scheduler starts a run (``on_dag_run_running``): its versions, before any task ran;
    the REST API (what the UI's runs list reads) shows the note. A person's own note is kept."""
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    def start(conf: dict[str, Any], note: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf} | ({"note": note} if note else {})
        reply = api.post(f"/api/v2/dags/{parsed}/dagRuns", json=body)
        assert reply.status_code == 200, reply.text
        run_id = reply.json()["dag_run_id"]
        with create_session() as session:  # what the scheduler does when the run starts
            run = session.scalars(sa.select(DagRun).where(DagRun.run_id == run_id)).one()
            RUN_NOTES.on_dag_run_running(dag_run=run, msg="started")
        return str(api.get(f"/api/v2/dags/{parsed}/dagRuns/{run_id}").json()["note"])

    try:
        assert start({"candidate_version": "v3", "baseline_version": "v1"}) == "v1 → v3: running"
        assert start({"candidate_version": "v4"}) == "serving → v4: running"
        mine = "on call: Ana watches this one"
        assert start({"candidate_version": "v3"}, note=mine) == mine
    finally:  # no queued runs left for the other tests of this metadata DB
        for run in api.get(f"/api/v2/dags/{parsed}/dagRuns").json()["dag_runs"]:
            api.delete(f"/api/v2/dags/{parsed}/dagRuns/{run['dag_run_id']}")
    assert len(run_note("v1", "v3", "x" * 2000)) <= 600  # the note column holds 1,000 characters


_STRUCTLOG = re.compile(r"^\S+ \[(\w+) *\] (.*?)(?: \[[\w.]+\](?: |$).*)?$")


def _log_lines(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(level, message) of every log line, whichever way Airflow's logging is set up in this process:
    structlog to stdout (a plain ``dag.test()``) or the standard library's (once an API app was built)."""
    lines = [(r.levelname.lower(), r.getMessage()) for r in caplog.records]
    for line in capfd.readouterr().out.splitlines():
        if m := _STRUCTLOG.match(line):
            lines.append((m.group(1), m.group(2)))
    return lines


def _note(rollout_id: str) -> str | None:
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    dag_id, run_id = rollout_id.split("/", 1)
    with create_session() as session:
        run = session.scalars(sa.select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).one()
        return run.note


@pytest.mark.e2e
def test_a_rollback_tells_its_story(
    api: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A latency breach in stage 2, as the UI shows it: the run's note, the guardrails' polls, a
    stage that advanced on INCONCLUSIVE in yellow, and the failed run's one-line reason."""
    caplog.set_level(logging.INFO)
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:latency_ms=300;min_percent=30",))
    lines = _log_lines(capfd, caplog)
    assert out.state == "failed" and out.rollout.status == "rolled_back"
    dag_id, run_id = out.rollout.rollout_id.split("/", 1)
    note = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["note"]  # what the runs list shows
    assert note.startswith("v1 → v2: rolled back at stage 2: guardrails stage 2 breach: "), note
    assert re.search(r"p99_latency_ms \d+(\.\d)? ms >= 250\.0 ms", note), note

    # one line per poll, each check against its limit, the stage's share and how much has baked
    polls = [(level, m) for level, m in lines if re.match(r"poll \d+ \(stage \d, ", m)]
    assert len(polls) >= 5, lines[-40:]
    assert polls[0][1].startswith("poll 1 (stage 1, 10 %, 0 s of 4 s healthy): "), polls[0]
    # (each check against its limit; an early poll on few requests may be below the SLO but not significantly)
    checks = r"success_rate [\d.]+ % (>=|<) 98\.00 % [^;]+; p99_latency_ms [\d.]+ ms (<|>=) 250\.0 ms [^;]+; cpu"
    assert all(re.search(r"\): " + checks, m) for _, m in polls if "stage 1," in m), polls
    # every check passed: info; anything else (a check without data, say) is a warning, yellow
    assert {lv for lv, m in polls if m.count(" ok") == 4} == {"info"}
    assert {lv for lv, m in polls if "no data" in m or "FAIL" in m} <= {"warning"}
    assert all(len(m) < 400 for _, m in polls)
    level, breach = next(p for p in polls if "FAIL" in p[1])
    assert level == "warning" and breach.startswith("poll 1 (stage 2, 30 %, 0 s of 4 s healthy): "), breach
    assert re.search(r"p99_latency_ms [\d.]+ ms >= 250\.0 ms FAIL", breach)

    # stage 1 advanced on an INCONCLUSIVE look: a warning (yellow), not a PASS
    looks = [(lv, m) for lv, m in lines if m.startswith("stage 1 analysis look ")]
    assert looks and looks[-1] == ("warning", f"stage 1 analysis look {len(looks)}: INCONCLUSIVE"), looks
    assert any(lv == "warning" and m.startswith("stage 1 advances on INCONCLUSIVE, not PASS") for lv, m in lines)

    # the failed run's reason: one line in the report task's log, and no traceback anywhere
    reason = f"rolled back at stage 2: {out.rollout.reason}"
    assert ("error", f"mlcanary: {reason}") in lines
    assert not any(m.startswith("Task failed with exception") for _, m in lines)
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    assert out.task_states["report"] == "failed" and out.task_states["stage_2.guardrails"] == "failed"

    # the report's button on the report, guardrails and analysis tasks (what the task page shows)
    for task in ("report", "stage_2.guardrails", "stage_1.analysis"):
        links = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/links").json()
        assert links["extra_links"] == {"Rollout report": report_url(dag_id, run_id)}, (task, links)


# --- make ui ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "env", "said"),
    [
        ("8793", {}, "port 8793 is Airflow's worker log server port ([logging] worker_log_server_port)"),
        ("8794", {}, "port 8794 is Airflow's triggerer log server port ([logging] trigger_log_server_port)"),
        # the ports as this Airflow home configures them, not only the defaults
        (
            "9111",
            {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "9111"},
            "port 9111 is Airflow's worker log server port",
        ),
        ("80a", {}, "AIRFLOW__API__PORT='80a' is not a port number"),
    ],
)
def test_make_ui_refuses_a_log_server_port_before_starting_anything(
    tmp_path: Path, port: str, env: dict[str, str], said: str
) -> None:
    home = tmp_path / "home"
    run_env = {**os.environ, "AIRFLOW_HOME": str(home), **env}
    run_env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    done = subprocess.run(
        ["make", "--no-print-directory", "ui", f"AIRFLOW__API__PORT={port}"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"make ui: {said}" in done.stderr and "choose another AIRFLOW__API__PORT" in done.stderr
    assert "simulator running" not in done.stdout and "mlcanary init" not in done.stdout  # nothing started
    assert not (home / "warehouse.db").exists()


def test_the_port_check_lets_a_free_port_through(tmp_path: Path) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__API__PORT": "8080"}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/check_ui_port.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
