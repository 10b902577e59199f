"""Outside oracles, run in their own virtual environment (``.venv/oracles``, requirements-oracles.txt:
gbstats and Evidently need numpy < 2 and pandas < 2):

- GrowthBook's ``SequentialTwoSidedTTest`` against the confidence sequence (``stats.sequential``,
  through ``stats.gate.weigh``): same interval and p-value to floating-point precision, with
  gbstats' ``alpha`` = 2α (each side of ours is a one-sided α bound), ``difference_type="absolute"``
  and tuning parameter ``n_star·(n_b + n_c) / n_c`` (gbstats counts both arms, we count the canary);
- Evidently's PSI (``psi_stat_test`` on the bin indices as a categorical feature, so that both use
  the same bins) against ``stats.drift``: equal when no bin is empty; with empty bins Evidently puts
  1e-4 (or the smallest share / 1e6) in an empty bin and does not renormalise, we floor every share
  at 1e-4 and renormalise, so the two differ there, by exactly that convention.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlcanary.stats.drift import drift
from mlcanary.stats.gate import weigh
from mlcanary.stats.sequential import anytime_p_value

ORACLES = Path(__file__).resolve().parents[1] / ".venv" / "oracles" / "bin" / "python"

_GBSTATS = """
import json, sys
from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
from gbstats.models.statistics import ProportionStatistic, SampleMeanStatistic
out = []
for c in json.load(sys.stdin):
    def stat(arm):
        if "sum_squares" in arm:
            return SampleMeanStatistic(n=arm["n"], sum=arm["sum"], sum_squares=arm["sum_squares"])
        return ProportionStatistic(n=arm["n"], sum=arm["sum"])
    config = SequentialConfig(alpha=c["alpha"], difference_type="absolute", test_value=c["test_value"],
                              sequential_tuning_parameter=c["tuning"])
    test = SequentialTwoSidedTTest(stat(c["baseline"]), stat(c["canary"]), config)
    r = test.compute_result()
    out.append({"ci": list(r.ci), "p": r.p_value, "theta": test.point_estimate, "variance": test.variance})
print(json.dumps(out))
"""

_EVIDENTLY = """
import json, os, sys
os.environ["DO_NOT_TRACK"] = "1"
import numpy as np, pandas as pd
from evidently.legacy.calculations.stattests import psi_stat_test
from evidently.legacy.core import ColumnType
out = []
for ref, cur in json.load(sys.stdin):
    r = pd.Series(np.repeat(np.arange(len(ref)), ref))
    c = pd.Series(np.repeat(np.arange(len(cur)), cur))
    out.append(float(psi_stat_test(r, c, ColumnType.Categorical, 0.1).drift_score))
