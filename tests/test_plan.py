"""The power planner: its row counts, and its power against the analysis's own rule run by simulation."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import base_spec
from mlcanary.cli import main
from mlcanary.metrics import estimator
from mlcanary.plan import StageRows, fail_probability, plan, window_rows
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.stats.gate import weigh
from mlcanary.stats.rates import rate_log_ratio


def _spec(**analysis: Any) -> RolloutSpec:
    stages = [{"percent": 5, "bake": "20m"}, {"percent": 25, "bake": "30m"}, {"percent": 50, "bake": "1h"}]
    return parse_spec(
        base_spec(
            stages=stages,
            analysis={**base_spec()["analysis"], "label_delay": "5m", "window": "40m", "min_samples": 100, **analysis},
        )
    )


def test_the_looks_rows_are_the_requests_of_its_window_second_by_second() -> None:
    spec = _spec()
    rate = 7.0
    for k in range(len(spec.stages)):
        rows = window_rows(spec, rate, k)
        ends = np.cumsum([s.bake.total_seconds() for s in spec.stages[: k + 1]])
        end = ends[-1] - spec.analysis.label_delay.total_seconds()
        start = max(0.0, end - spec.analysis.window.total_seconds())
        seconds = np.arange(start, end) + 0.5  # brute force: each second's requests, at its stage's share
        share = np.array([spec.stages[int(np.searchsorted(ends, t))].percent / 100 for t in seconds])
        assert rows.canary == pytest.approx(rate * share.sum())
        assert rows.baseline == pytest.approx(rate * (1 - share).sum())


def _fails(x_c: int, n_c: int, x_b: int, n_b: int, spec: RolloutSpec) -> bool:
    """The analysis's FAIL rule for one rate check, as ``analyze`` calls it."""
    a, metric = spec.analysis, spec.analysis.metrics[0]
    r = rate_log_ratio(x_c, n_c, x_b, n_b)
    ev = weigh(r.theta, r.se, math.log(1 - metric.tolerance), True, a.alpha, min(n_c, n_b), a.sequential_n_star)
    return ev.p_worse <= a.alpha


@pytest.mark.parametrize(("n", "ratio"), [(40_000, 0.90), (150_000, 0.95)])
def test_the_planned_power_is_the_simulated_power_of_the_analysis_rule(n: int, ratio: float) -> None:
    spec = _spec(alpha=0.05, sequential_n_star=n, metrics=[{"name": "ctr", "tolerance": 0.01}])
    rows = StageRows(1, 5, timedelta(0), n, 19 * n)
    planned = fail_probability(spec, estimator(spec.analysis.metrics[0]), rows, 0.02, ratio)
    rng = np.random.default_rng(7)
    runs = 3000
    x_c, x_b = rng.binomial(n, 0.02 * ratio, runs), rng.binomial(19 * n, 0.02, runs)
    simulated = np.mean([_fails(int(a), n, int(b), 19 * n, spec) for a, b in zip(x_c, x_b, strict=True)])
    assert 0.15 < planned < 0.95  # a case where the power is neither 0 nor 1
    assert simulated == pytest.approx(planned, abs=4 * math.sqrt(planned * (1 - planned) / runs) + 0.01)


def test_at_the_planned_changes_the_look_fails_and_passes_with_the_planned_power() -> None:
    spec = _spec(metrics=[{"name": "ctr", "tolerance": 0.05}])
    plans = plan(spec, rate=200, baseline_ctr=0.1)
    p = plans[-1]
    assert p.fails_at is not None and p.passes_at is not None and p.fails_at < 0.95 < p.passes_at
    metric = spec.analysis.metrics[0]
    n_c, n_b = int(p.rows.canary), int(p.rows.baseline)
    rng = np.random.default_rng(3)
    runs = 2000
    for ratio, want in ((p.fails_at, "FAIL"), (p.passes_at, "PASS")):
        x_c, x_b = rng.binomial(n_c, 0.1 * ratio, runs), rng.binomial(n_b, 0.1, runs)
        hits = 0
        for a, b in zip(x_c, x_b, strict=True):
            r = rate_log_ratio(int(a), n_c, int(b), n_b)
            a = spec.analysis
            ev = weigh(r.theta, r.se, math.log(1 - metric.tolerance), True, a.alpha, min(n_c, n_b), a.sequential_n_star)
            hits += (ev.p_worse <= 0.05) if want == "FAIL" else (ev.p_within <= 0.05)
        assert hits / runs == pytest.approx(0.8, abs=0.04), (want, ratio)


def test_the_bake_needed_is_where_no_change_starts_to_pass() -> None:
    spec = _spec(window="1d", metrics=[{"name": "ctr", "tolerance": 0.05}])
    p = plan(spec, rate=20, baseline_ctr=0.1)[0]
    assert p.bake_needed is not None and p.rows_needed is not None
    seconds = int(p.bake_needed.total_seconds())
    longer = parse_spec({**base_spec(), **_dump(spec), "stages": [{"percent": 5, "bake": f"{seconds}s"}]})
    shorter = parse_spec({**base_spec(), **_dump(spec), "stages": [{"percent": 5, "bake": f"{seconds - 60}s"}]})
    assert plan(longer, rate=20, baseline_ctr=0.1)[0].passes_at <= 1.0  # no change passes with 80 %
    assert plan(shorter, rate=20, baseline_ctr=0.1)[0].passes_at > 1.0
    assert window_rows(longer, 20, 0).canary == pytest.approx(p.rows_needed, rel=0.01)


def _dump(spec: RolloutSpec) -> dict[str, Any]:
    return {"analysis": spec.analysis.model_dump(mode="json", exclude_defaults=True)}


def test_command_line_prints_every_stage_and_metric_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    analysis = {
        **base_spec()["analysis"],
        "metrics": [{"name": "ctr", "tolerance": 0.05}, {"name": "auc", "kind": "auc", "tolerance": 0.01}],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base_spec(analysis=analysis)))
    assert main(["plan", "--spec", str(path), "--rate", "100", "--baseline-ctr", "0.05", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["metric"]) for r in found] == [(s, m) for s in (1, 2, 3) for m in ("ctr", "auc")]
    assert all(r["fails_at"] is None and "scores' distribution" in r["note"] for r in found if r["metric"] == "auc")
    assert main(["plan", "--spec", str(path), "--rate", "100", "--baseline-ctr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "fails at" in out and out.count("ctr (rate)") == 3
    assert main(["plan", "--spec", str(path), "--rate", "100", "--baseline-ctr", "5"]) == 2
    assert "--baseline-ctr must lie strictly between 0 and 1" in capsys.readouterr().err
