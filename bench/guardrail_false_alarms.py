"""Stage-level false failures of the error-budget guardrail: today's per-poll test vs an anytime-valid one.

Today every poll tests the canary's failures in the sliding window (``guardrails.window``) against the
error budget (1 - ``success_rate_min``) with the exact binomial test ``exceeds_share`` at ``alpha``,
and ``consecutive_breaches`` failing polls in a row fail the stage: alpha holds per poll, not per
stage. The anytime-valid rule, what ``evaluate_guardrails`` does when it is given the stage's start
(``since``), tests the counts accumulated since the stage started with ``anytime_exceeds_share`` at
every poll, and a poll whose window is below the SLO fails on p <= alpha: alpha holds for the whole
stage (Ville's inequality), however many polls it takes. Both rules are the product's own
(``mlcanary.guardrails.error_budget_verdict``), fed the simulated counts.

Simulated: a stage's canary requests (Poisson per poll interval, at the given rate) and failures
(binomial), polled at the end of every interval of the bake (bake / interval polls; "to deadline":
polls through bake + ``deadline_margin``, the longest a watch can run: a canary at the budget rarely
bakes straight through, since its inconclusive polls do not advance the bake). Both rules skip polls
with fewer than ``min_requests`` requests in the window; only the stage's own traffic is counted.
Latency and resource limits are not simulated.

Specs: the defaults of RolloutSpec's GuardrailSpec (interval 30 s, window 2 min, alpha 0.01, one
breach, 99 % success) over a 20-minute bake at 30 canary requests/s; and include/rollouts/
demo_ranker.yaml (3 s / 9 s, 12 s bakes) at ~300 requests/s, the canary at its stages' percents.

    .venv/bin/python bench/guardrail_false_alarms.py [--runs 4000] [--seed 1] [--default-rps 30] [--demo-rps 300]

Prints, per stage: the false-failure rate with the true error rate exactly at the budget, and the
detection rate and the median time to detect at 2x and 5x the budget; then new / old false failures.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcanary.guardrails import error_budget_verdict
from mlcanary.spec import GuardrailSpec, load_spec, parse_spec
from mlcanary.verdict import Verdict

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "include" / "rollouts" / "demo_ranker.yaml"
DEFAULT_SPEC = {
    "name": "bench",
    "model": "bench-ranker",
    "stages": [{"percent": 10, "bake": "20m"}],
    "analysis": {"metrics": [{"name": "ctr", "tolerance": 0.05}]},
}


@dataclass(frozen=True)
class Stage:
    label: str
    g: GuardrailSpec
    rate: float  # canary requests per second
    bake: float  # seconds

    @property
    def interval(self) -> float:
        return self.g.interval.total_seconds()

    def polls(self, to_deadline: bool) -> int:
        watch = self.bake + (self.g.deadline_margin.total_seconds() if to_deadline else 0.0)
        return int(watch // self.interval)


@dataclass(frozen=True)
class Counts:
    """Per run (rows) and poll (columns): requests and failures in the window, and since the stage started."""

    n_window: np.ndarray
    bad_window: np.ndarray
    n_stage: np.ndarray
    bad_stage: np.ndarray


def simulate(rng: np.random.Generator, stage: Stage, error_rate: float, runs: int, polls: int) -> Counts:
    interval, window = round(stage.interval), round(stage.g.window.total_seconds())
    step = math.gcd(interval, window)  # seconds per simulated bin: intervals and the window are whole bins
    per_poll, per_window = interval // step, window // step
    requests = rng.poisson(stage.rate * step, (runs, polls * per_poll))
    failures = rng.binomial(requests, error_rate)
    n = np.concatenate([np.zeros((runs, 1), np.int64), np.cumsum(requests, axis=1)], axis=1)
    bad = np.concatenate([np.zeros((runs, 1), np.int64), np.cumsum(failures, axis=1)], axis=1)
    ends = per_poll * np.arange(1, polls + 1)
    starts = np.maximum(0, ends - per_window)
    return Counts(n[:, ends] - n[:, starts], bad[:, ends] - bad[:, starts], n[:, ends], bad[:, ends])


def fail_times(stage: Stage, c: Counts, anytime: bool, in_a_row: int) -> np.ndarray:
    """Seconds from the stage start to the poll that fails the stage (inf: never): a poll FAILs when
    :func:`~mlcanary.guardrails.error_budget_verdict` says so, on the window's counts alone (today's
    per-poll rule) or with the stage's (``anytime``). Polls it would not test (too few requests, or the
    window meets the SLO) are left out beforehand, only to save time."""
    g = stage.g
    assert g.success_rate_min is not None
    runs, polls = c.n_window.shape
    breaches = np.zeros(runs, np.int64)
    failed = np.full(runs, np.inf)
    for k in range(polls):
        active = np.isinf(failed)
        nk, bk = c.n_window[:, k], c.bad_window[:, k]
        ns, bs = c.n_stage[:, k], c.bad_stage[:, k]
        below_slo = (1 - bk / np.maximum(nk, 1)) < g.success_rate_min
        candidates = np.flatnonzero(active & (nk >= g.min_requests) & below_slo)
        fails = np.zeros(runs, bool)
        window_alpha = g.alpha / (2 * stage.polls(True)) if anytime else None  # as the trigger passes it
        fails[candidates] = [
            error_budget_verdict(
                g,
                int(bk[i]),
                int(nk[i]),
                int(bs[i]) if anytime else None,
                int(ns[i]) if anytime else None,
                window_alpha,
            )[0]
            is Verdict.FAIL
            for i in candidates
        ]
        breaches = np.where(fails, breaches + 1, 0)
        failed[active & (breaches >= in_a_row)] = (k + 1) * stage.interval
    return failed


RULES = (  # name, anytime (the stage's counts), breaches in a row (None: the spec's consecutive_breaches)
    ("today: per poll, window", False, None),
    ("today, 2 breaches in a row", False, 2),
    ("now: stage anytime + window", True, None),
)


def evaluate(rng: np.random.Generator, stage: Stage, runs: int, power_runs: int) -> dict[str, dict[str, float]]:
    g = stage.g
    assert g.success_rate_min is not None
    budget = 1 - g.success_rate_min
    out: dict[str, dict[str, float]] = {name: {} for name, *_ in RULES}
    for key, mult, to_deadline, size in (
        ("false", 1.0, False, runs),
        ("false_deadline", 1.0, True, runs),
        ("2x", 2.0, False, power_runs),
        ("5x", 5.0, False, power_runs),
    ):
        c = simulate(rng, stage, mult * budget, size, stage.polls(to_deadline))
        for name, anytime, in_a_row in RULES:
            t = fail_times(stage, c, anytime, in_a_row or g.consecutive_breaches)
            hit = np.isfinite(t)
            out[name][key] = float(hit.mean())
            if key in ("2x", "5x"):
                out[name][f"t{key}"] = float(np.median(t[hit])) if hit.any() else math.nan
    return out


def stages(default_rps: float, demo_rps: float) -> list[Stage]:
    default = parse_spec(DEFAULT_SPEC)
    demo = load_spec(DEMO)
    out = [Stage(f"defaults, {default_rps:g} canary req/s", default.guardrails, default_rps, 1200.0)]
    for s in demo.stages:
        rate = demo_rps * s.percent / 100
        out.append(Stage(f"demo {s.percent:g} % ({rate:g} req/s)", demo.guardrails, rate, s.bake.total_seconds()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000, help="simulated stages at the budget (power: a quarter)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--default-rps", type=float, default=30.0, help="canary requests/s with the defaults")
    parser.add_argument("--demo-rps", type=float, default=300.0, help="total requests/s of the demo")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.time()
    power_runs = max(1, args.runs // 4)
    print(
        f"{args.runs} simulated stages with the true error rate at the budget, {power_runs} at 2x and at 5x;"
        " false fail = the stage fails although the canary meets its SLO exactly\n"
    )
    head = (
        f"{'stage':28} {'rule':27} {'false fail':>10} {'to deadline':>11}"
        f" {'detect 2x':>9} {'median t':>8} {'detect 5x':>9} {'median t':>8}"
    )
    print(head)
    print("-" * len(head))
    ratios = []
    for stage in stages(args.default_rps, args.demo_rps):
        g = stage.g
        print(
            f"{stage.label:28} interval {stage.interval:g} s, window {g.window.total_seconds():g} s, bake"
            f" {stage.bake:g} s ({stage.polls(False)} polls, {stage.polls(True)} to deadline), alpha {g.alpha:g},"
            f" {g.consecutive_breaches} breach(es), SLO {100 * (g.success_rate_min or 0):g} %,"
            f" min {g.min_requests} requests"
        )
        result = evaluate(rng, stage, args.runs, power_runs)
        for name, r in result.items():
            print(
                f"{'':28} {name:27} {r['false']:10.4f} {r['false_deadline']:11.4f}"
                f" {r['2x']:9.3f} {r['t2x']:7.0f}s {r['5x']:9.3f} {r['t5x']:7.0f}s"
            )
        old, new = result[RULES[0][0]], result[RULES[-1][0]]
        ratios.append((stage.label, old, new))
    print("\nnew / old false-failure rate (anytime vs today's rule with the spec's consecutive_breaches):")
    for label, old, new in ratios:
        parts = []
        for key, what in (("false", "over the bake"), ("false_deadline", "to the deadline")):
            ratio = new[key] / old[key] if old[key] else math.nan
            parts.append(f"{what} {new[key]:.4f} / {old[key]:.4f} = {ratio:.3f}")
        print(f"  {label:28} " + "; ".join(parts))
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
