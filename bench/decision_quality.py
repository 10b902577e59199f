"""Decision quality by simulation: false rollbacks under repeated looks, and power.

Runs the analysis's own statistics (``rate_log_ratio`` and ``weigh``, exactly as ``analyze`` calls
them) on simulated cumulative counts of a 5 % canary (the baseline sees 19 times more traffic).

1. False rollbacks: the canary is exactly at the tolerance (the least favourable case for a FAIL test:
   true ratio = 1 - tolerance), and a pure A/A (ratio 1, tolerance 0). A rollout "falsely rolls back"
   if ANY of its looks says FAIL. Anytime-valid sequences vs naive repeated fixed-horizon z-tests.
2. Power to detect a 5 % relative CTR drop at 2 % baseline CTR (tolerance 0: "is the canary worse at
   all"), as a function of the canary sample size, at a single final look and with 20 looks.

    .venv/bin/python bench/decision_quality.py [--runs 400] [--looks 24] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from mlcanary.stats.gate import weigh
from mlcanary.stats.rates import rate_log_ratio

ALPHA = 0.05


def fails(x_c: int, n_c: int, x_b: int, n_b: int, tolerance: float, sequential: bool, n_star: int = 0) -> bool:
    """The analysis's FAIL rule for one rate check (n counts the canary, as in ``analyze``)."""
    r = rate_log_ratio(x_c, n_c, x_b, n_b)
    ev = weigh(
        r.theta,
        r.se,
        math.log(1 - tolerance) if tolerance else 0.0,
        True,
        ALPHA,
        min(n_c, n_b),
        n_star if sequential else None,
    )
    return ev.p_worse <= ALPHA


def false_rollbacks(
    rng: np.random.Generator, runs: int, looks: int, ctr: float, ratio: float, tolerance: float, per_look: int
) -> dict[str, float]:
    n_star = per_look * looks // 2  # tuned to the middle of the rollout
    hits = {"naive": 0, "sequential": 0}
    for _ in range(runs):
        x_c = np.cumsum(rng.binomial(per_look, ctr * ratio, looks))
        x_b = np.cumsum(rng.binomial(19 * per_look, ctr, looks))
        n_c = per_look * np.arange(1, looks + 1)
        for name, seq in (("naive", False), ("sequential", True)):
            hits[name] += any(
                fails(int(a), int(n), int(b), int(19 * n), tolerance, seq, n_star)
                for a, n, b in zip(x_c, n_c, x_b, strict=True)
            )
    return {k: v / runs for k, v in hits.items()}


def power(rng: np.random.Generator, runs: int, n_canary: int, ctr: float, drop: float, looks: int) -> dict[str, float]:
    out = {"fixed, one look": 0, "sequential, one look": 0, f"sequential, {looks} looks": 0}
    per_look = n_canary // looks
    for _ in range(runs):
        x_c = np.cumsum(rng.binomial(per_look, ctr * (1 - drop), looks))
        x_b = np.cumsum(rng.binomial(19 * per_look, ctr, looks))
        n_c = per_look * np.arange(1, looks + 1)
        last = (int(x_c[-1]), int(n_c[-1]), int(x_b[-1]), int(19 * n_c[-1]))
        out["fixed, one look"] += fails(*last, 0.0, False)
        out["sequential, one look"] += fails(*last, 0.0, True, n_canary)  # tuned to the planned size
        out[f"sequential, {looks} looks"] += any(
            fails(int(a), int(n), int(b), int(19 * n), 0.0, True, n_canary)
            for a, n, b in zip(x_c, n_c, x_b, strict=True)
        )
    return {k: v / runs for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--looks", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.time()
    print(
        f"alpha {ALPHA}; {args.runs} rollouts x {args.looks} looks each; sequences tuned to the middle of the"
        " rollout (false rollbacks) or to the planned canary size (power)\n"
    )
    print("False rollbacks (any look FAILs) when the canary is not worse than the tolerance allows")
    print(f"{'case':58} {'naive z':>8} {'sequential':>11}  ratio")
    for label, ctr, ratio, tol, per_look in (
        ("A/A at the tolerance: CTR 2 %, canary 5 % worse, tol 5 %", 0.02, 0.95, 0.05, 5000),
        ("A/A at the tolerance: CTR 20 %, canary 3 % worse, tol 3 %", 0.20, 0.97, 0.03, 2000),
        ("pure A/A: CTR 2 %, equal arms, tol 0", 0.02, 1.0, 0.0, 5000),
    ):
        r = false_rollbacks(rng, args.runs, args.looks, ctr, ratio, tol, per_look)
        ok = "ok" if r["sequential"] <= ALPHA else "ABOVE ALPHA"
        print(
            f"{label:58} {r['naive']:8.3f} {r['sequential']:11.3f}  {r['naive'] / max(r['sequential'], 1e-9):5.1f}x"
            f"  ({ok})"
        )
    print(f"\nPower to detect a 5 % relative CTR drop at 2 % CTR (tol 0, alpha {ALPHA}, baseline 19x canary)")
    header = None
    for n in (25_000, 50_000, 100_000, 150_000, 200_000, 300_000, 500_000):
        p = power(rng, args.runs // 2, n, 0.02, 0.05, 20)
        if header is None:
            header = list(p)
            print(f"{'canary n':>10}  " + "  ".join(f"{h:>22}" for h in header))
        print(f"{n:>10,}  " + "  ".join(f"{p[h]:>22.2f}" for h in header))
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
