"""Replay: a recorded rollout's decision sequence re-run under a spec, on the rows the warehouse holds.

The cube of slot aggregates is checked against a scan of each window (exact sums, every backend);
the replay with reuse against the replay that scans every window as the live tasks do; an incident
against what a person can read off the data (when the latency fault began); and the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from conftest import base_spec
from mlcanary import replay as replays
from mlcanary.analysis import AnalysisWindow, LookCube, analyze
from mlcanary.simulator import Fault, PastRollout, SimConfig, simulate_rollout
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.tables import predictions_table
from mlcanary.warehouse import queries
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, metadata, predictions, rollouts
from rollout_runner import E2E_ANALYSIS, E2E_POLICIES, run_rollout

T0 = datetime(2026, 11, 20, 12, 0)
SPEC = base_spec(
    name="replay_ranker",
    model="replay-ranker",
    stages=[{"percent": 10, "bake": "4m"}, {"percent": 30, "bake": "4m"}, {"percent": 60, "bake": "4m"}],
    guardrails={
        "interval": "30s",
        "window": "1m",
        "min_requests": 30,
        "success_rate_min": 0.98,
        "p99_latency_ms_max": 250,
        "deadline_margin": "2m",
    },
    analysis={
        "interval": "2m",
        "window": "6m",
        "label_delay": "30s",
        "min_label_window": "1m",
        "min_samples": 300,
        "sequential": False,
        "segments": ["user_cohort"],
        "metrics": [{"name": "ctr", "tolerance": 0.3}],
    },
    policies={"inconclusive": "rollback"},
)
HELD = [(10.0, timedelta(minutes=5)), (30.0, timedelta(minutes=5)), (60.0, timedelta(minutes=5))]
INCIDENT = "rollout__replay_ranker/manual__incident"  # v3: +300 ms once it has 30 % of traffic


def _spec(**changes: Any) -> RolloutSpec:
    data = json.loads(json.dumps(SPEC))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_spec(data)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four recorded rollouts of replay-ranker, an hour apart: three healthy ones promoted, and an
    incident rolled back 1 min 30 s into stage 2."""
    url = f"sqlite:///{tmp_path_factory.mktemp('replay')}/warehouse.db"
    engine = make_engine(url)
    create_schema(engine)
    config = SimConfig(model="replay-ranker", seed=1, label_delay=timedelta(seconds=20), scrape_interval=15.0)
    base = "v1"
    for i, version in enumerate(["v2", "v4", "v5"]):
        past = PastRollout(
            f"rollout__replay_ranker/manual__{version}", "replay_ranker", base, version, HELD, "promoted"
        )
        own = SimConfig(**{**config.__dict__, "seed": 10 + i})
        simulate_rollout(engine, own, T0 + timedelta(hours=i), 60.0, past, lead=timedelta(minutes=2))
        base = version
    faulty = SimConfig(**{**config.__dict__, "seed": 2, "faults": [Fault("v3", "latency_ms", 300.0, min_percent=30)]})
    stages = [HELD[0], (30.0, timedelta(seconds=90))]
    past = PastRollout(INCIDENT, "replay_ranker", base, "v3", stages, "rolled_back", "guardrails stage 2 breach: p99")
    simulate_rollout(engine, faulty, T0 + timedelta(hours=3), 60.0, past, lead=timedelta(minutes=2))
    return url


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in metadata.sorted_tables
        }


def test_an_incident_is_caught_when_its_fault_shows_and_changes_nothing(recorded: str) -> None:
    engine = make_engine(recorded)
    with engine.connect() as conn:
        timeline = replays.recorded_timeline(conn, INCIDENT)
    assert [s.percent for s in timeline.stages] == [10.0, 30.0]
    before = _counts(engine)
    result = replays.replay(engine, _spec(), timeline)
    assert _counts(engine) == before  # nothing written anywhere
    assert [s.decision for s in result.stages] == ["advance", "rollback"]
    stage2 = result.stages[1]
    # The fault starts with stage 2's split (the simulator adds it from 30 %): the first poll whose
    # one-minute window holds stage 2's rows only, 30 s in, already sees +300 ms.
    assert stage2.first_failures["p99_latency_ms"] == stage2.start + timedelta(seconds=30)
    assert stage2.decided_at == stage2.start + timedelta(seconds=30)
    assert "p99" in result.reason and result.decision == "rollback"
    assert result.timeline.recorded_status == "rolled_back"


def test_a_spec_that_tolerates_the_latency_does_not_catch_it(recorded: str) -> None:
    engine = make_engine(recorded)
    with engine.connect() as conn:
        timeline = replays.recorded_timeline(conn, INCIDENT)
    result = replays.replay(engine, _spec(**{"guardrails.p99_latency_ms_max": 1000}), timeline)
    assert result.decision == "undecided"  # stage 2 was rolled back after 90 s; this spec bakes 4 min
    assert result.stages[1].first_failures == {}
    assert "recorded data ends" in result.reason


