"""A real Prometheus for the tests: Debian's package, loaded with generated series through
``promtool tsdb create-blocks-from openmetrics``, serving on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from conftest import ROOT

STEP = 15  # seconds between samples, a usual scrape interval
BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0, float("inf")]  # seconds


@dataclass(frozen=True)
class Arm:
    """One version's traffic: requests per second, share failed, share at or below each bucket bound."""

    rate: float
    failed: float
    latency_cdf: tuple[float, ...]
    cpu: float = 0.5
    memory: float = 0.6


HEALTHY = (0.5, 0.9, 0.995, 1.0, 1.0, 1.0, 1.0)
SLOW = (0.1, 0.3, 0.6, 0.8, 0.97, 1.0, 1.0)
# model -> version -> traffic
SERIES: dict[str, dict[str, Arm]] = {
    "prom-ranker": {"v1": Arm(100, 0.001, HEALTHY), "v2": Arm(20, 0.001, HEALTHY)},
    "prom-slow": {"v1": Arm(100, 0.001, HEALTHY), "v2": Arm(20, 0.05, SLOW, cpu=0.95)},
}


def histogram_quantile(q: float, cdf: tuple[float, ...]) -> float:
    """Prometheus's interpolation inside the bucket holding rank q (lowest bucket starts at 0)."""
    lower, below = 0.0, 0.0
    for upper, share in zip(BUCKETS, cdf, strict=True):
        if share >= q:
            return lower + (upper - lower) * (q - below) / (share - below)
        lower, below = upper, share
    raise ValueError("q beyond the last finite bucket")


def openmetrics(end: datetime, minutes: int) -> str:
    """Every series of :data:`SERIES`, one sample every STEP seconds over ``minutes`` before ``end``."""
    steps = range(int(minutes * 60 / STEP) + 1)
    start = end.replace(tzinfo=UTC).timestamp() - minutes * 60

    def lines_for(family: str, kind: str, samples: list[tuple[str, str, Callable[[int], float]]]) -> list[str]:
        out = [f"# TYPE {family} {kind}"]
        for name, labels, value in samples:
            out += [f"{name}{{{labels}}} {value(k):.6f} {start + k * STEP:.3f}" for k in steps]
        return out

    requests, durations, cpu, memory = [], [], [], []
    for model, arms in SERIES.items():
        for version, arm in arms.items():
            labels = f'model="{model}",version="{version}"'
            per_step = arm.rate * STEP
            requests += [
                ("mlc_requests_total", labels + ',status="ok"', lambda k, a=arm, s=per_step: k * s * (1 - a.failed)),
                ("mlc_requests_total", labels + ',status="error"', lambda k, a=arm, s=per_step: k * s * a.failed),
            ]
            for le, share in zip(BUCKETS, arm.latency_cdf, strict=True):
                bound = "+Inf" if le == float("inf") else f"{le:g}"
                durations.append(
                    (
                        "mlc_request_duration_seconds_bucket",
                        labels + f',le="{bound}"',
                        lambda k, c=share, s=per_step: k * s * c,
                    )
                )
            durations.append(("mlc_request_duration_seconds_count", labels, lambda k, s=per_step: k * s))
            durations.append(("mlc_request_duration_seconds_sum", labels, lambda k, s=per_step: k * s * 0.08))
            for host in ("a", "b"):
                cpu.append(("mlc_cpu_utilisation", labels + f',host="{host}"', lambda k, a=arm: a.cpu))
                memory.append(("mlc_memory_utilisation", labels + f',host="{host}"', lambda k, a=arm: a.memory))
    text = [
        *lines_for("mlc_requests", "counter", requests),
        *lines_for("mlc_request_duration_seconds", "histogram", durations),
        *lines_for("mlc_cpu_utilisation", "gauge", cpu),
        *lines_for("mlc_memory_utilisation", "gauge", memory),
        "# EOF",
    ]
    return "\n".join(text) + "\n"


QUERIES = {
    "requests": 'sum(increase(mlc_requests_total{model="$model",version="$version"}[$window]))',
    "failures": 'sum(increase(mlc_requests_total{model="$model",version="$version",status="error"}[$window]))',
    "p99_latency_ms": "1000 * histogram_quantile(0.99, sum by (le) "
    '(increase(mlc_request_duration_seconds_bucket{model="$model",version="$version"}[$window])))',
    "latency_buckets": "sum by (le) "
    '(increase(mlc_request_duration_seconds_bucket{model="$model",version="$version"}[$window]))',
    "cpu": 'avg(avg_over_time(mlc_cpu_utilisation{model="$model",version="$version"}[$window]))',
    "memory": 'avg(avg_over_time(mlc_memory_utilisation{model="$model",version="$version"}[$window]))',
}


def binaries() -> tuple[Path, Path] | None:
    """prometheus and promtool: $MLCANARY_PROMETHEUS_BIN, the venv (scripts/fetch_prometheus.sh), or PATH."""
    for folder in (os.environ.get("MLCANARY_PROMETHEUS_BIN"), ROOT / ".venv/prometheus/usr/bin"):
        if folder and (Path(folder) / "prometheus").exists() and (Path(folder) / "promtool").exists():
            return Path(folder) / "prometheus", Path(folder) / "promtool"
    found = shutil.which("prometheus"), shutil.which("promtool")
    return (Path(found[0]), Path(found[1])) if all(found) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, end: datetime, minutes: int = 30) -> Iterator[str]:
    """Load the series, start Prometheus, yield its URL; stop it afterwards."""
    found = binaries()
    assert found is not None
    prometheus, promtool = found
    data, tsdb = folder / "series.om", folder / "tsdb"
    data.write_text(openmetrics(end, minutes))
    subprocess.run(
        [str(promtool), "tsdb", "create-blocks-from", "openmetrics", str(data), str(tsdb)],
        check=True,
        capture_output=True,
    )
    config = folder / "prometheus.yml"
    config.write_text("global:\n  evaluation_interval: 1m\nscrape_configs: []\n")
    yield from _run(prometheus, config, tsdb)


def scrape(folder: Path, jobs: list[dict[str, Any]], interval: str = "1s") -> Iterator[str]:
    """Start an empty Prometheus that scrapes ``jobs`` (Prometheus ``scrape_configs`` entries) every
    ``interval``; yield its URL; stop it afterwards."""
    found = binaries()
    assert found is not None
    config = folder / "prometheus.yml"
    settings = {"global": {"scrape_interval": interval, "evaluation_interval": "1m"}, "scrape_configs": jobs}
    config.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    yield from _run(found[0], config, folder / "tsdb")


def _run(prometheus: Path, config: Path, tsdb: Path) -> Iterator[str]:
    folder = config.parent
    port = _free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            str(prometheus),
            f"--config.file={config}",
            f"--storage.tsdb.path={tsdb}",
            "--storage.tsdb.retention.time=3650d",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start: {(folder / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def data_end() -> datetime:
    """A whole minute an hour ago (naive UTC): the series end there."""
    from mlcanary.warehouse.engine import utcnow

    return (utcnow() - timedelta(hours=1)).replace(second=0, microsecond=0)
