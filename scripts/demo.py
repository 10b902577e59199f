"""`make demo`: three real rollouts of the demo spec against live simulated traffic.

1. v2, healthy: promoted.
2. v3, latency fault that appears at the 50 % stage: rolled back by the fast guardrails.
3. v4, 30 % fewer clicks with healthy infrastructure: rolled back by the slow analysis.

Each rollout is a real DAG run (`airflow dags test`). Progress is read from the audit tables while it
runs; the summary at the end comes from them too. Exits non-zero if an outcome is not the expected one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from mlcanary.report import format_table
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, measurements, rollouts

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ["AIRFLOW_HOME"])
WAREHOUSE = os.environ["MLCANARY_WAREHOUSE"]
DAG_ID = "rollout__demo_ranker"
# candidate, fault, expected status, the reason's expected start (a regular expression)
SCENARIOS = [
    ("v2", "healthy", "promoted", "all 2 stages healthy"),
    ("v3", "P99 latency +300 ms at 50 % traffic", "rolled_back", "guardrails stage 2 breach: p99_latency_ms"),
    (  # caught by a look during a bake, or by a stage's gate look after it
        "v4",
        "30 % fewer clicks, infrastructure healthy",
        "rolled_back",
        r"analysis( stage \d: failing look 1 of 1 during the bake)?: ctr fell",
    ),
]
FAULTS = ["v3:latency_ms=300;min_percent=50", "v4:ctr_drop=0.3"]
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.0f}s] {message}", flush=True)


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def follow(engine: sa.Engine, proc: subprocess.Popen, candidate: str) -> None:
    """Print the rollout's new measurements and decisions until the DAG run ends."""
    seen_m = seen_d = 0
    with engine.connect() as conn:
        seen_m = conn.execute(sa.select(sa.func.max(measurements.c.id))).scalar() or 0
        seen_d = conn.execute(sa.select(sa.func.max(decisions.c.id))).scalar() or 0
    while True:
        done = proc.poll() is not None
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(measurements).where(measurements.c.id > seen_m).order_by(measurements.c.id)
            ).all()
            decided = conn.execute(sa.select(decisions).where(decisions.c.id > seen_d).order_by(decisions.c.id)).all()
        events: list[tuple] = []
        polls: dict[tuple, list] = {}
        for r in rows:
            seen_m = r.id
            polls.setdefault((r.tier, r.stage, r.measured_at), []).append(r)
        for (tier, stage, at), checks in polls.items():
            if tier == "guardrail":
                parts = [f"{c.check_name} {_fmt(c.check_name, c.canary_value)}" for c in checks]
                worst = next((c.verdict for c in checks if c.verdict != "PASS"), "PASS")
                events.append((at, f"  {candidate} stage {stage} guardrails {worst:12} {', '.join(parts)}"))
            else:  # the overall result and any failing segment
                events += [
                    (at, f"  {candidate} stage {stage} analysis   {c.verdict:12} {c.reason}")
                    for c in checks
                    if c.segment == "*" or c.verdict == "FAIL"
                ]
        for d in decided:
            seen_d = d.id
            stage = f" (stage {d.stage})" if d.stage else ""
            events.append((d.decided_at, f"  {candidate} decision: {d.action}{stage}: {d.reason}"))
        for _, text in sorted(events, key=lambda e: e[0]):
            say(text)
        if done:
            return
        time.sleep(1.0)


def _fmt(check: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} ms" if check.endswith("_ms") else f"{100 * value:.1f} %"


def main() -> int:
    engine = make_engine(WAREHOUSE)
    db = Path(engine.url.database or "")
    for suffix in ("", "-wal", "-shm"):  # the demo starts from v1 serving everything
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    engine.dispose()
    create_schema(engine)
    logs = HOME / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"warehouse {WAREHOUSE}; Airflow home {HOME}")
    say("initialising the Airflow metadata database (airflow db migrate)")
    subprocess.run([bin_("airflow"), "db", "migrate"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim_log = open(logs / "simulator.log", "w")  # noqa: SIM115 - lives as long as the simulator
    sim = subprocess.Popen(
        [
            bin_("mlcanary"),
            "simulate",
            "live",
            "--warehouse",
            WAREHOUSE,
            "--model",
            "demo-ranker",
            "--rate",
            "300",
            "--label-delay",
            "2s",
            "--baseline-version",
            "v1",
            "--seed",
            "7",
            "--error-rate",
            "0.0005",
            *[arg for f in FAULTS for arg in ("--fault", f)],
        ],
        stdout=sim_log,
        stderr=subprocess.STDOUT,
    )
    say(f"simulator started: 300 requests/s following the routing table; faults {FAULTS}")
    time.sleep(4)
    outcomes = []
    try:
        for candidate, story, expected, why in SCENARIOS:
            say(f'rollout of {candidate} ({story}): expected {expected}, "{why} …"')
            with open(logs / f"rollout-{candidate}.log", "w") as out:
                proc = subprocess.Popen(
                    [bin_("airflow"), "dags", "test", DAG_ID, "-c", json.dumps({"candidate_version": candidate})],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                follow(engine, proc, candidate)
            with engine.connect() as conn:
                row = conn.execute(
                    sa.select(rollouts)
                    .where(rollouts.c.canary_version == candidate)
                    .order_by(rollouts.c.started_at.desc())
                    .limit(1)
                ).one_or_none()
            outcomes.append((candidate, expected, why, row, proc.returncode))
            say(
                f"DAG run of {candidate} ended {'success' if proc.returncode == 0 else 'failed'}; "
                f"log: {logs / f'rollout-{candidate}.log'}"
            )
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    print()
    table, ok = [], True
    for candidate, expected, why, row, rc in outcomes:
        status = row.status if row else "no rollout"
        reason = (row.reason or "") if row else ""
        as_expected = status == expected and re.match(why, reason) is not None and (rc == 0) == (expected == "promoted")
        ok &= as_expected
        table.append(
            [
                row.rollout_id.split("/", 1)[1] if row else "-",
                candidate,
                f"{row.stage_reached if row else 0}/2",
                status,
                (reason[:110] + "…") if len(reason) > 110 else reason,
                "yes" if as_expected else "NO",
            ]
        )
    print(format_table(table, ["rollout", "candidate", "stages", "decision", "reason", "as expected"]))
    print(f"\nFull report: .venv/bin/mlcanary report --warehouse {WAREHOUSE} --rollout '{DAG_ID}/<rollout>'")
    say("demo finished" + ("" if ok else ": an outcome was NOT as expected"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