def test_reusing_aggregates_decides_as_scanning_every_window(recorded: str) -> None:
    engine = make_engine(recorded)
    with engine.connect() as conn:
        healthy = replays.recorded_timeline(conn, "rollout__replay_ranker/manual__v4")
        incident = replays.recorded_timeline(conn, INCIDENT)
    for timeline in (healthy, incident):
        fast = replays.replay(engine, _spec(), timeline)
        slow = replays.replay(engine, _spec(), timeline, reuse=False)
        assert [(s.decision, s.decided_at, s.first_failures, s.polls, s.looks) for s in fast.stages] == [
            (s.decision, s.decided_at, s.first_failures, s.polls, s.looks) for s in slow.stages
        ]
        assert fast.polls > 0 and fast.looks > 0
    assert replays.replay(engine, _spec(), healthy).decision == "promote"


def test_looks_before_a_label_delay_has_passed_see_nothing_and_decide_alike(recorded: str) -> None:
    """A label delay longer than the look interval: the first looks' windows are empty (INCONCLUSIVE)."""
    engine = make_engine(recorded)
    spec = _spec(**{"analysis.label_delay": "3m", "analysis.min_label_window": "30s"})
    with engine.connect() as conn:
        timeline = replays.recorded_timeline(conn, "rollout__replay_ranker/manual__v4")
    fast, slow = replays.replay(engine, spec, timeline), replays.replay(engine, spec, timeline, reuse=False)
    assert [(s.decision, s.decided_at) for s in fast.stages] == [(s.decision, s.decided_at) for s in slow.stages]


def test_a_planned_replay_follows_the_spec_stages_from_its_start(recorded: str) -> None:
    engine = make_engine(recorded)
    start = T0 + timedelta(hours=1)  # v4's rollout: stages of 5 min each from here
    timeline = replays.planned_timeline(_spec(), "v2", "v4", start, start + timedelta(minutes=20))
    result = replays.replay(engine, _spec(), timeline)
    assert [s.decision for s in result.stages] == ["advance", "advance", "promote"]
    for earlier, later in zip(result.stages, result.stages[1:], strict=False):
        assert later.start == earlier.decided_at  # the next stage starts when this one would have advanced
    with pytest.raises(replays.ReplayError, match="must be after the start"):
        replays.planned_timeline(_spec(), "v2", "v4", start, start)


def test_an_unknown_rollout_or_a_dry_run_is_refused_by_name(recorded: str, engine: sa.Engine) -> None:
    with make_engine(recorded).connect() as conn, pytest.raises(replays.ReplayError, match="no rollout 'nope'"):
        replays.recorded_timeline(conn, "nope")
    dry = PastRollout("rollout__replay_ranker/dry", "replay_ranker", "v1", "v2", HELD[:1], "rolled_back")
    simulate_rollout(engine, SimConfig(model="replay-ranker"), T0, 1.0, dry, lead=timedelta(seconds=10))
    with engine.begin() as conn:
        conn.execute(sa.update(rollouts).values(dry_run=True))
    with engine.connect() as conn, pytest.raises(replays.ReplayError, match="was a dry run: no traffic moved to v2"):
        replays.recorded_timeline(conn, "rollout__replay_ranker/dry")


def _mlcanary(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlcanary.cli", *args], capture_output=True, text=True, timeout=300)


def test_command_line_replays_one_rollout_and_counts_false_rollbacks(recorded: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "replay.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    one = _mlcanary("replay", "--spec", str(spec_file), "--warehouse", recorded, "--rollout", INCIDENT, "--json")
    assert one.returncode == 0, one.stderr
    found = json.loads(one.stdout)
    assert found["replayed"]["decision"] == "rollback"
    assert found["recorded"]["status"] == "rolled_back"
    assert found["stages"][1]["first_failures"]["p99_latency_ms"]
    text = _mlcanary("replay", "--spec", str(spec_file), "--warehouse", recorded, "--rollout", INCIDENT)
    assert "p99_latency_ms: first failed at 2026-11-20 15:05:30 (30 s into the stage)" in text.stdout
    assert "this spec decides 1 min before the recorded end" in text.stdout  # recorded 90 s into stage 2
    # A P99 limit below this model's normal P99 (about 135 ms) rolls back every healthy rollout at stage 1.
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({**SPEC, "guardrails": {**SPEC["guardrails"], "p99_latency_ms_max": 100}}))
    table = _mlcanary("replay", "--spec", str(strict), "--warehouse", recorded, "--all-rollouts")
    assert table.returncode == 0, table.stderr
    assert "4 rollouts of replay-ranker under replay_ranker: 1 decided alike; 3 false rollbacks" in table.stdout
    for version in ("v2", "v4", "v5", "incident"):
        assert f"rollout__replay_ranker/manual__{version}" in table.stdout
    usage = _mlcanary("replay", "--spec", str(spec_file), "--warehouse", recorded)
    assert usage.returncode == 2 and "give --rollout ID" in usage.stderr
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**SPEC, "model": "another-model"}))
    wrong = _mlcanary("replay", "--spec", str(other), "--warehouse", recorded, "--rollout", INCIDENT)
    assert wrong.returncode == 2 and "rolled out model 'replay-ranker'" in wrong.stderr
    # ... but --all-rollouts --model replays that model's rollouts under another spec's rules, on their own rows
    every = ["--all-rollouts", "--model", "replay-ranker"]
    theirs = _mlcanary("replay", "--spec", str(other), "--warehouse", recorded, *every)
    assert theirs.returncode == 0, theirs.stderr
    assert "4 rollouts of replay-ranker under replay_ranker: 4 decided alike" in theirs.stdout
    backwards = [
        "--baseline-version",
        "v1",
        "--canary-version",
        "v2",
        "--start",
        "2026-11-20T12:00",
        "--end",
        "2026-11-20T11:00",
    ]
    late = _mlcanary("replay", "--spec", str(spec_file), "--warehouse", recorded, *backwards)
    assert late.returncode == 2 and "must be after the start" in late.stderr


