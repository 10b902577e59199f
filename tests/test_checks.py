"""Guardrails and slow analysis on simulated warehouse data: the verdicts a user relies on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from conftest import Writer, base_spec
from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.sources import WarehouseMetrics
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.verdict import Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import predictions


def _guard(engine: sa.Engine, spec: RolloutSpec, at=None):  # type: ignore[no-untyped-def]
    return evaluate_guardrails(WarehouseMetrics(engine, spec), spec, "v2", at or utcnow(), "v1")


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
        ("v2:error_rate=0.2", "success_rate"),
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


def _requests(engine: sa.Engine, version: str, n: int, failed: int, end: datetime, seconds: float = 3.0) -> None:
    """Exactly ``n`` requests of ``version`` in the ``seconds`` before ``end``, ``failed`` of them failed."""
    rows = [
        dict(
            request_id=f"{version}-{end:%H%M%S}-{i}",
            ts=end - timedelta(seconds=seconds * (i + 0.5) / n),
            model="unit-ranker",
            model_version=version,
            latency_ms=50.0,
            success=int(i >= failed),
        )
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(predictions), rows)


def test_error_budget_is_a_count_test(engine: sa.Engine, spec: RolloutSpec) -> None:
    """3 % failed against a 2 % budget: not significant on 300 requests (the stage holds); on 30,000 it is."""
    now = utcnow()
    _requests(engine, "v2", 300, 9, now)
    held = next(c for c in _guard(engine, spec, now).checks if c.check == "success_rate")
    assert held.verdict is Verdict.INCONCLUSIVE
    assert "97.00 % < 98.00 % but not significantly" in held.reason and "holding" in held.reason
    later = now + timedelta(minutes=1)
    _requests(engine, "v2", 30_000, 900, later)
    failed = next(c for c in _guard(engine, spec, later).checks if c.check == "success_rate")
    assert failed.verdict is Verdict.FAIL and "error budget" in failed.reason
    assert (failed.canary_value, failed.canary_n) == (pytest.approx(0.97), 30_000)


def _relative(**baseline: object) -> RolloutSpec:
    g = {**base_spec()["guardrails"], "window": "1m", "baseline": baseline}
    return parse_spec(base_spec(guardrails=g))


def test_shared_outage_holds_instead_of_failing_the_canary(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=2, rate=200, faults=("v1:error_rate=0.2", "v2:error_rate=0.2"))
    excused = _guard(engine, _relative(excuse_shared_breach=True), now)
    checks = {c.check: c for c in excused.checks}
    assert checks["success_rate"].verdict is Verdict.INCONCLUSIVE
    assert "shared with the baseline" in checks["success_rate"].reason
    assert checks["error_rate_vs_baseline"].verdict is Verdict.PASS
    assert excused.verdict is Verdict.INCONCLUSIVE  # the stage holds: no bake, no rollback
    strict = _guard(engine, _relative(excuse_shared_breach=False), now)
    assert strict.verdict is Verdict.FAIL and strict.reason.startswith("success_rate")


def test_canary_worse_than_the_baseline_fails_the_relative_checks(engine: sa.Engine, write_batch: Writer) -> None:
    # Both within the absolute SLOs (98 %, 250 ms), but the canary is clearly worse than the baseline.
    now = write_batch(engine, minutes=2, rate=400, faults=("v2:error_rate=0.012", "v2:latency_ms=80"), seed=2)
    result = _guard(engine, _relative(error_rate_ratio_max=1.5, p99_latency_ratio_max=1.2), now)
    checks = {c.check: c for c in result.checks}
    assert checks["success_rate"].verdict is Verdict.PASS and checks["p99_latency_ms"].verdict is Verdict.PASS
    assert checks["error_rate_vs_baseline"].verdict is Verdict.FAIL
    assert checks["p99_latency_vs_baseline"].verdict is Verdict.FAIL
    assert "slower than" in checks["p99_latency_vs_baseline"].reason
    assert result.verdict is Verdict.FAIL
    same = write_batch(engine, minutes=2, rate=400, seed=3, end=now + timedelta(minutes=10))
    healthy = _guard(engine, _relative(error_rate_ratio_max=1.5, p99_latency_ratio_max=1.2), same)
    assert {c.check: c.verdict for c in healthy.checks}["error_rate_vs_baseline"] is Verdict.PASS
    assert {c.check: c.verdict for c in healthy.checks}["p99_latency_vs_baseline"] is Verdict.PASS


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


def test_an_inconclusive_result_cites_the_required_check_that_is_not_conclusive(
    engine: sa.Engine, write_batch: Writer
) -> None:
    """A healthy canary whose CTR passes overall while its segments and the AUC are still open: the
    result names the AUC overall (required), not the first open segment (not required)."""
    analysis = {
        **base_spec()["analysis"],
        "metrics": [{"name": "ctr", "tolerance": 0.1}, {"name": "auc", "kind": "auc", "tolerance": 0.0005}],
    }
    spec = parse_spec(base_spec(analysis=analysis))
    now = write_batch(engine, minutes=20, rate=50, canary_percent=40)
    result = _analyze(engine, spec, now)
    open_checks = [c for c in result.checks if c.verdict is not Verdict.PASS]
    assert result.verdict is Verdict.INCONCLUSIVE, result.reason
    assert next(c for c in result.checks if (c.check, c.segment) == ("ctr", "*")).verdict is Verdict.PASS
    assert not open_checks[0].required  # what the result cited before: a segment nobody requires
    decided = next(c for c in open_checks if c.required)
    assert (decided.check, decided.segment) == ("auc", "*")
    assert result.reason.startswith(decided.reason) and result.reason.startswith("auc: AUC")


def test_small_samples_are_inconclusive_never_pass(engine: sa.Engine, spec: RolloutSpec, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=1, rate=10)
    result = _analyze(engine, spec, now)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert all(c.verdict is Verdict.INCONCLUSIVE for c in result.checks)  # the drift checks too
    assert "too few labelled samples" in result.reason


def test_no_data_at_all_is_inconclusive(engine: sa.Engine, spec: RolloutSpec) -> None:
    result = _analyze(engine, spec, utcnow())
    assert result.verdict is Verdict.INCONCLUSIVE
    assert [(c.check, c.segment) for c in result.checks] == [("ctr", "*"), ("output_drift", "*")]


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
                "min_label_window": "1s",
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


def _spec_with(metrics: list[dict], **analysis: object) -> RolloutSpec:
    base = base_spec()["analysis"]
    return parse_spec(base_spec(analysis={**base, "metrics": metrics, "min_samples": 500, **analysis}))


def _insert_confusion(engine: sa.Engine, version: str, cohort: str, tp: int, fn: int, fp: int, tn: int, end) -> None:  # type: ignore[no-untyped-def]
    """Rows with a given confusion matrix at threshold 0.5 (scores 0.8 / 0.2)."""
    from mlcanary.warehouse.schema import predictions

    rows = []
    for count, label, score in ((tp, 1.0, 0.8), (fn, 1.0, 0.2), (fp, 0.0, 0.8), (tn, 0.0, 0.2)):
        for i in range(count):
            ts = end - timedelta(minutes=5, seconds=i % 240)
            rows.append(
                dict(
                    request_id=f"{version}-{cohort}-{label}-{score}-{i}",
                    ts=ts,
                    model="unit-ranker",
                    model_version=version,
                    user_cohort=cohort,
                    score=score,
                    label=label,
                    label_ts=ts + timedelta(seconds=1),
                    latency_ms=50.0,
                    success=1,
                )
            )
    with engine.begin() as conn:
        conn.execute(sa.insert(predictions), rows)


def test_field_case_precision_up_while_new_user_recall_falls(engine: sa.Engine) -> None:
    """research/DESIGN: overall precision 0.82 → 0.85 while recall for new users falls 0.60 → 0.45: FAIL."""
    end = utcnow()
    # baseline: new recall 1200/2000 = 0.60, returning 6000/8000; precision 7200/8780 = 0.82
    _insert_confusion(engine, "v1", "new", 1200, 800, 316, 4000, end)
    _insert_confusion(engine, "v1", "returning", 6000, 2000, 1264, 16000, end)
    # canary: new recall 900/2000 = 0.45, returning 6300/8000; precision 7200/8470 = 0.85
    _insert_confusion(engine, "v2", "new", 900, 1100, 254, 4000, end)
    _insert_confusion(engine, "v2", "returning", 6300, 1700, 1016, 16000, end)
    spec = _spec_with(
        [
            {"name": "precision", "kind": "precision", "threshold": 0.5, "tolerance": 0.05},
            {"name": "recall", "kind": "recall", "threshold": 0.5, "tolerance": 0.05},
        ]
    )
    result = _analyze(engine, spec, end)
    by = {(c.check, c.segment): c for c in result.checks}
    assert by[("precision", "*")].baseline_value == pytest.approx(0.82, abs=1e-3)
    assert by[("precision", "*")].canary_value == pytest.approx(0.85, abs=1e-3)
    assert by[("precision", "*")].verdict is Verdict.PASS
    recall_new = by[("recall", "user_cohort=new")]
    assert (recall_new.baseline_value, recall_new.canary_value) == pytest.approx((0.60, 0.45))
    assert recall_new.verdict is Verdict.FAIL
    assert result.verdict is Verdict.FAIL
    assert "recall for user_cohort=new fell 0.6 → 0.45" in result.reason and "tolerance 5 %" in result.reason


def test_miscalibrated_canary_fails_calibration(engine: sa.Engine, write_batch: Writer) -> None:
    """A canary that predicts ~70 % where ~50 % is observed (logit +0.85) must FAIL."""
    now = write_batch(engine, minutes=10, rate=60, canary_percent=40, faults=("v2:miscalibration=0.85",), base_ctr=0.5)
    spec = _spec_with(
        [
            {"name": "calibration", "kind": "calibration", "tolerance": 0.05},
            {"name": "ece", "kind": "ece", "tolerance": 0.05},
        ]
    )
    result = _analyze(engine, spec, now)
    by = {(c.check, c.segment): c for c in result.checks}
    cal = by[("calibration", "*")]
    assert cal.verdict is Verdict.FAIL and abs(cal.canary_value) > 0.12 > 0.03 > abs(cal.baseline_value)
    assert by[("ece", "*")].verdict is Verdict.FAIL
    assert result.verdict is Verdict.FAIL


def test_calibrated_canary_passes_calibration(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=20, rate=60, canary_percent=50, base_ctr=0.5)
    spec = _spec_with([{"name": "calibration", "kind": "calibration", "tolerance": 0.05}], segments=[])
    result = _analyze(engine, spec, now)
    assert result.checks[0].verdict is Verdict.PASS, result.checks[0].reason


def test_auc_drop_fails_and_equal_models_do_not(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=20, rate=60, canary_percent=50, faults=("v2:recall_drop=0.3",))
    spec = _spec_with([{"name": "auc", "kind": "auc", "tolerance": 0.02}], segments=[])
    bad = _analyze(engine, spec, now).checks[0]
    assert bad.verdict is Verdict.FAIL and bad.canary_value < bad.baseline_value - 0.05
    assert "AUC" in bad.reason


def test_auc_of_equal_models_is_not_a_fail(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=20, rate=60, canary_percent=50)
    spec = _spec_with([{"name": "auc", "kind": "auc", "tolerance": 0.02}], segments=[])
    check = _analyze(engine, spec, now).checks[0]
    assert check.verdict is Verdict.PASS and abs(check.canary_value - check.baseline_value) < 0.02


def test_input_drift_makes_the_comparison_invalid(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=10, rate=60, canary_percent=40, faults=("v2:input_drift=0.8",))
    spec = _spec_with([{"name": "ctr", "tolerance": 0.1}], drift={"features": ["f1", "f2"]})
    result = _analyze(engine, spec, now)
    by = {c.check: c for c in result.checks if c.segment == "*"}
    assert by["input_drift_f1"].verdict is Verdict.INVALID and by["input_drift_f1"].canary_value > 0.2
    assert by["input_drift_f2"].verdict is Verdict.PASS
    assert result.verdict is Verdict.INVALID
    assert "comparison invalid" in result.reason


def test_output_drift_is_reported_not_gating_by_default(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=10, rate=60, canary_percent=40, faults=("v2:miscalibration=1.5",))
    report = _analyze(engine, _spec_with([{"name": "ctr", "tolerance": 0.1}], segments=[]), now)
    out = next(c for c in report.checks if c.check == "output_drift")
    assert out.verdict is Verdict.FAIL and not out.gating
    assert report.verdict is not Verdict.FAIL
    gating = _analyze(
        engine, _spec_with([{"name": "ctr", "tolerance": 0.1}], segments=[], drift={"output": "fail"}), now
    )
    assert gating.verdict is Verdict.FAIL


def test_aggregate_improves_while_a_segment_degrades_is_flagged(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(
        engine,
        minutes=30,
        rate=120,
        canary_percent=50,
        faults=("v2:ctr_drop=-0.15", "v2:ctr_drop=0.35;segment=user_cohort:new"),
    )
    result = _analyze(engine, _spec_with([{"name": "ctr", "tolerance": 0.05}]), now)
    overall = next(c for c in result.checks if c.segment == "*")
    assert overall.canary_value > overall.baseline_value
    assert result.flags == ["ctr improves overall while user_cohort=new (FAIL) degrades beyond tolerance"]
    assert result.verdict is Verdict.FAIL and "improves overall" in result.reason


def test_sequential_interval_is_wider_than_the_fixed_one(engine: sa.Engine, write_batch: Writer) -> None:
    now = write_batch(engine, minutes=10, rate=60)
    seq = _analyze(engine, _spec_with([{"name": "ctr", "tolerance": 0.1}], segments=[]), now).checks[0]
    fixed = _analyze(
        engine, _spec_with([{"name": "ctr", "tolerance": 0.1}], segments=[], sequential=False), now
    ).checks[0]
    assert seq.ci_high - seq.ci_low > 1.3 * (fixed.ci_high - fixed.ci_low)
    assert "CS" in seq.reason and "CI" in fixed.reason
