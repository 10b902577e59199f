"""The report page of a big rollout: 3 stages, 200 guardrail polls, 60 segments, loads under a second.

Writes the audit rows such a rollout leaves (5 guardrail checks per poll; 30 analysis looks of
3 metrics over 60 segments each, and 3 drift checks; its traffic history and decisions) into a
SQLite warehouse, then times what the plugin does per request: read the rows and render the page.
Prints the time, its ratio to the 1 s target, the page's size, and writes the page beside the
warehouse for a look (``--out``).

    .venv/bin/python bench/report_page.py [--out /tmp/big-report.html]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from mlcanary import report_page
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, decisions, measurements, rollouts, traffic_history

TARGET_S = 1.0
POLLS, SEGMENTS, LOOKS = 200, 60, 30
RID = "rollout__big/manual__2026-12-01T10:00:00+00:00"


def spec() -> dict:
    return {
        "name": "big",
        "model": "big-ranker",
        "stages": [{"percent": p, "bake": "10m"} for p in (5, 25, 50)],
        "guardrails": {"interval": "9s", "window": "1m", "p99_latency_ms_max": 250},
        "analysis": {
            "segments": ["city"],
            "metrics": [
                {"name": "ctr", "tolerance": 0.05},
                {"name": "conversion", "tolerance": 0.1},
                {"name": "auc", "kind": "auc", "tolerance": 0.02},
            ],
            "drift": {"features": ["f1", "f2"]},
        },
    }


def write(engine: sa.Engine) -> None:
    rng = np.random.default_rng(1)
    t0 = datetime(2026, 12, 1, 10, 0)
    parsed = parse_spec(spec())
    with engine.begin() as conn:
        conn.execute(
            sa.insert(rollouts),
            dict(
                rollout_id=RID,
                spec_name="big",
                model="big-ranker",
                baseline_version="v7",
                canary_version="v8",
                dry_run=False,
                status="rolled_back",
                stage_reached=3,
                canary_percent=0.0,
                started_at=t0,
                ended_at=t0 + timedelta(seconds=9 * POLLS + 30),
                reason="analysis: ctr fell 0.0412 → 0.0371 (-9.9 %), tolerance 5 %: worse than tolerance",
                spec=json.dumps(parsed.model_dump(mode="json", by_alias=True)),
            ),
        )
        stage_at = [t0 + timedelta(seconds=9 * POLLS * i / 3) for i in range(3)]
        conn.execute(
            sa.insert(traffic_history),
            [
                dict(
                    model="big-ranker",
                    rollout_id=RID,
                    baseline_version="v7",
                    canary_version="v8",
                    from_percent=prev,
                    to_percent=pct,
                    applied=True,
                    note=f"stage {i + 1}: canary to {pct} %",
                    applied_at=at,
                )
                for i, (prev, pct, at) in enumerate(zip((0, 5, 25), (5, 25, 50), stage_at, strict=True))
            ],
        )
        conn.execute(
            sa.insert(decisions),
            [
                dict(
                    rollout_id=RID,
                    model="big-ranker",
                    stage=i + 1,
                    action="advance",
                    reason=f"traffic to canary {p} %",
                    decided_at=at,
                )
                for i, (p, at) in enumerate(zip((5, 25, 50), stage_at, strict=True))
            ]
            + [
                dict(
                    rollout_id=RID,
                    model="big-ranker",
                    stage=3,
                    action="rollback",
                    reason="analysis: ctr fell",
                    decided_at=t0 + timedelta(seconds=9 * POLLS),
                )
            ],
        )
        guard: list[dict] = []
        limits = {"success_rate": 0.99, "p99_latency_ms": 250.0, "cpu": 0.9, "memory": 0.95, "sample_ratio": 0.1}
        for i in range(POLLS):
            at = t0 + timedelta(seconds=9 * (i + 1))
            for check, limit in limits.items():
                value = limit * (0.7 + 0.2 * rng.random())
                guard.append(
                    dict(
                        rollout_id=RID,
                        model="big-ranker",
                        tier="guardrail",
                        stage=1 + i * 3 // POLLS,
                        check_name=check,
                        segment="*",
                        window_start=at - timedelta(minutes=1),
                        window_end=at,
                        canary_value=value,
                        baseline_value=value * 0.98,
                        canary_n=900,
                        baseline_n=9000,
                        threshold=limit,
                        verdict="PASS",
                        reason=f"{check} {value:.3f}",
                        measured_at=at,
                    )
                )
        looks: list[dict] = []
        drift: list[dict] = []  # executemany takes its columns from the first row: one insert per shape
        for look in range(LOOKS):
            at = t0 + timedelta(seconds=9 * POLLS * (look + 1) / LOOKS)
            for metric in ("ctr", "conversion", "auc"):
                for s in ["*", *(f"city=c{k:02d}" for k in range(SEGMENTS))]:
                    ratio = 1 + rng.normal(0, 0.03)
                    looks.append(
                        dict(
                            rollout_id=RID,
                            model="big-ranker",
                            tier="analysis",
                            stage=1 + look * 3 // LOOKS,
                            check_name=metric,
                            segment=s,
                            window_start=t0,
                            window_end=at,
                            canary_value=0.04 * ratio,
                            baseline_value=0.04,
                            canary_n=5000,
                            baseline_n=50000,
                            threshold=0.95,
                            ci_low=ratio - 0.05,
                            ci_high=ratio + 0.05,
                            verdict="PASS" if ratio > 1 else "INCONCLUSIVE",
                            reason=f"{metric} for {s}: ratio {ratio:.3f}",
                            measured_at=at,
                        )
                    )
            for check in ("input_drift_f1", "input_drift_f2", "output_drift"):
                hist = {"baseline": [5000] * 10, "canary": rng.integers(400, 600, 10).tolist()}
                drift.append(
                    dict(
                        rollout_id=RID,
                        model="big-ranker",
                        tier="analysis",
                        stage=3,
                        check_name=check,
                        segment="*",
                        window_start=t0,
                        window_end=at,
                        canary_value=0.01,
                        baseline_value=0.01,
                        canary_n=sum(hist["canary"]),
                        baseline_n=50000,
                        threshold=0.2,
                        verdict="PASS",
                        reason="drift ok",
                        measured_at=at,
                        histogram=json.dumps(hist),
                    )
                )
        for rows in (guard, looks, drift):
            conn.execute(sa.insert(measurements), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the page here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/warehouse.db")
        create_schema(engine)
        write(engine)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            with engine.connect() as conn:
                data = report_page.load(conn, RID)
            assert data is not None
            page = report_page.render(data)
            times.append(time.perf_counter() - started)
        with engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(measurements)).scalar()
    took = statistics.median(times)
    print(
        f"report page of {POLLS} polls, {LOOKS} looks x 3 metrics x {SEGMENTS + 1} segments ({n:,} audit rows): "
        f"median {took * 1000:.0f} ms of 5 (min {min(times) * 1000:.0f} ms), {len(page.encode()) / 1024:,.0f} KB; "
        f"ratio to the {TARGET_S:g} s target: {took / TARGET_S:.2f}"
    )
    if args.out:
        args.out.write_text(page, encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