# --- the cube and the slot counts against scans of each window ----------------------------------


def _rows(n: int = 4000, seed: int = 3) -> pd.DataFrame:
    """Rows over 10 minutes; a third of the labels arrive late (up to 5 minutes), some never; and
    rows, and labels, exactly on the 10-second slot boundaries and a microsecond before them."""
    rng = np.random.default_rng(seed)
    edges = [T0 + timedelta(seconds=10 * k) + timedelta(microseconds=d) for k in range(1, 60) for d in (0, -1)]
    ts = [T0 + timedelta(seconds=float(s)) for s in rng.uniform(0, 600 - 60, n - len(edges))] + edges
    lag = np.where(rng.uniform(size=n) < 0.67, rng.uniform(1, 15, n), rng.uniform(15, 300, n))
    lag[-len(edges) :] = rng.choice([10.0, 20.0, 30.0], len(edges))  # whole slots: labels on a boundary too
    labelled = rng.uniform(size=n) < 0.9
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "ts": ts,
            "model": "replay-ranker",
            "model_version": rng.choice(["v1", "v2"], n),
            "user_cohort": rng.choice(["new", "returning", "power", None], n),
            "score": rng.uniform(size=n),
            "label": np.where(labelled, rng.integers(0, 2, n), np.nan),
            "label_ts": [
                t + timedelta(seconds=float(d)) if ok else None for t, d, ok in zip(ts, lag, labelled, strict=True)
            ],
            "latency_ms": rng.lognormal(4, 0.5, n),
            "success": (rng.uniform(size=n) > 0.05).astype(int),
        }
    )


@pytest.fixture(params=["sqlite", "postgres", "duckdb"])
def loaded(request: pytest.FixtureRequest) -> sa.Engine:
    eng = request.getfixturevalue(
        {"sqlite": "engine", "postgres": "pg_engine", "duckdb": "duckdb_engine"}[request.param]
    )
    df = _rows()
    with eng.begin() as conn:
        conn.execute(sa.insert(predictions), df.astype(object).where(df.notna(), None).to_dict("records"))
    return eng


@pytest.mark.parametrize("arithmetic", [False, True], ids=["few-slots", "arithmetic-slots"])
def test_a_looks_sums_from_the_cube_equal_a_scan_of_its_window(
    loaded: sa.Engine, arithmetic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if arithmetic:  # SQLite computes many slots from the text's seconds and microseconds, not a CASE tree
        monkeypatch.setattr(queries, "MAX_TREE_STEPS", 0)
    spec = _spec(**{"analysis.label_delay": "20s"})
    slot = 10
    cube = LookCube.build(loaded, spec, "v1", "v2", T0, T0 + timedelta(minutes=10), slot)
    table = predictions_table(spec, extra=["user_cohort"])
    keys = ["version", "column", "value", "bin"]
    for start_s, end_s, asof_s in [(0, 580, 600), (60, 300, 320), (100, 250, 270), (0, 120, 600), (200, 210, 230)]:
        window = AnalysisWindow(
            T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=end_s), T0 + timedelta(seconds=asof_s)
        )
        got = cube.aggregates(spec, "v1", "v2", window).segments
        with loaded.connect() as conn:
            want = queries.binned_frame(
                conn,
                table,
                spec.model,
                ["v1", "v2"],
                window.start,
                window.end,
                window.label_asof,
                ["user_cohort"],
                cube.score_edges,
                cube.measures,
                slices=1,
            )
        got = got.sort_values(keys).reset_index(drop=True)
        want = want[want.n > 0].sort_values(keys).reset_index(drop=True)
        assert len(got) == len(want) > 0
        pd.testing.assert_frame_equal(got[keys], want[keys], check_dtype=False)
        for m in ["n", *cube.measures]:
            assert np.allclose(got[m].to_numpy(float), want[m].to_numpy(float)), (window, m)
    with pytest.raises(ValueError, match="a label delay before"):
        cube.aggregates(spec, "v1", "v2", AnalysisWindow(T0, T0 + timedelta(seconds=600), T0 + timedelta(seconds=600)))


