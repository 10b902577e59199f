"""Replay speed: a 2-hour, 3-stage rollout with 30 s polls and 10-minute looks on 1.6 M rows (SQLite).

The warehouse holds a recorded rollout (``mlcanary.simulator.simulate_rollout``): 10 minutes of
the baseline alone, stages at 10 %, 25 % and 50 % for 40 minutes each, then 10 minutes after the
rollback; about 222 requests/s, so 1.6 M prediction rows. ``mlcanary replay`` of it is timed
against one bare scan of the table, and against the same replay with every poll and look scanning
its own window, as the live tasks do (``--compare``).

    .venv/bin/python bench/replay_speed.py [--rows 1600000] [--compare] [--keep DB]

Prints the seconds and the ratios; writes bench/results/replay_speed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from mlcanary.replay import recorded_timeline, replay
from mlcanary.simulator import PastRollout, SimConfig, simulate_rollout
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema

HERE = Path(__file__).resolve().parent
SPEC = {
    "name": "bench_replay",
    "model": "bench-ranker",
    # each stage held 40 minutes: a 39-minute bake, its first poll and the gate look
    "stages": [{"percent": 10, "bake": "39m"}, {"percent": 25, "bake": "39m"}, {"percent": 50, "bake": "39m"}],
    "guardrails": {"interval": "30s", "window": "2m", "min_requests": 100, "p99_latency_ms_max": 300},
    "analysis": {
        "interval": "10m",
        "window": "20m",
        "label_delay": "5m",
        "min_samples": 1000,
        "segments": ["user_cohort", "device"],
        "metrics": [
            {"name": "ctr", "kind": "rate", "tolerance": 0.05},
            {"name": "auc", "kind": "auc", "tolerance": 0.03, "critical": False},
        ],
        "drift": {"features": ["f1", "f2"]},
    },
    "policies": {"inconclusive": "rollback"},
}
START = datetime(2026, 11, 30, 10, 0)


def load(url: str, rows: int) -> None:
    engine = make_engine(url)
    create_schema(engine)
    seconds = 2 * 3600 + 2 * 600
    rate = rows / seconds
    past = PastRollout(
        "rollout__bench_replay/manual__1",
        "bench_replay",
        "v1",
        "v2",
        [(10.0, timedelta(minutes=40)), (25.0, timedelta(minutes=40)), (50.0, timedelta(minutes=40))],
        status="rolled_back",
        reason="simulated: rolled back at the end",
    )
    config = SimConfig(model="bench-ranker", seed=3, label_delay=timedelta(minutes=2), scrape_interval=15.0)
    started = time.perf_counter()
    simulate_rollout(engine, config, START, rate, past, progress=lambda m: print(f"    {m}", end="\r", flush=True))
    print(f"\n    loaded in {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_600_000)
    parser.add_argument("--compare", action="store_true", help="also run every look as a scan of its own window")
    parser.add_argument("--keep", type=Path, help="warehouse file to create or reuse")
    args = parser.parse_args()
    spec = parse_spec(SPEC)
    path = args.keep or Path(tempfile.mkdtemp()) / "replay.db"
    url = f"sqlite:///{path}"
    if not path.exists():
        print(f"loading {args.rows:,} rows into {path}")
        load(url, args.rows)
    engine = make_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one()
        started = time.perf_counter()
        conn.execute(
            sa.text("SELECT model_version, count(*), sum(score) FROM predictions GROUP BY model_version")
        ).all()
        bare = time.perf_counter() - started
        timeline = recorded_timeline(conn, "rollout__bench_replay/manual__1")
    started = time.perf_counter()
    result = replay(engine, spec, timeline)
    took = time.perf_counter() - started
    print(f"rows: {n:,}; bare scan {bare:.2f} s")
    print(
        f"replay: {took:.1f} s ({result.polls} polls, {result.looks} looks): {took / bare:.1f}x one bare scan; "
        f"target < 60 s: {'met' if took < 60 else 'NOT met'}"
    )
    print(f"    decision: {result.decision} at {result.decided_at}: {result.reason[:150]}")
    out = {
        "rows": n,
        "bare_scan_s": bare,
        "replay_s": took,
        "polls": result.polls,
        "looks": result.looks,
        "decision": result.decision,
    }
    if args.compare:
        started = time.perf_counter()
        plain = replay(engine, spec, timeline, reuse=False)
        scans = time.perf_counter() - started
        same = (plain.decision, plain.decided_at) == (result.decision, result.decided_at)
        print(
            f"the same replay, every poll and look scanning its own window: {scans:.1f} s; with reuse "
            f"{scans / took:.1f}x faster; same decision at the same moment: {same}"
        )
        out["replay_without_reuse_s"] = scans
        out["same_decision"] = same
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "replay_speed.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
