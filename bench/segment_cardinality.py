"""A segment column with 20,000 distinct values against one with 5, on the same rows.

The analysis keeps each segment column's ``max_segment_values`` (default 50) most frequent values and
sums the rest as one ``(other)`` segment. Target: the look's time and peak memory with 20,000 values
within 2x of those with 5 values, and the audit rows bounded. Each look runs in a child process that
reports its peak RSS.

    .venv/bin/python bench/segment_cardinality.py [--rows 200000] [--backends sqlite,duckdb]

Prints the ratios; writes bench/results/segment_cardinality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, predictions

HERE = Path(__file__).resolve().parent
END = datetime(2026, 12, 1, 12, 0, 0)
SPEC = {
    "name": "bench",
    "model": "bench-ranker",
    "stages": [{"percent": 10, "bake": "1m"}],
    "analysis": {
        "window": "2d",
        "label_delay": "0s",
        "allow_short_bakes": True,
        "min_samples": 100,
        "segments": ["region"],
        "metrics": [
            {"name": "ctr", "kind": "rate", "tolerance": 0.03},
            {"name": "auc", "kind": "auc", "tolerance": 0.02},
        ],
    },
}


def load(url: str, rows: int, values: int) -> None:
    rng = np.random.default_rng(values)
    engine = make_engine(url)
    create_schema(engine)
    ts = [END - timedelta(seconds=float(s)) for s in rng.uniform(1, 86_400, rows)]
    version = np.where(rng.uniform(size=rows) < 0.2, "v2", "v1")
    score = rng.uniform(size=rows)
    label = (rng.uniform(size=rows) < score * 0.4).astype(float)
    region = rng.zipf(1.3, rows) % values  # a long tail, as real high-cardinality columns have
    batch = [
        {
            "request_id": f"r{i}",
            "ts": ts[i],
            "model": "bench-ranker",
            "model_version": version[i],
            "region": f"g{region[i]}",
            "score": float(score[i]),
            "label": float(label[i]),
            "label_ts": ts[i],
            "latency_ms": 20.0,
            "success": 1,
        }
        for i in range(rows)
    ]
    with engine.begin() as conn:
        for start in range(0, rows, 50_000):
            conn.execute(sa.insert(predictions), batch[start : start + 50_000])
    engine.dispose()


def look(url: str) -> None:
    """Child process: one analysis; prints seconds, peak RSS (MB), checks and distinct regions as JSON."""
    spec = parse_spec(SPEC)
    with make_engine(url).connect() as conn:
        started = time.perf_counter()
        result = analyze(conn, spec, "v1", "v2", AnalysisWindow(END - timedelta(days=2), END, END))
        took = time.perf_counter() - started
    peak = next(
        int(x.split()[1]) / 1024 for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:")
    )
    regions = {c.segment for c in result.checks if c.segment.startswith("region=")}
    print(json.dumps({"seconds": took, "peak_mb": peak, "checks": len(result.checks), "regions": len(regions)}))


def measure(url: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--look", url], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--backends", default="sqlite,duckdb")
    parser.add_argument("--look")
    args = parser.parse_args()
    if args.look:
        look(args.look)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            row = {"backend": backend, "rows": args.rows}
            for values in (5, 20_000):
                url = f"{backend}:///{tmp}/{backend}-{values}.db"
                print(f"{backend}: loading {args.rows:,} rows with {values:,} region values ...", flush=True)
                load(url, args.rows, values)
                measure(url)  # warm the file cache
                row[values] = min((measure(url) for _ in range(3)), key=lambda m: m["seconds"])
                m = row[values]
                print(
                    f"  {values:>6,} values: {m['seconds']:.2f} s, peak {m['peak_mb']:.0f} MB, "
                    f"{m['checks']} checks, {m['regions']} region segments"
                )
            few, many = row[5], row[20_000]
            row["time_ratio"] = many["seconds"] / few["seconds"]
            row["memory_ratio"] = many["peak_mb"] / few["peak_mb"]
            print(
                f"  20,000 vs 5 values: time x{row['time_ratio']:.2f}, peak memory x{row['memory_ratio']:.2f} "
                f"(target <= 2), audit rows {many['checks']} vs {few['checks']}"
            )
            results.append(row)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "segment_cardinality.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
