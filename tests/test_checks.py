"""Guardrails and slow analysis on simulated warehouse data: the verdicts a user relies on."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow


def _guard(engine: sa.Engine, spec: RolloutSpec, at=None):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return evaluate_guardrails(conn, spec, "v2", at or utcnow(), "v1")


def _by_check(result) -> dict[str, Verdict]:  # type: ignore[no-untyped-def]
    return {c.check: c.verdict for c in result.checks}


def test_guardrails_pass_on_healthy_canary(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=2, rate=200)
    result = _guard(engine, spec, now)
    assert result.verdict is Verdict.PASS, result.reason
    assert set(_by_check(result)) == {"success_rate", "p99_latency_ms", "cpu", "memory"}
    assert result.canary.requests > spec.guardrails.min_requests
    assert result.baseline is not None and result.baseline.requests > result.canary.requests
    json.dumps(result.to_dict())


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        ("v2:latency_ms=300", "p99_latency_ms"),
        ("v2:error_rate=0.05", "success_rate"),
        ("v2:cpu=0.97", "cpu"),
        ("v2:memory=0.99", "memory"),
    ],
)
def test_guardrails_fail_on_each_fault(
    engine: sa.Engine, spec: RolloutSpec, write_batch: Writer, fault: str, failing: str
) -> None:
    now = write_batch(engine, minutes=2, rate=200, faults=(fault,))
    result = _guard(engine, spec, now)
    assert result.verdict is Verdict.FAIL
    assert {k for k, v in _by_check(result).items() if v is Verdict.FAIL} == {failing}
    assert result.reason.startswith(failing)


def test_guardrails_never_pass_without_evidence(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    empty = _guard(engine, spec)
    assert empty.verdict is Verdict.INCONCLUSIVE and "no data" in empty.reason
    now = write_batch(engine, minutes=2, rate=20, canary_percent=2)  # ~1.6 canary requests per window
    thin = _guard(engine, spec, now)
    assert _by_check(thin)["success_rate"] is Verdict.INCONCLUSIVE
    assert thin.verdict is Verdict.INCONCLUSIVE


def test_guardrail_window_is_sliding(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    end = write_batch(engine, minutes=2, rate=200, faults=("v2:latency_ms=400",))
    assert _guard(engine, spec, end).verdict is Verdict.FAIL
    assert _guard(engine, spec, end + timedelta(minutes=5)).verdict is Verdict.INCONCLUSIVE


def _analyze(engine: sa.Engine, spec: RolloutSpec, now) -> object:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return analyze(conn, spec, "v1", "v2", AnalysisWindow.ending_at(spec, now))


def test_ctr_drop_fails_with_readable_reason(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=10, rate=50, faults=("v2:ctr_drop=0.3",))
    result = _analyze(engine, spec, now)
    assert result.verdict is Verdict.FAIL
    overall = next(c for c in result.checks if c.segment == "*")
    assert overall.verdict is Verdict.FAIL and overall.ci_high < overall.threshold == 0.9
    assert result.reason.startswith("ctr fell") and "tolerance 10 %" in result.reason
    json.dumps(result.to_dict())


def test_healthy_canary_passes_when_evidence_is_enough(
    engine: sa.Engine, spec: RolloutSpec, write_batch: Writer
) -> None:
    now = write_batch(engine, minutes=20, rate=50, canary_percent=40)
    result = _analyze(engine, spec, now)
    overall = next(c for c in result.checks if c.segment == "*")
    assert overall.verdict is Verdict.PASS and overall.ci_low > 0.9
    assert result.verdict is Verdict.PASS


def test_small_samples_are_inconclusive_never_pass(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=1, rate=10)
    result = _analyze(engine, spec, now)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert all(c.verdict is Verdict.INCONCLUSIVE for c in result.checks)
    assert "too few labelled samples" in result.reason


def test_no_data_at_all_is_inconclusive(engine: sa.Engine, spec: RolloutSpec) -> None:
    result = _analyze(engine, spec, utcnow())
    assert result.verdict is Verdict.INCONCLUSIVE
    assert [c.segment for c in result.checks] == ["*"]


def test_gate_is_on_the_interval_not_the_point_estimate(engine: sa.Engine, write_batch: Writer) -> None:
    """A canary ~15 % below baseline with a 10 % tolerance: FAIL only once the interval says so."""
    spec = parse_spec(base_spec(analysis={**base_spec()["analysis"], "min_samples": 50, "segments": []}))
    now = write_batch(engine, minutes=2, rate=20, faults=("v2:ctr_drop=0.15",), seed=2)
    small = _analyze(engine, spec, now)
    check = small.checks[0]
    assert check.canary_value < 0.9 * check.baseline_value  # the point estimate is beyond tolerance ...
    assert small.verdict is Verdict.INCONCLUSIVE  # ... but the interval straddles it
    assert check.ci_low < 0.9 < check.ci_high


def test_one_segment_regression_fails_even_if_overall_passes(engine: sa.Engine, write_batch: Writer) -> None:
    spec = parse_spec(base_spec(analysis={**base_spec()["analysis"], "min_samples": 500}))
    now = write_batch(
        engine, minutes=30, rate=50, canary_percent=40, faults=("v2:ctr_drop=0.4;segment=user_cohort:new",)
    )
    result = _analyze(engine, spec, now)
    verdicts = {c.segment: c.verdict for c in result.checks}
    assert verdicts["user_cohort=new"] is Verdict.FAIL
    assert verdicts["user_cohort=power"] is not Verdict.FAIL
    assert result.verdict is Verdict.FAIL
    assert "user_cohort=new" in result.reason


def test_prediction_error_critical_segment(engine: sa.Engine, write_batch: Writer) -> None:
    """Mean absolute error, lower is better, with a critical segment tighter than the overall tolerance."""
    spec = parse_spec(
        base_spec(
            analysis={
                "label_delay": "1s",
                "window": "1h",
                "min_samples": 500,
                "segments": ["device"],
                "critical_segments": [{"column": "device", "value": "web", "tolerance": 0.05}],
                "metrics": [
                    {
                        "name": "abs_error",
                        "kind": "mean",
                        "value": "abs_error",
                        "higher_is_better": False,
                        "tolerance": 0.5,
                    }
                ],
            }
        )
    )
    now = write_batch(
        engine, minutes=30, rate=50, canary_percent=40, faults=("v2:miscalibration=1.2;segment=device:web",)
    )
    result = _analyze(engine, spec, now)
    web = next(c for c in result.checks if c.segment == "device=web")
    assert web.verdict is Verdict.FAIL and web.threshold == pytest.approx(1.05)
    assert web.required
    assert result.verdict is Verdict.FAIL
