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


@dataclass(frozen=True)
class _Limit:
    name: str
    limit: float | None
    upper: bool  # the value must stay below the limit (else: at or above it)
    unit: str  # "%" or "ms"
    samples: str  # which count is the evidence: "requests" or "resource_samples"


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
    limits = [
        _Limit("success_rate", g.success_rate_min, False, "%", "requests"),
        _Limit("p99_latency_ms", g.p99_latency_ms_max, True, "ms", "requests"),
        _Limit("cpu", g.cpu_max, True, "%", "resource_samples"),
        _Limit("memory", g.memory_max, True, "%", "resource_samples"),
    ]
    checks: list[CheckResult] = []
    for lim in limits:
        if lim.limit is None:
            continue
        value: float | None = getattr(canary, lim.name)
        n: int = getattr(canary, lim.samples)
        enough = n >= g.min_requests if lim.samples == "requests" else n > 0
        if not enough or value is None:
            verdict = Verdict.INCONCLUSIVE
            reason = (
                f"{lim.name}: no data: {n} requests < minimum {g.min_requests}"
                if lim.samples == "requests"
                else f"{lim.name}: no data: no resource samples"
            )
        else:
            ok = value < lim.limit if lim.upper else value >= lim.limit
            verdict = Verdict.PASS if ok else Verdict.FAIL
            sign = ("<" if ok else ">=") if lim.upper else (">=" if ok else "<")
            reason = f"{lim.name} {_fmt(value, lim.unit)} {sign} {_fmt(lim.limit, lim.unit)} (n={n})"
        checks.append(
            CheckResult(
                tier="guardrail",
                check=lim.name,
                segment="*",
                verdict=verdict,
                reason=reason,
                window_start=start,
                window_end=end,
                canary_value=value,
                baseline_value=None if baseline is None else getattr(baseline, lim.name),
                canary_n=n,
                baseline_n=None if baseline is None else getattr(baseline, lim.samples),
                threshold=lim.limit,
            )
        )
    verdict = combine(checks)
    reason = (
        "healthy: " + "; ".join(c.reason for c in checks) if verdict is Verdict.PASS else first_reason(checks, verdict)
    )
    return GuardrailResult(verdict, reason, start, end, canary, baseline, checks)


def _fmt(value: float, unit: str) -> str:
    return f"{100 * value:.2f} %" if unit == "%" else f"{value:.1f} ms"