def test_running_counts_equal_the_request_counts_of_every_poll_range(loaded: sa.Engine) -> None:
    spec = _spec()
    metrics = replays._RunningCounts(loaded, spec)
    table = predictions_table(spec)
    since = T0 + timedelta(seconds=7.25)
    ranges = [(since, since + timedelta(seconds=s)) for s in (30, 60, 90, 120)]  # a stage's counts, poll by poll
    ranges += [(since + timedelta(seconds=30), since + timedelta(seconds=120)), (T0, T0 + timedelta(seconds=50))]
    later = T0 + timedelta(seconds=400.5)  # the next stage
    ranges += [(later, later + timedelta(seconds=30)), (later, later + timedelta(seconds=95.5))]
    with loaded.connect() as conn:
        for start, end in ranges:
            for version in ("v1", "v2"):
                want = queries.request_counts(conn, table, spec.model, version, start, end)
                assert metrics._requests(conn, version, start, end) == want, (start, end)


# --- a rollout recorded by its own DAG ------------------------------------------------------------


@pytest.mark.e2e
def test_a_rollout_recorded_by_its_dag_replays_to_its_own_decision(
    airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_rollout(tmp_path, monkeypatch, faults=("v2:latency_ms=300;min_percent=30",))
    assert out.rollout is not None and out.rollout.status == "rolled_back"
    spec = parse_spec(base_spec(analysis=E2E_ANALYSIS, policies=E2E_POLICIES))
    engine = make_engine(f"sqlite:///{tmp_path}/warehouse.db")
    with engine.connect() as conn:
        timeline = replays.recorded_timeline(conn, out.rollout.rollout_id)
        rolled_back = conn.execute(
            sa.select(decisions.c.decided_at).where(decisions.c.action == "rollback")
        ).scalar_one()
    assert [s.percent for s in timeline.stages] == [10.0, 30.0]
    result = replays.replay(engine, spec, timeline)
    assert [s.decision for s in result.stages] == ["advance", "rollback"], result.reason
    assert result.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert "p99_latency_ms" in result.stages[1].first_failures
    # the replayed decision lies within a few one-second polls of the recorded one
    assert result.decided_at is not None and abs(result.decided_at - rolled_back) <= timedelta(seconds=3)
    lax_guardrails = {**base_spec()["guardrails"], "p99_latency_ms_max": 2000}
    lax = parse_spec(base_spec(analysis=E2E_ANALYSIS, policies=E2E_POLICIES, guardrails=lax_guardrails))
    assert "p99_latency_ms" not in replays.replay(engine, lax, timeline).stages[1].first_failures


def test_the_cubes_fixed_bin_edges_move_auc_only_in_the_third_decimal(recorded: str) -> None:
    """The cube bins the score once for the whole span; a live look bins it by its own window's
    baseline quantiles. Counts and rates are the same; AUC differs by the binning only."""
    engine = make_engine(recorded)
    spec = _spec(
        **{"analysis.metrics": [{"name": "ctr", "tolerance": 0.3}, {"name": "auc", "kind": "auc", "tolerance": 0.05}]}
    )
    start = T0 + timedelta(hours=1)
    cube = LookCube.build(engine, spec, "v2", "v4", start, start + timedelta(minutes=20), 30)
    window = AnalysisWindow(start + timedelta(minutes=5), start + timedelta(minutes=14), start + timedelta(minutes=15))
    with engine.connect() as conn:
        live = {c.check: c for c in analyze(conn, spec, "v2", "v4", window).checks if c.segment == "*"}
    cubed = {c.check: c for c in cube.analyze(spec, "v2", "v4", window).checks if c.segment == "*"}
    assert (cubed["ctr"].canary_n, cubed["ctr"].baseline_n) == (live["ctr"].canary_n, live["ctr"].baseline_n)
    assert cubed["ctr"].canary_value == pytest.approx(live["ctr"].canary_value, rel=1e-12)
    assert cubed["auc"].canary_value == pytest.approx(live["auc"].canary_value, abs=5e-3)
    assert cubed["auc"].baseline_value == pytest.approx(live["auc"].baseline_value, abs=5e-3)
