"""Rollout metrics for Prometheus, from the audit tables: each model's newest rollout (status,
stage, canary weight), its latest guardrail poll (each check's values, limit and verdict), and the
rollouts and rollbacks so far. Label values are bounded: one rollout per model, rollback causes
with their numbers taken out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import UTC

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.engine import Connection

from mlcanary.lifecycle import Status
from mlcanary.warehouse.schema import measurements, rollouts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def rollback_cause(reason: str | None) -> tuple[str, str]:
    """``("guardrails stage N breach", "p99_latency_ms")`` from a rollback's reason: its first clause
    with the numbers taken out, and the first check it names ("" when none)."""
    text = reason or "unknown"
    head, _, rest = text.partition(":")
    cause = re.sub(r"\d+(\.\d+)?", "N", head).strip()[:60] or "unknown"
    named = re.match(r"\s*([a-z][a-z0-9_]*)\b", rest)
    return cause, named.group(1) if named and "_" in named.group(1) else ""


class _Collector:
    """The metrics of several warehouses, each family once (Prometheus refuses a repeated family)."""

    def __init__(self, conns: Sequence[Connection]) -> None:
        self.conns = conns

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for conn in self.conns:
            for family in self._families(conn):
                if family.name in merged:
                    merged[family.name].samples += family.samples
                else:
                    merged[family.name] = family
        yield from merged.values()

    def _families(self, conn: Connection) -> Iterator[Metric]:
        r, m = rollouts.c, measurements.c
        newest = sa.select(r.model, sa.func.max(r.started_at).label("started_at")).group_by(r.model).subquery()
        latest = conn.execute(
            sa.select(rollouts).join(newest, (r.model == newest.c.model) & (r.started_at == newest.c.started_at))
        ).all()
        ids = ["model", "rollout_id", "baseline_version", "canary_version"]
        status = GaugeMetricFamily(
            "mlcanary_rollout_status", "1 for the status of each model's newest rollout", labels=[*ids, "status"]
        )
        stage = GaugeMetricFamily("mlcanary_rollout_stage", "the stage each model's newest rollout reached", labels=ids)
        weight = GaugeMetricFamily(
            "mlcanary_canary_weight_percent", "the canary's share of traffic, as the newest rollout set it", labels=ids
        )
        running = GaugeMetricFamily("mlcanary_rollout_running", "1 while the model's newest rollout runs", labels=ids)
        for row in latest:
            values = [row.model, row.rollout_id, row.baseline_version, row.canary_version]
            for s in Status:
                status.add_metric([*values, s.value], float(row.status == s.value))
            stage.add_metric(values, float(row.stage_reached or 0))
            weight.add_metric(values, float(row.canary_percent or 0.0))
            running.add_metric(values, float(not Status(row.status).ended))
        yield from (status, stage, weight, running)

        value = GaugeMetricFamily(
            "mlcanary_check_value", "the latest guardrail poll's value of each check", labels=["model", "check", "arm"]
        )
        limit = GaugeMetricFamily("mlcanary_check_limit", "each guardrail check's limit", labels=["model", "check"])
        verdict = GaugeMetricFamily(
            "mlcanary_check_verdict",
            "1 for each check's verdict in the latest poll",
            labels=["model", "check", "verdict"],
        )
        polled = GaugeMetricFamily(
            "mlcanary_last_poll_timestamp_seconds", "when the latest guardrail poll was recorded", labels=["model"]
        )
        for row in latest:
            at = conn.execute(
                sa.select(sa.func.max(m.measured_at)).where(m.rollout_id == row.rollout_id, m.tier == "guardrail")
            ).scalar()
            if at is None:
                continue
            polled.add_metric([row.model], at.timestamp() if at.tzinfo else at.replace(tzinfo=UTC).timestamp())
            checks = conn.execute(
                sa.select(m.check_name, m.canary_value, m.baseline_value, m.threshold, m.verdict).where(
                    m.rollout_id == row.rollout_id, m.tier == "guardrail", m.measured_at == at, m.segment == "*"
                )
            ).all()
            for c in checks:
                for arm, v in (("canary", c.canary_value), ("baseline", c.baseline_value)):
                    if v is not None:
                        value.add_metric([row.model, c.check_name, arm], float(v))
                if c.threshold is not None:
                    limit.add_metric([row.model, c.check_name], float(c.threshold))
                for v in ("PASS", "FAIL", "INCONCLUSIVE", "INVALID"):
                    verdict.add_metric([row.model, c.check_name, v], float(c.verdict == v))
        yield from (value, limit, verdict, polled)

        ended = CounterMetricFamily(
            "mlcanary_rollouts", "rollouts that ended, by model and status", labels=["model", "status"]
        )
        for model, st, n in conn.execute(
            sa.select(r.model, r.status, sa.func.count()).where(r.ended_at.is_not(None)).group_by(r.model, r.status)
        ):
            ended.add_metric([model, st], float(n))
        yield ended
        rolled = CounterMetricFamily(
            "mlcanary_rollbacks", "rollbacks by model and cause (numbers taken out)", labels=["model", "cause", "check"]
        )
        counts: dict[tuple[str, str, str], int] = {}
        for model, reason in conn.execute(
            sa.select(r.model, r.reason).where(r.status.in_([Status.ROLLED_BACK.value, Status.ROLLBACK_FAILED.value]))
        ):
            key = (model, *rollback_cause(reason))
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            rolled.add_metric(list(key), float(n))
        yield rolled


def exposition(conns: Sequence[Connection]) -> bytes:
    """The metrics of the warehouses behind ``conns`` in the Prometheus text format (serve with
    :data:`CONTENT_TYPE`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(conns))  # type: ignore[arg-type]
    return generate_latest(registry)
