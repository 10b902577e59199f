"""The slow analysis at scale: time against one bare aggregate scan, peak memory, and Evidently.

For each backend (SQLite, PostgreSQL, DuckDB) and size (1 M and 10 M prediction rows: 3 segment
columns, 5 features, 10 % canary), in the same run:

- the bare scan: ``SELECT model_version, count(*), sum(score) FROM predictions GROUP BY model_version``;
- the columns scan: the same GROUP BY reading every column the analysis reads (a columnar engine
  such as DuckDB cannot do the analysis in less);
- the hand-written aggregate: one statement grouping by version, the 3 segment columns and a
  100-edge CASE score bin, with the count and the sums (the analysis's target: at most 2x this);
- the full slow analysis: CTR, AUC, precision and recall, calibration, ECE, per value of 3 segment
  columns, input drift on 5 features and output drift, run three times in a child process that
  reports its peak RSS: the best of the last two (warm, as the scans are) and the first (cold);
- Evidently's DataDriftPreset on the same 5 features + score (reference = baseline rows, current =
  canary rows), in its own virtual environment (it needs pandas < 3): ``--evidently-python``.

    .venv/bin/python bench/analysis_scale.py [--sizes 1000000,10000000] [--backends sqlite,postgres,duckdb]
        [--evidently-python /path/to/venv/bin/python]

Prints the ratios; writes bench/results/analysis_scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.simulator import SimConfig, TrafficGenerator
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine, utcnow
from mlcanary.warehouse.schema import metadata, predictions

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = [
    "request_id",
    "ts",
    "model",
    "model_version",
    "user_cohort",
    "device",
    "region",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "score",
    "label",
    "label_ts",
    "latency_ms",
    "success",
]
FEATURES = ["f1", "f2", "f3", "f4", "f5"]
PG = os.environ.get("MLCANARY_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SPEC = {
    "name": "bench",
    "model": "bench-ranker",
    "stages": [{"percent": 10, "bake": "1m"}],
    "analysis": {
        "window": "2d",
        "label_delay": "0s",
        "allow_short_bakes": True,
        "min_samples": 1000,
        "segments": ["user_cohort", "device", "region"],
        "metrics": [
            {"name": "ctr", "kind": "rate", "tolerance": 0.03},
            {"name": "auc", "kind": "auc", "tolerance": 0.02},
            {"name": "precision", "kind": "precision", "threshold": 0.3, "tolerance": 0.05},
            {"name": "recall", "kind": "recall", "threshold": 0.3, "tolerance": 0.05},
            {"name": "calibration", "kind": "calibration", "tolerance": 0.05},
            {"name": "ece", "kind": "ece", "tolerance": 0.05},
        ],
        "drift": {"features": FEATURES},
    },
}


def chunks(rows: int, end, chunk: int = 500_000):  # type: ignore[no-untyped-def]
    """Generated rows as DataFrames, oldest first, spread over the 24 h before ``end``."""
    gen = TrafficGenerator(SimConfig(model="bench-ranker", seed=5, faults=[]))
    start = end - timedelta(hours=24)
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        t0 = start + timedelta(hours=24) * done / rows
        t1 = start + timedelta(hours=24) * (done + n) / rows
        canary = np.random.default_rng(done).uniform(size=n) < 0.10
        parts = []
        for version, mask in (("v1", ~canary), ("v2", canary)):
            cols = gen.requests(
                version, int(mask.sum()), t0, t1, 10.0 if version == "v2" else 90.0, f"{done}-{version}-"
            )
            parts.append(pd.DataFrame(cols))
        df = pd.concat(parts, ignore_index=True)
        df["model"] = "bench-ranker"
        df["ts"] = pd.to_datetime(df["ts"])
        df["label_ts"] = pd.to_datetime(df["label_ts"])
        yield df[COLUMNS]
        done += n


def load(backend: str, url: str, rows: int, end) -> None:  # type: ignore[no-untyped-def]
    if backend == "duckdb":
        url = url.split("?")[0]  # building the index needs more than the analysis's memory cap
    engine = make_engine(url)
    metadata.drop_all(engine, tables=[predictions])
    predictions.create(engine)
    with engine.begin() as conn:  # load first, index afterwards
        for index in predictions.indexes:
            index.drop(conn)
    if backend == "duckdb":
        import duckdb

        engine.dispose()
        con = duckdb.connect(engine.url.database)
        for i, df in enumerate(chunks(rows, end)):
            con.register("chunk", df)
            con.execute(f"INSERT INTO predictions ({','.join(COLUMNS)}) SELECT * FROM chunk")
            con.unregister("chunk")
            print(f"    loaded {min((i + 1) * 500_000, rows):,} rows", end="\r", flush=True)
        con.close()
    raw = engine.raw_connection()
    try:
        for i, df in enumerate(chunks(rows, end) if backend != "duckdb" else []):
            if backend == "sqlite":
                values = df.astype(object).where(df.notna(), None)
                values["ts"] = df["ts"].dt.strftime("%Y-%m-%d %H:%M:%S.%f")
                values["label_ts"] = df["label_ts"].dt.strftime("%Y-%m-%d %H:%M:%S.%f")
                raw.cursor().executemany(
                    f"INSERT INTO predictions ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
                    values.itertuples(index=False),
                )
            else:
                buf = io.StringIO()
                df.to_csv(buf, index=False, header=False)
                buf.seek(0)
                with raw.cursor() as cur, cur.copy(f"COPY predictions ({','.join(COLUMNS)}) FROM STDIN WITH CSV") as cp:
                    while data := buf.read(1 << 20):
                        cp.write(data)
            raw.commit()
            print(f"    loaded {min((i + 1) * 500_000, rows):,} rows", end="\r", flush=True)
    finally:
        raw.close()
    with engine.begin() as conn:
        for index in predictions.indexes:
            index.create(conn)
        if backend == "postgres":
            conn.execute(sa.text("ANALYZE predictions"))
    engine.dispose()  # DuckDB: release the file for the measurements
    print()


BARE_SCAN = "SELECT model_version, count(*), sum(score) FROM predictions GROUP BY model_version"
# The same, reading every column the analysis reads: what a columnar engine cannot avoid.
COLUMNS_SCAN = (
    "SELECT model_version, count(*), sum(score), sum(label), max(ts), max(label_ts), count(user_cohort), "
    "count(device), count(region), sum(f1), sum(f2), sum(f3), sum(f4), sum(f5) "
    "FROM predictions WHERE model = 'bench-ranker' GROUP BY model_version"
)


def hand_written(edges: int = 100) -> str:
    """The same work written by hand as one statement: GROUP BY version, the 3 segment columns and a
    ``edges``-edge CASE score bin, with the count and the sums the metrics need."""
    cuts = [(i + 1) / (edges + 1) for i in range(edges)]
    case = "CASE " + " ".join(f"WHEN score < {c:.6f} THEN {i}" for i, c in enumerate(cuts)) + f" ELSE {edges} END"
    return (
        f"SELECT model_version, user_cohort, device, region, {case} AS b, count(*), sum(label), sum(label * label), "
        "sum(score), sum(score * score), sum(abs(score - label)), sum((score - label) * (score - label)) "
        "FROM predictions WHERE model = 'bench-ranker' AND label IS NOT NULL "
        "GROUP BY model_version, user_cohort, device, region, b"
    )


HAND_WRITTEN = hand_written()


def timed_scan(url: str, sql: str) -> float:
    engine = make_engine(url)
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.execute(sa.text(sql)).all()
        return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_analysis(url: str, end_iso: str) -> None:
    """Child process: one full analysis; prints seconds, peak RSS and the verdict as JSON."""
    from datetime import datetime

    spec = parse_spec(SPEC)
    end = datetime.fromisoformat(end_iso)
    engine = make_engine(url)
    times = []
    with engine.connect() as conn:
        for _ in range(3):  # the first from a cold process; the best of the next two, warm like the scans
            started = time.perf_counter()
            result = analyze(conn, spec, "v1", "v2", AnalysisWindow(end - timedelta(days=2), end, end))
            times.append(time.perf_counter() - started)
    rss = peak_rss_mb()
    out = {"seconds": min(times[1:]), "cold_seconds": times[0], "rss_mb": rss, "verdict": result.verdict.value}
    print(json.dumps(out | {"checks": len(result.checks)}))


def evidently(python: str, url: str, backend: str) -> dict:
    """Export the features and score of both arms to Parquet, then time Evidently on them."""
    import duckdb

    assert backend == "duckdb", "the export reads the DuckDB file"
    make_engine(url).dispose()
    folder = Path(tempfile.mkdtemp(prefix="mlcanary-evidently-"))
    cols = ", ".join([*FEATURES, "score"])
    con = duckdb.connect(make_engine(url).url.database)
    for version in ("v1", "v2"):
        con.execute(
            f"COPY (SELECT {cols} FROM predictions WHERE model_version = '{version}') "
            f"TO '{folder}/{version}.parquet' (FORMAT parquet)"
        )
    con.close()
    script = f"""
