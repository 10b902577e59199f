"""Guardrail metrics from Prometheus: the spec's PromQL templates over the HTTP API (instant queries)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from string import Template
from typing import Any

import httpx

from mlcanary.redact import redact
from mlcanary.sources.base import ArmHealth, MetricSourceError
from mlcanary.spec import PrometheusQueries


def promql_string(value: str) -> str:
    """``value`` escaped for the inside of a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class PrometheusMetrics:
    """Evaluates the templates at the end of each window through ``GET /api/v1/query``.

    ``url`` is the server's base URL (``http://host:9090``, or with a path prefix); credentials come
    from the caller (an Airflow connection), never from the spec.
    """

    def __init__(
        self,
        url: str,
        queries: PrometheusQueries,
        model: str,
        timeout: float = 10.0,
        auth: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.queries = queries
        self.model = model
        self.timeout = timeout
        self.auth = auth
        self.headers = headers or {}

    def _render(self, template: str, version: str, start: datetime, end: datetime) -> str:
        seconds = max(1, round((end - start).total_seconds()))
        return Template(template).substitute(
            model=promql_string(self.model), version=promql_string(version), window=f"{seconds}s"
        )

    def query(self, promql: str, at: datetime) -> list[dict[str, Any]] | float | None:
        """An instant query at ``at``: the vector's samples, a scalar, or None for no data."""
        moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        try:
            response = httpx.get(
                f"{self.url}/api/v1/query",
                params={"query": promql, "time": f"{moment.timestamp():.3f}"},
                timeout=self.timeout,
                auth=self.auth,
                headers=self.headers,
            )
        except httpx.HTTPError as exc:
            raise MetricSourceError(
                f"Prometheus at {redact(self.url)} unreachable: {type(exc).__name__}: {redact(str(exc))}"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            detail = body.get("error") or response.text[:200]
            raise MetricSourceError(f"Prometheus refused {promql!r}: HTTP {response.status_code}: {detail}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        if data["resultType"] != "vector":
            raise MetricSourceError(f"{promql!r} returned a {data['resultType']}, not an instant vector or scalar")
        return data["result"] or None

    def _number(self, name: str, version: str, start: datetime, end: datetime, required: bool = False) -> float | None:
        """The one number query ``name`` returns; None for an empty answer (no data), an error when
        the answer is ``required`` (an empty ``failures`` is a typo or a missing series, never zero
        failures), NaN or infinite, or more than one series."""
        template = getattr(self.queries, name)
        if template is None:
            return None
        promql = self._render(template, version, start, end)
        result = self.query(promql, end)
        where = f"source.queries.{name} {promql!r}"
        if isinstance(result, list):
            if len(result) != 1:
                raise MetricSourceError(f"{where} returned {len(result)} series; aggregate it to one (sum, avg, ...)")
            result = float(result[0]["value"][1])
        if result is None:
            if required:
                raise MetricSourceError(
                    f"{where} returned no series while requests were counted: a wrong metric or label, or no "
                    "series yet (write `... or vector(0)` where none means zero)"
                )
            return None
        if not math.isfinite(result):
            raise MetricSourceError(f"{where} returned {result}, not a number of this window")
        return result

    def request_counts(self, version: str, start: datetime, end: datetime) -> tuple[int, int]:
        """Requests and failed requests only: the two count queries of :meth:`measure`. No requests
        series is no data; with requests counted, the failures query must answer."""
        n = round(self._number("requests", version, start, end) or 0.0)
        if n == 0:
            return 0, 0
        return n, min(n, round(self._number("failures", version, start, end, required=True) or 0.0))

    def measure(self, version: str, start: datetime, end: datetime) -> ArmHealth:
        n, failures = self.request_counts(version, start, end)
        cpu = self._number("cpu", version, start, end)
        memory = self._number("memory", version, start, end)
        problems = tuple(
            f"source.queries.{name} of {version} returned {value:g}: utilisation is a fraction (0-1), not a percentage"
            for name, value in (("cpu", cpu), ("memory", memory))
            if value is not None and not 0 <= value <= 1
        )
        return ArmHealth(
            requests=n,
            failures=failures,
            p99_latency_ms=self._number("p99_latency_ms", version, start, end, required=True) if n else None,
            resource_samples=int(cpu is not None or memory is not None),
            cpu=cpu,
            memory=memory,
            problems=problems,
        )

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        """Requests above ``latency_ms`` from the cumulative ``le`` buckets (in seconds), interpolated
        linearly inside the bucket that holds the threshold, as ``histogram_quantile`` does."""
        if self.queries.latency_buckets is None:
            raise MetricSourceError("source.queries.latency_buckets is not configured")
        promql = self._render(self.queries.latency_buckets, version, start, end)
        result = self.query(promql, end)
        where = f"source.queries.latency_buckets {promql!r}"
        if not isinstance(result, list):  # an empty answer is not "none slower"
            raise MetricSourceError(f'{where} returned no buckets; it must return cumulative buckets up to le="+Inf"')
        buckets = sorted((float(s["metric"].get("le", "nan")), float(s["value"][1])) for s in result)
        if not buckets or not math.isinf(buckets[-1][0]) or any(math.isnan(le) for le, _ in buckets):
            raise MetricSourceError(f'{where} must return cumulative buckets by le, up to le="+Inf"')
        if not all(math.isfinite(count) for _, count in buckets):
            raise MetricSourceError(f"{where} returned a NaN or infinite bucket count")
        return round(buckets[-1][1] - cumulative_at(buckets, latency_ms / 1000))


def cumulative_at(buckets: list[tuple[float, float]], x: float) -> float:
    """The cumulative count at ``x`` from sorted (upper bound, cumulative count) buckets."""
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if x < upper:
            if math.isinf(upper):
                return below  # beyond the last finite bound: nothing to interpolate with
            return below + (count - below) * (x - lower) / (upper - lower)
        lower, below = upper, count
    return buckets[-1][1]