print(json.dumps(out))
"""


def _oracle(script: str, cases: Any) -> Any:
    if not ORACLES.exists():
        message = f"{ORACLES} is missing: make .venv/oracles/.installed (requirements-oracles.txt) creates it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the oracle tests")
        pytest.skip(message)
    done = subprocess.run(
        [str(ORACLES), "-c", script], input=json.dumps(cases), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cases() -> list[dict[str, Any]]:
    rng = np.random.default_rng(11)
    cases = []
    for _ in range(40):
        n_c = int(rng.integers(200, 200_000))
        n_b = int(n_c * rng.uniform(1, 20))
        alpha = float(rng.choice([0.01, 0.025, 0.05, 0.1]))
        n_star = float(rng.choice([1_000, 10_000, 100_000]))
        if rng.uniform() < 0.5:  # proportions (CTR)
            p_b = float(rng.uniform(0.01, 0.5))
            p_c = p_b * float(rng.uniform(0.8, 1.2))
            arms = {"canary": {"n": n_c, "sum": round(p_c * n_c)}, "baseline": {"n": n_b, "sum": round(p_b * n_b)}}
        else:  # means with a spread (an error metric)
            scale = float(rng.uniform(0.5, 2.0))

            def arm(n: int, scale: float = scale) -> dict[str, float]:
                x = rng.gamma(2.0, scale, size=min(n, 5000))
                k = n / len(x)
                return {"n": n, "sum": float(x.sum() * k), "sum_squares": float((x * x).sum() * k)}

            arms = {"canary": arm(n_c), "baseline": arm(n_b)}

        def moments(a: dict[str, float]) -> tuple[float, float]:
            mean = a["sum"] / a["n"]
            return mean, (a["sum_squares"] / a["n"] - mean**2) if "sum_squares" in a else mean * (1 - mean)

        (m_c, v_c), (m_b, v_b) = moments(arms["canary"]), moments(arms["baseline"])
        near = m_c - m_b + float(rng.uniform(-6, 6)) * math.sqrt(v_c / n_c + v_b / n_b)  # some far, some near
        cases.append({"alpha": 2 * alpha, "our_alpha": alpha, "n_star": n_star, "tuning": n_star * (n_b + n_c) / n_c,
                      "test_value": near, **arms})  # fmt: skip
    return cases


def test_the_confidence_sequence_is_gbstats_sequential_two_sided_t_test() -> None:
    cases = _cases()
    found = _oracle(_GBSTATS, cases)
    for case, gb in zip(cases, found, strict=True):
        n_c = case["canary"]["n"]
        theta, se = gb["theta"], math.sqrt(gb["variance"])  # the difference and its variance, as gbstats has them
        ev = weigh(theta, se, case["test_value"], True, case["our_alpha"], n_c, case["n_star"])
        assert ev.low == pytest.approx(gb["ci"][0], rel=1e-9, abs=1e-12)
        assert ev.high == pytest.approx(gb["ci"][1], rel=1e-9, abs=1e-12)
        t = abs(theta - case["test_value"]) / se
        ours = anytime_p_value(t, n_c, case["alpha"], case["n_star"])
        assert ours == pytest.approx(gb["p"], rel=1e-9, abs=1e-15)
    assert any(gb["p"] < 0.05 for gb in found) and any(gb["p"] > 0.5 for gb in found)  # both kinds of case


def test_psi_is_evidently_psi_on_the_same_bins() -> None:
    rng = np.random.default_rng(5)
    full = [(rng.integers(50, 5000, 10).tolist(), rng.integers(50, 5000, 10).tolist()) for _ in range(20)]
    full += [(rng.integers(1, 100, 100).tolist(), rng.integers(1, 100, 100).tolist()) for _ in range(5)]
    theirs = _oracle(_EVIDENTLY, full)
    for (ref, cur), psi in zip(full, theirs, strict=True):
        assert drift(np.array(ref), np.array(cur)).psi == pytest.approx(psi, rel=1e-9)


def test_psi_with_empty_bins_differs_from_evidently_only_by_the_empty_bin_convention() -> None:
    cases = [([500, 400, 0, 100], [450, 420, 30, 100]), ([1000, 0, 0, 1000], [990, 5, 5, 1000])]
    theirs = _oracle(_EVIDENTLY, cases)
    for (ref, cur), psi in zip(cases, theirs, strict=True):
        r, c = np.array(ref, dtype=float) / sum(ref), np.array(cur, dtype=float) / sum(cur)

        def evidently_fill(p: np.ndarray) -> np.ndarray:  # their rule, written out
            smallest = p[p > 0].min()
            return np.where(p == 0, smallest / 1e6 if smallest <= 1e-4 else 1e-4, p)

        r_e, c_e = evidently_fill(r), evidently_fill(c)
        assert float(np.sum((r_e - c_e) * np.log(r_e / c_e))) == pytest.approx(psi, rel=1e-9)
        ours = drift(np.array(ref), np.array(cur)).psi
        assert ours != pytest.approx(psi, rel=1e-6)  # the conventions differ where a bin is empty ...
        assert ours == pytest.approx(psi, rel=0.05)  # ... by a few per cent here
