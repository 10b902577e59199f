"""Guardrails read from a real Prometheus (Debian's package, started on loopback by the tests)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

import prometheus_server as prom
from conftest import base_spec
from mlcanary.cli import main
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.sources import MetricSourceError, PrometheusMetrics
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.schema import measurements

WINDOW = timedelta(minutes=2)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, datetime]]:
    """The server's URL and the moment its series end; skipped where there is no Prometheus, but
    never under CI=true (``make test`` unpacks Debian's package into .venv/prometheus)."""
    if prom.binaries() is None:
        message = (
            "no prometheus/promtool (run scripts/fetch_prometheus.sh .venv/prometheus, or set MLCANARY_PROMETHEUS_BIN)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the Prometheus tests for real")
        pytest.skip(message)
    end = prom.data_end()
    yield from ((url, end) for url in prom.serve(tmp_path_factory.mktemp("prometheus"), end))


def _spec(model: str = "prom-ranker", **guardrails: object) -> RolloutSpec:
    g = {
        **base_spec()["guardrails"],
        "window": "2m",
        "min_requests": 200,
        "success_rate_min": 0.99,
        "p99_latency_ms_max": 250,
        "source": {"kind": "prometheus", "queries": prom.QUERIES},
        **guardrails,
    }
    return parse_spec(base_spec(model=model, guardrails=g))


def _source(url: str, spec: RolloutSpec) -> PrometheusMetrics:
    assert spec.guardrails.source.queries is not None
    return PrometheusMetrics(url, spec.guardrails.source.queries, spec.model)


def test_measure_reads_counts_quantile_and_resources(prometheus: tuple[str, datetime]) -> None:
    url, end = prometheus
    health = _source(url, _spec()).measure("v2", end - WINDOW, end)
    arm = prom.SERIES["prom-ranker"]["v2"]
    # increase() extrapolates to the window's edges: within 1 % of the generated counts
    assert health.requests == pytest.approx(arm.rate * 120, rel=0.01)
    assert health.failures == pytest.approx(arm.rate * 120 * arm.failed, abs=1)
    # histogram_quantile on the generated buckets (Prometheus interpolates linearly in the bucket)
    assert health.p99_latency_ms == pytest.approx(1000 * prom.histogram_quantile(0.99, prom.HEALTHY), rel=1e-6)
    assert (health.cpu, health.memory, health.resource_samples) == (pytest.approx(0.5), pytest.approx(0.6), 1)
    nothing = _source(url, _spec()).measure("v9", end - WINDOW, end)
    assert (nothing.requests, nothing.p99_latency_ms, nothing.cpu) == (0, None, None)


def test_slower_than_interpolates_the_buckets(prometheus: tuple[str, datetime]) -> None:
    url, end = prometheus
    source = _source(url, _spec("prom-slow"))
    n = source.measure("v2", end - WINDOW, end).requests
    # 0.25 s lies halfway through the (0.2, 0.3] bucket: 1 - (0.6 + 0.5 * 0.2) = 30 % are slower
    assert source.slower_than("v2", end - WINDOW, end, 250.0) == pytest.approx(0.30 * n, rel=0.01)
    assert source.slower_than("v2", end - WINDOW, end, 2000.0) == 0


def test_guardrails_pass_a_healthy_canary_and_fail_a_slow_one(prometheus: tuple[str, datetime]) -> None:
    url, end = prometheus
    spec = _spec(baseline={"error_rate_ratio_max": 2.0, "p99_latency_ratio_max": 1.25})
    healthy = evaluate_guardrails(_source(url, spec), spec, "v2", end, "v1")
    assert healthy.verdict is Verdict.PASS, healthy.reason
    slow_spec = _spec("prom-slow", baseline={"error_rate_ratio_max": 2.0, "p99_latency_ratio_max": 1.25})
    slow = evaluate_guardrails(_source(url, slow_spec), slow_spec, "v2", end, "v1")
    failing = {c.check for c in slow.checks if c.verdict is Verdict.FAIL}
    assert failing == {"success_rate", "p99_latency_ms", "cpu", "error_rate_vs_baseline", "p99_latency_vs_baseline"}
    assert slow.reason.startswith("success_rate 95.00 % < 99.00 %")
    p99 = next(c for c in slow.checks if c.check == "p99_latency_ms")
    assert p99.canary_value == pytest.approx(1000 * prom.histogram_quantile(0.99, prom.SLOW), rel=1e-6)


def test_source_errors_name_the_problem(prometheus: tuple[str, datetime]) -> None:
    url, end = prometheus
    broken = _spec(source={"kind": "prometheus", "queries": {**prom.QUERIES, "requests": "sum(increase(x[$window]"}})
    with pytest.raises(MetricSourceError, match=r"Prometheus refused .*HTTP 400.*parse error"):
        _source(url, broken).measure("v2", end - WINDOW, end)
    per_status = {
        **prom.QUERIES,
        "requests": 'increase(mlc_requests_total{model="$model",version="$version"}[$window])',
    }
    with pytest.raises(MetricSourceError, match="returned 2 series; aggregate it to one"):
        _source(url, _spec(source={"kind": "prometheus", "queries": per_status})).measure("v2", end - WINDOW, end)
    with pytest.raises(MetricSourceError, match="unreachable"):
        _source("http://127.0.0.1:9", _spec()).measure("v2", end - WINDOW, end)


def test_an_empty_or_nan_answer_is_never_read_as_zero(prometheus: tuple[str, datetime]) -> None:
    """A typo in the failures metric (the real series has 5 % failing) would read as 0 failures and
    PASS: with requests counted it is an error naming the query; so are empty buckets and NaN."""
    url, end = prometheus
    typo = {**prom.QUERIES, "failures": prom.QUERIES["failures"].replace("mlc_requests_total", "mlc_request_total")}
    spec = _spec("prom-slow", source={"kind": "prometheus", "queries": typo}, p99_latency_ms_max=None)
    with pytest.raises(
        MetricSourceError, match=r"source\.queries\.failures 'sum\(increase\(mlc_request_total.* no series"
    ):
        _source(url, spec).request_counts("v2", end - WINDOW, end)
    with pytest.raises(MetricSourceError, match=r"or vector\(0\)"):
        evaluate_guardrails(_source(url, spec), spec, "v2", end, "v1")  # the poll is an error, never a PASS
    meant_zero = {**typo, "failures": f"({typo['failures']}) or vector(0)"}  # what a user writes when none means 0
    zero_spec = _spec("prom-slow", source={"kind": "prometheus", "queries": meant_zero})
    assert _source(url, zero_spec).request_counts("v2", end - WINDOW, end)[1] == 0
    no_buckets = {
        **prom.QUERIES,
        "latency_buckets": 'sum by (le) (increase(nothing_here_bucket{model="$model"}[$window]))',
    }
    source = _source(url, _spec(source={"kind": "prometheus", "queries": no_buckets}))
    with pytest.raises(MetricSourceError, match=r"source\.queries\.latency_buckets .* returned no buckets"):
        source.slower_than("v2", end - WINDOW, end, 250.0)
    nan = {
        **prom.QUERIES,
        "p99_latency_ms": "0 / 0",
        "cpu": 'avg(avg_over_time(mlc_cpu_utilisation{model="$model",version="$version"}[$window])) * NaN',
    }
    with pytest.raises(MetricSourceError, match=r"source\.queries\.(p99_latency_ms|cpu) .* returned nan"):
        _source(url, _spec(source={"kind": "prometheus", "queries": nan})).measure("v2", end - WINDOW, end)
    absent = _source(url, _spec()).measure("v9", end - WINDOW, end)  # no requests series at all: no data
    assert (absent.requests, absent.failures, absent.p99_latency_ms) == (0, 0, None)


def test_the_trigger_reads_prometheus_through_an_airflow_connection(
    prometheus: tuple[str, datetime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine
) -> None:
    """A real poll loop: the connection gives the URL, the slow canary breaches at the first poll."""
    from mlcanary_airflow import triggers

    url, end = prometheus
    host, port = url.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT", json.dumps({"conn_type": "http", "host": host, "port": int(port)})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")})
    )
    monkeypatch.setattr(triggers, "utcnow", lambda: end)  # the series lie an hour back
    spec = _spec("prom-slow")
    trigger = triggers.GuardrailTrigger(
        spec=spec.model_dump(mode="json", by_alias=True),
        rollout_id="r",
        stage=1,
        baseline_version="v1",
        canary_version="v2",
        bake_seconds=5,
        deadline_epoch=time.time() + 30,
    )
    event = asyncio.run(anext(trigger.run())).payload
    assert event["status"] == "breach" and event["polls"] == 1
    assert event["reason"].startswith("success_rate 95.00 % < 99.00 %")
    with engine.connect() as conn:
        stored = {r.check_name: r.verdict for r in conn.execute(sa.select(measurements))}
    assert stored == {"success_rate": "FAIL", "p99_latency_ms": "FAIL", "cpu": "FAIL", "memory": "PASS"}


def test_cli_guardrails_reads_prometheus(
    prometheus: tuple[str, datetime], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url, end = prometheus
    path = tmp_path / "prom.yaml"
    path.write_text(yaml.safe_dump(_spec("prom-slow").model_dump(mode="json", by_alias=True)))
    common = ["guardrails", "--spec", str(path), "--baseline-version", "v1", "--canary-version", "v2"]
    assert main([*common, "--prometheus-url", url, "--at", end.isoformat(), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "FAIL"
    assert main(common) == 2  # no URL: a clear usage error, not a crash
    assert "give --prometheus-url" in capsys.readouterr().err