import json, os, resource, time
os.environ["DO_NOT_TRACK"] = "1"; os.environ["EVIDENTLY_DISABLE_TELEMETRY"] = "1"
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset
t = time.perf_counter()
ref, cur = pd.read_parquet("{folder}/v1.parquet"), pd.read_parquet("{folder}/v2.parquet")
load = time.perf_counter() - t
cols = {[*FEATURES, "score"]!r}
definition = DataDefinition(numerical_columns=cols)
t = time.perf_counter()
Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=definition),
                                Dataset.from_pandas(ref, data_definition=definition))
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print(json.dumps({{"seconds": time.perf_counter() - t, "load_seconds": load, "rss_mb": int(hwm) / 1024}}))
"""
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def backend_url(backend: str, folder: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{folder}/bench.db"
    if backend == "duckdb":  # DuckDB's buffer pool lives in the analysing process: cap it
        return f"duckdb:///{folder}/bench.duckdb?memory_limit=192MB"
    admin = sa.create_engine(PG)
    with admin.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS mlcanary_bench CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA mlcanary_bench"))
    return f"{PG}?options=-csearch_path%3Dmlcanary_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--backends", default="sqlite,postgres,duckdb")
    parser.add_argument("--evidently-python", help="python of a venv with evidently and pandas<3")
    parser.add_argument("--run-analysis", nargs=2, metavar=("URL", "END"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_analysis:
        run_analysis(*args.run_analysis)
        return
    RESULTS.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="mlcanary-bench-"))
    end = utcnow().replace(microsecond=0)
    results = []
    for size in map(int, args.sizes.split(",")):
        for backend in args.backends.split(","):
            print(f"{backend}, {size:,} rows")
            url = backend_url(backend, folder)
            started = time.perf_counter()
            load(backend, url, size, end)
            print(f"    load {time.perf_counter() - started:.0f} s")
            timed_scan(url, BARE_SCAN)  # warm the cache
            bare = min(timed_scan(url, BARE_SCAN) for _ in range(2))
            columns = min(timed_scan(url, COLUMNS_SCAN) for _ in range(2))
            hand = min(timed_scan(url, HAND_WRITTEN) for _ in range(2))
            make_engine(url).dispose()  # DuckDB: one process holds the file at a time
            child = subprocess.run(
                [sys.executable, __file__, "--run-analysis", url, end.isoformat()],
                capture_output=True,
                text=True,
                check=True,
            )
            full = json.loads(child.stdout.strip().splitlines()[-1])
            row = {
                "backend": backend,
                "rows": size,
                "bare_scan_s": bare,
                "columns_scan_s": columns,
                "analysis_s": full["seconds"],
                "analysis_cold_s": full["cold_seconds"],
                "ratio": full["seconds"] / bare,
                "ratio_to_columns_scan": full["seconds"] / columns,
                "hand_written_s": hand,
                "ratio_to_hand_written": full["seconds"] / hand,
                "analysis_peak_rss_mb": full["rss_mb"],
                "checks": full["checks"],
                "verdict": full["verdict"],
            }
            if args.evidently_python and size >= 10_000_000 and backend == "duckdb":
                ev = evidently(args.evidently_python, url, backend)
                row.update(
                    evidently_s=ev["seconds"], evidently_load_s=ev["load_seconds"], evidently_rss_mb=ev["rss_mb"]
                )
            print("    " + json.dumps(row))
            results.append(row)
            (RESULTS / "analysis_scale.json").write_text(json.dumps(results, indent=2))
            make_engine(url).dispose()
            for f in folder.glob("bench.*"):
                f.unlink()
    print(
        f"\n{'backend':9} {'rows':>11} {'bare scan':>10} {'analysis':>9} {'ratio':>6} "
        f"{'columns scan':>13} {'ratio':>6} {'hand-written':>13} {'ratio':>6} {'peak RSS':>9} {'cold':>7}"
    )
    for r in results:
        print(
            f"{r['backend']:9} {r['rows']:>11,} {r['bare_scan_s']:>9.3f}s {r['analysis_s']:>8.2f}s "
            f"{r['ratio']:>5.1f}x {r['columns_scan_s']:>12.3f}s {r['ratio_to_columns_scan']:>5.1f}x "
            f"{r['hand_written_s']:>12.3f}s {r['ratio_to_hand_written']:>5.1f}x {r['analysis_peak_rss_mb']:>7.0f}MB"
            f" {r['analysis_cold_s']:>6.2f}s"
        )
    print(
        "(target: analysis <= 2x the hand-written aggregate, peak RSS < 500 MB; the analysis and the scans are "
        "the best of two warm runs; cold: the analysis's first run, in a fresh process)"
    )
    for r in results:
        if "evidently_s" in r:
            print(
                f"\nEvidently DataDriftPreset, {r['rows']:,} rows x 6 columns: {r['evidently_s']:.0f} s "
                f"(+ {r['evidently_load_s']:.0f} s to load, peak RSS {r['evidently_rss_mb']:.0f} MB)"
            )
            for other in results:
                if other["rows"] == r["rows"]:
                    print(
                        f"  mlcanary on {other['backend']:8} {other['analysis_s']:7.2f} s: "
                        f"{r['evidently_s'] / other['analysis_s']:.0f}x faster"
                    )


if __name__ == "__main__":
    main()
