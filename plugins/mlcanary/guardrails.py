"""Fast guardrails: absolute SLOs on the canary over a short sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from mlcanary.spec import RolloutSpec
from mlcanary.tables import predictions_table, resources_table
from mlcanary.verdict import CheckResult, Verdict, combine, first_reason
from mlcanary.warehouse import queries


@dataclass(frozen=True)
class ArmHealth:
    """What one version looked like in the window."""

    requests: int
    success_rate: float | None
    p99_latency_ms: float | None
    resource_samples: int
    cpu: float | None
    memory: float | None


@dataclass(frozen=True)
class GuardrailResult:
    verdict: Verdict
    reason: str
    window_start: datetime
    window_end: datetime
    canary: ArmHealth
    baseline: ArmHealth | None
    checks: list[CheckResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "canary": vars(self.canary),
            "baseline": None if self.baseline is None else vars(self.baseline),
            "checks": [c.to_dict() for c in self.checks],
        }


def measure_arm(conn: Connection, spec: RolloutSpec, version: str, start: datetime, end: datetime) -> ArmHealth:
    """Aggregate one version's requests and resource samples in ``[start, end)``, in the warehouse."""
    pred, res = predictions_table(spec), resources_table(spec)
    n, ok = queries.request_counts(conn, pred, spec.model, version, start, end)
    p99 = queries.latency_quantile(conn, pred, spec.model, version, start, end, 0.99) if n else None
    samples, cpu, mem = queries.resource_means(conn, res, spec.model, version, start, end)
    return ArmHealth(n, ok / n if n else None, p99, samples, cpu, mem)


def evaluate_guardrails(
    conn: Connection,
    spec: RolloutSpec,
    canary_version: str,
    at: datetime,
    baseline_version: str | None = None,
) -> GuardrailResult:
    """Check the canary against the spec's absolute SLOs over ``[at - window, at)``.

    Too few requests (or no resource samples) is no evidence: that check is INCONCLUSIVE, never PASS.
    """
    g = spec.guardrails
    start, end = at - g.window, at
    canary = measure_arm(conn, spec, canary_version, start, end)
    baseline = measure_arm(conn, spec, baseline_version, start, end) if baseline_version else None
    enough = canary.requests >= g.min_requests
    no_requests = f"no data: {canary.requests} requests < minimum {g.min_requests}"
    checks: list[CheckResult] = []

    def add(
        name: str,
        value: float | None,
        base: float | None,
        limit: float,
        ok: bool | None,
        have: bool,
        missing: str,
        text: str,
        n: int,
    ) -> None:
        if not have or value is None:
            verdict, reason = Verdict.INCONCLUSIVE, f"{name}: {missing}"
        else:
            verdict = Verdict.PASS if ok else Verdict.FAIL
            reason = f"{name} {text} (n={n})"
        checks.append(
            CheckResult(
                "guardrail",
                name,
                "*",
                verdict,
                reason,
                start,
                end,
                value,
                base,
                n,
                None if baseline is None else baseline.requests,
                limit,
            )
        )

    if g.success_rate_min is not None:
        v = canary.success_rate
        add(
            "success_rate",
            v,
            baseline and baseline.success_rate,
            g.success_rate_min,
            v is not None and v >= g.success_rate_min,
            enough,
            no_requests,
            f"{_pct(v)} {'>=' if v is not None and v >= g.success_rate_min else '<'} {_pct(g.success_rate_min)}",
            canary.requests,
        )
    if g.p99_latency_ms_max is not None:
        v = canary.p99_latency_ms
        add(
            "p99_latency_ms",
            v,
            baseline and baseline.p99_latency_ms,
            g.p99_latency_ms_max,
            v is not None and v < g.p99_latency_ms_max,
            enough,
            no_requests,
            f"{_num(v)} ms {'<' if v is not None and v < g.p99_latency_ms_max else '>='} {g.p99_latency_ms_max:g} ms",
            canary.requests,
        )
    for name, v, base, limit in (
        ("cpu", canary.cpu, baseline and baseline.cpu, g.cpu_max),
        ("memory", canary.memory, baseline and baseline.memory, g.memory_max),
    ):
        if limit is None:
            continue
        add(
            name,
            v,
            base,
            limit,
            v is not None and v < limit,
            canary.resource_samples > 0,
            "no data: no resource samples",
            f"{_pct(v)} {'<' if v is not None and v < limit else '>='} {_pct(limit)}",
            canary.resource_samples,
        )
    verdict = combine(checks)
    return GuardrailResult(verdict, first_reason(checks, verdict), start, end, canary, baseline, checks)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"
