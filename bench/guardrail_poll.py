"""One guardrail poll against a small and a large warehouse: its cost follows the window, not the table.

For each backend (SQLite, PostgreSQL) the table holds 100 k or 10 M prediction rows of history (a
day, older than the window) plus the same 5 minutes of recent traffic (300 requests/s, 10 % canary).
A poll is what the guardrail trigger runs every interval: both arms' counts, P99 latency and
resources over a 2-minute window, plus the baseline-relative checks (error-rate count test, requests
slower than 1.2 x the baseline P99).

    .venv/bin/python bench/guardrail_poll.py [--sizes 100000,10000000] [--backends sqlite,postgres] [--polls 25]

Prints the p50 poll time per size and the ratio of the largest to the smallest (target: at most 2);
writes bench/results/guardrail_poll.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from analysis_scale import RESULTS, backend_url, load

from mlcanary.guardrails import evaluate_guardrails
from mlcanary.routers.base import Split
from mlcanary.simulator import SimConfig, simulate_batch
from mlcanary.sources import WarehouseMetrics
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine, utcnow
from mlcanary.warehouse.schema import create_schema, resource_metrics

SPEC = {
    "name": "bench",
    "model": "bench-ranker",
    "stages": [{"percent": 10, "bake": "1m"}],
    "guardrails": {
        "interval": "30s",
        "window": "2m",
        "min_requests": 200,
        "baseline": {"error_rate_ratio_max": 2.0, "p99_latency_ratio_max": 1.2},
    },
    "analysis": {"metrics": [{"name": "ctr", "tolerance": 0.05}]},
}


def prepare(backend: str, url: str, history: int, end) -> None:  # type: ignore[no-untyped-def]
    """``history`` rows over the day before the recent traffic, then 5 minutes of recent traffic."""
    recent = end - timedelta(minutes=5)
    load(backend, url, history, recent)
    engine = make_engine(url)
    create_schema(engine)  # resource_metrics, and the state tables
    with engine.begin() as conn:
        conn.execute(resource_metrics.delete())
    config = SimConfig(model="bench-ranker", seed=9, label_delay=timedelta(seconds=30))
    simulate_batch(engine, config, recent, end, 300.0, Split("bench-ranker", "v1", "v2", 10.0), labels_asof=end)
    engine.dispose()


def polls(url: str, end, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    spec = parse_spec(SPEC)
    source = WarehouseMetrics(make_engine(url), spec)
    evaluate_guardrails(source, spec, "v2", end, "v1")  # warm the connection and the caches
    times = []
    for _ in range(count):
        started = time.perf_counter()
        result = evaluate_guardrails(source, spec, "v2", end, "v1")
        times.append(time.perf_counter() - started)
    assert result.canary.requests > spec.guardrails.min_requests, result.reason
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,10000000")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--polls", type=int, default=25)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="mlcanary-poll-"))
    end = utcnow().replace(microsecond=0)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for backend in args.backends.split(","):
        for size in sizes:
            print(f"{backend}, {size:,} rows of history", flush=True)
            url = backend_url(backend, folder)
            prepare(backend, url, size, end)
            times = polls(url, end, args.polls)
            row = {
                "backend": backend,
                "history_rows": size,
                "polls": len(times),
                "p50_s": statistics.median(times),
                "p90_s": statistics.quantiles(times, n=10)[-1],
            }
            print("    " + json.dumps(row), flush=True)
            results.append(row)
            make_engine(url).dispose()
            for f in folder.glob("bench.*"):
                f.unlink()
    (RESULTS / "guardrail_poll.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'backend':9} {'history rows':>13} {'p50 poll':>10} {'p90 poll':>10}")
    for r in results:
        print(f"{r['backend']:9} {r['history_rows']:>13,} {1000 * r['p50_s']:>8.1f}ms {1000 * r['p90_s']:>8.1f}ms")
    for backend in args.backends.split(","):
        mine = {r["history_rows"]: r["p50_s"] for r in results if r["backend"] == backend}
        ratio = mine[max(sizes)] / mine[min(sizes)]
        print(f"{backend}: p50 at {max(sizes):,} / p50 at {min(sizes):,} rows = {ratio:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
