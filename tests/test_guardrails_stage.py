"""Stage-level error control of the guardrails' count tests, and the sample-ratio-mismatch check.

With ``since`` (the stage's shift) the count tests test the stage's cumulative counts with anytime-valid
p-values; without it each poll tests its window, as before. With ``canary_percent`` the arms' request
counts are checked against the configured split.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from conftest import Writer, base_spec
from mlcanary.cli import main
from mlcanary.guardrails import GuardrailResult, evaluate_guardrails
from mlcanary.sources import WarehouseMetrics
from mlcanary.sources.base import ArmHealth
from mlcanary.spec import RolloutSpec, SpecError, parse_spec
from mlcanary.stats.counts import srm_p_value
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import predictions

AT = datetime(2026, 11, 26, 12, 0, 0)
SINCE = AT - timedelta(minutes=1)  # the stage's shift; the spec's window is 4 s
WINDOW = AT - timedelta(seconds=4)


def _check(result: GuardrailResult, name: str) -> CheckResult:
    return next(c for c in result.checks if c.check == name)


def _spec(**guardrails: Any) -> RolloutSpec:
    return parse_spec(base_spec(guardrails={**base_spec()["guardrails"], **guardrails}))


# --- the error budget on the stage's counts, from the warehouse ------------------------------------------


def _traffic(engine: sa.Engine, version: str, n: int, failed: int, start: datetime, end: datetime) -> None:
    """``n`` requests of ``version`` spread evenly over ``[start, end)``, ``failed`` of them failed and
    spread evenly too (every window of the range sees about the same error rate)."""
    span = (end - start).total_seconds()
    every = n / failed if failed else None
    rows = [
        dict(
            request_id=f"{version}-{start:%H%M%S}-{i}",
            ts=start + timedelta(seconds=span * (i + 0.5) / n),
            model="unit-ranker",
            model_version=version,
            latency_ms=50.0,
            success=0 if every and int((i + 1) / every) > int(i / every) else 1,
        )
        for i in range(n)
    ]
    assert sum(1 - r["success"] for r in rows) == failed
    with engine.begin() as conn:
        conn.execute(sa.insert(predictions), rows)


def _poll(engine: sa.Engine, spec: RolloutSpec, at: datetime, **kwargs: Any) -> GuardrailResult:
    return evaluate_guardrails(WarehouseMetrics(engine, spec), spec, "v2", at, "v1", **kwargs)


def test_stage_whose_failures_are_significant_fails_on_the_stage_counts(engine: sa.Engine, spec: RolloutSpec) -> None:
    """5 % failed against a 2 % budget, evenly over a one-minute stage: the 4-second window alone
    (~133 requests, ~7 failed) is not significant per poll, the stage's 2,000 requests are."""
    at = utcnow()
    since = at - timedelta(minutes=1)
    _traffic(engine, "v2", 2000, 100, since, at)
    per_poll = _check(_poll(engine, spec, at), "success_rate")
    assert per_poll.verdict is Verdict.INCONCLUSIVE and "but not significantly" in per_poll.reason
    assert "stage so far" not in per_poll.reason  # without since: the window's exact test, as before
    result = _poll(engine, spec, at, since=since)
    check = _check(result, "success_rate")
    assert check.verdict is Verdict.FAIL and result.verdict is Verdict.FAIL
    assert result.reason == check.reason and re.match(
        r"success_rate 9\d\.\d\d % < 98\.00 % \(window n=1\d\d; ", check.reason
    )
    assert "stage so far: n=2,000, 100 failed; anytime p=" in check.reason
    assert "against the 2.00 % error budget" in check.reason
    assert check.canary_n == per_poll.canary_n < 200  # the values shown are the window's
    assert result.stage_canary is not None and result.stage_canary.requests == 2000
    assert result.stage_canary.p99_latency_ms is None  # the stage is only counted (no P99 over it)
    assert result.stage_start == since and result.window_start == at - spec.guardrails.window


def test_window_that_would_fail_per_poll_holds_when_the_stage_is_within_budget(
    engine: sa.Engine, spec: RolloutSpec
) -> None:
    """A bad 4-second window (15 of 300 failed: p=0.001 per poll) after 10,000 requests at 1.5 %: the
    stage so far (165 of 10,300, 1.6 %) is within its 2 % budget, so the stage holds instead of failing."""
    at = utcnow()
    since = at - timedelta(minutes=1)
    window = at - spec.guardrails.window
    _traffic(engine, "v2", 10_000, 150, since, window)
    _traffic(engine, "v2", 300, 15, window, at)
    per_poll = _poll(engine, spec, at)
    assert _check(per_poll, "success_rate").verdict is Verdict.FAIL and per_poll.verdict is Verdict.FAIL
    result = _poll(engine, spec, at, since=since)
    check = _check(result, "success_rate")
    assert check.verdict is Verdict.INCONCLUSIVE and result.verdict is not Verdict.FAIL
    assert "95.00 % < 98.00 % but not significantly" in check.reason and "holding" in check.reason
    assert "window n=300; stage so far: n=10,300, 165 failed; anytime p=1" in check.reason
    # A stage younger than the window: the window is the stage, measured once per arm, and still tested
    # anytime-valid, which asks more of one look than the per-poll test did (p=0.016 here, not 0.001).
    young = _poll(engine, spec, at, since=window)
    assert _check(young, "success_rate").verdict is Verdict.INCONCLUSIVE
    assert "window n=300; stage so far: n=300, 15 failed; anytime p=0.016 " in young.reason
    assert young.stage_canary is young.canary


# --- the relative checks on the stage's counts, from a source that returns chosen counts ---------------


class FakeSource:
    """Chosen health per (version, start, end); any other question is a test error."""

    def __init__(
        self, arms: dict[tuple[str, datetime, datetime], ArmHealth], slower: dict[tuple[str, datetime, datetime], int]
    ) -> None:
        self.arms = arms
        self.slower = slower
        self.calls: list[tuple[str, datetime, datetime]] = []

    def measure(self, version: str, start: datetime, end: datetime) -> ArmHealth:
        self.calls.append((version, start, end))
        return self.arms[(version, start, end)]

    def request_counts(self, version: str, start: datetime, end: datetime) -> tuple[int, int]:
        arm = self.measure(version, start, end)
        return arm.requests, arm.failures

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        return self.slower[(version, start, end)]


def _arm(n: int, failed: int = 0, p99: float = 50.0) -> ArmHealth:
    return ArmHealth(n, failed, p99, 1, 0.5, 0.5)


def _relative_spec(**guardrails: Any) -> RolloutSpec:
    return _spec(baseline={"error_rate_ratio_max": 2.0, "p99_latency_ratio_max": 1.25}, **guardrails)


def _fake(window: tuple[ArmHealth, ArmHealth], stage: tuple[ArmHealth, ArmHealth], slower=(0, 0)) -> FakeSource:  # type: ignore[no-untyped-def]
    return FakeSource(
        {
            ("v2", WINDOW, AT): window[0],
            ("v1", WINDOW, AT): window[1],
            ("v2", SINCE, AT): stage[0],
            ("v1", SINCE, AT): stage[1],
        },
        {("v2", WINDOW, AT): slower[0], ("v2", SINCE, AT): slower[1]},
    )


@pytest.mark.parametrize("since", [None, SINCE])
def test_error_rate_vs_baseline_tests_the_stage_counts(since: datetime | None) -> None:
    """The window: canary 10/300 failed vs baseline 5/3,000 (20x, p=2e-5 against 2x); the stage:
    15/10,000 vs 100/100,000 (1.5x): per poll FAIL, per stage not worse than allowed."""
    source = _fake((_arm(300, 10), _arm(3000, 5)), (_arm(10_000, 15), _arm(100_000, 100)))
    result = evaluate_guardrails(source, _relative_spec(), "v2", AT, "v1", since=since)
    check = _check(result, "error_rate_vs_baseline")
    if since is None:
        assert check.verdict is Verdict.FAIL and "stage so far" not in check.reason
        assert source.calls == [("v2", WINDOW, AT), ("v1", WINDOW, AT)]
        return
    assert check.verdict is Verdict.PASS, check.reason
    assert "stage so far canary 0.15 % vs baseline 0.10 %" in check.reason
    assert "15/10,000 vs 100/100,000 failed, anytime p=1" in check.reason
    assert check.canary_value == pytest.approx(10 / 300) and check.baseline_n == 3000  # the window's values
    assert source.calls == [("v2", WINDOW, AT), ("v1", WINDOW, AT), ("v2", SINCE, AT), ("v1", SINCE, AT)]


def test_error_rate_vs_baseline_fails_on_significant_stage_counts() -> None:
    """The window: 2/300 vs 10/3,000 (not significant); the stage: 60/10,000 vs 100/100,000 (6x)."""
    source = _fake((_arm(300, 2), _arm(3000, 10)), (_arm(10_000, 60), _arm(100_000, 100)))
    assert _check(evaluate_guardrails(source, _relative_spec(), "v2", AT, "v1"), "error_rate_vs_baseline").verdict is (
        Verdict.PASS
    )
    result = evaluate_guardrails(source, _relative_spec(), "v2", AT, "v1", since=SINCE)
    check = _check(result, "error_rate_vs_baseline")
    assert check.verdict is Verdict.FAIL and result.verdict is Verdict.FAIL
    assert "60/10,000 vs 100/100,000 failed, anytime p=" in check.reason and "worse than the baseline" in check.reason


@pytest.mark.parametrize(
    ("window_slower", "stage_slower", "per_poll", "per_stage"),
    [
        (20, 90, Verdict.FAIL, Verdict.PASS),  # 6.7 % of the window, 0.9 % of the stage
        (4, 300, Verdict.PASS, Verdict.FAIL),  # 1.3 % of the window, 3 % of the stage
    ],
)
def test_latency_vs_baseline_counts_the_stage_slower_requests(
    window_slower: int, stage_slower: int, per_poll: Verdict, per_stage: Verdict
) -> None:
    source = _fake(
        (_arm(300), _arm(3000, p99=80.0)), (_arm(10_000), _arm(100_000)), slower=(window_slower, stage_slower)
    )
    spec = _relative_spec()
    assert _check(evaluate_guardrails(source, spec, "v2", AT, "v1"), "p99_latency_vs_baseline").verdict is per_poll
    check = _check(evaluate_guardrails(source, spec, "v2", AT, "v1", since=SINCE), "p99_latency_vs_baseline")
    assert check.verdict is per_stage, check.reason
    share = f"{100 * stage_slower / 10_000:.2f} %"
    assert f"stage so far: {share} of 10,000 canary requests slower than 100.0 ms" in check.reason
    assert "the baseline's current P99" in check.reason and "anytime p=" in check.reason


# --- sample ratio mismatch -------------------------------------------------------------------------------

_MISMATCH = re.compile(r"traffic split mismatch: configured 10 %, observed (19|20|21)\.\d % of [\d,]+ requests")


def test_srm_traffic_at_20_percent_checked_against_10_is_invalid(engine: sa.Engine, write_batch: Writer) -> None:
    at = write_batch(engine, minutes=2, rate=50, canary_percent=20)
    spec = _spec()
    since = at - timedelta(minutes=2)
    result = _poll(engine, spec, at, since=since, canary_percent=10)
    srm = _check(result, "sample_ratio")
    assert srm.verdict is Verdict.INVALID and _MISMATCH.search(srm.reason), srm.reason
    assert "stage so far; anytime p=" in srm.reason
    assert result.verdict is Verdict.INVALID and result.reason == srm.reason  # not PASS: the split is off
    assert all(c.verdict is Verdict.PASS for c in result.checks if c.check != "sample_ratio")  # healthy otherwise
    assert srm.canary_value == pytest.approx(0.2, abs=0.01) and srm.threshold == 0.1
    assert srm.window_start == since and srm.canary_n + srm.baseline_n > 5000  # the stage's counts

    right = _poll(engine, spec, at, since=since, canary_percent=20)
    srm = _check(right, "sample_ratio")
    assert srm.verdict is Verdict.PASS and srm.reason.startswith("traffic split as configured: configured 20 %")
    assert right.verdict is Verdict.PASS

    assert "sample_ratio" not in {c.check for c in _poll(engine, spec, at, since=since).checks}  # no split given
    assert "sample_ratio" not in {c.check for c in _poll(engine, _spec(srm=False), at, canary_percent=10).checks}
    window = _poll(engine, spec, at, canary_percent=10)  # without since: the window's counts
    assert _check(window, "sample_ratio").window_start == window.window_start
    assert "(window; anytime p=" in _check(window, "sample_ratio").reason


def _srm(canary: int, baseline: int, percent: float, **guardrails: Any) -> CheckResult:
    source = _fake((_arm(canary), _arm(baseline)), (_arm(canary), _arm(baseline)))
    return _check(
        evaluate_guardrails(source, _spec(**guardrails), "v2", AT, "v1", canary_percent=percent), "sample_ratio"
    )


def test_srm_min_deviation_spares_tiny_deviations_at_huge_n() -> None:
    """10.1 % of 10 million requests at a configured 10 %: significant (p ~ 3e-22) but 1 % off, relative."""
    assert srm_p_value(1_010_000, 8_990_000, 0.1) <= 0.001
    spared = _srm(1_010_000, 8_990_000, 10)
    assert spared.verdict is Verdict.PASS
    assert "observed 10.1 % of 10,000,000 requests" in spared.reason
    assert "off by 1.0 % relative, below the 10 % that counts as a mismatch" in spared.reason
    flagged = _srm(1_010_000, 8_990_000, 10, srm_min_deviation=0)  # 0: the floor is off
    assert flagged.verdict is Verdict.INVALID and "traffic split mismatch: configured 10 %" in flagged.reason
    # 10 % relative of the smaller arm: at 90 % the baseline's 10 % getting 8.9 % is a mismatch.
    assert _srm(9_110_000, 890_000, 90).verdict is Verdict.INVALID
    assert _srm(9_010_000, 990_000, 90).verdict is Verdict.PASS


def test_srm_needs_the_minimum_of_both_arms_together() -> None:
    starved = _srm(0, 1000, 10)  # the worst mismatch: the canary gets nothing
    assert starved.verdict is Verdict.INVALID and "observed 0.0 % of 1,000 requests" in starved.reason
    source = _fake((_arm(2), _arm(15)), (_arm(2), _arm(15)))
    thin = evaluate_guardrails(source, _spec(), "v2", AT, "v1", canary_percent=10)
    assert _check(thin, "sample_ratio").verdict is Verdict.INCONCLUSIVE and "sample_ratio" in thin.missing
    assert "sample_ratio: no data: 17 requests (window) < minimum 20" in _check(thin, "sample_ratio").reason
    assert _srm(12, 88, 10, srm_alpha=0.5).verdict is Verdict.PASS  # 12 % of 100: not significant
    whole = evaluate_guardrails(
        _fake((_arm(0), _arm(1000)), (_arm(0), _arm(1000))), _spec(), "v2", AT, "v1", canary_percent=100
    )
    assert "sample_ratio" not in {c.check for c in whole.checks}  # no split at 100 %


def test_srm_spec_fields() -> None:
    g = _spec().guardrails
    assert (g.srm, g.srm_alpha, g.srm_min_deviation) == (True, 0.001, 0.1)
    for field, bad in (("srm_alpha", 0), ("srm_alpha", 1), ("srm_alpha", None), ("srm_min_deviation", -0.1)):
        with pytest.raises(SpecError, match=f"guardrails.{field}"):
            _spec(**{field: bad})
    assert _spec(srm_min_deviation=0, srm_alpha=0.05, srm=False).guardrails.srm is False


# --- the command line ------------------------------------------------------------------------------------


def test_cli_guardrails_checks_the_split(
    tmp_path: Path, sqlite_url: str, engine: sa.Engine, write_batch: Writer, capsys: pytest.CaptureFixture
) -> None:
    at = write_batch(engine, minutes=2, rate=50, canary_percent=20)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec(guardrails={**base_spec()["guardrails"], "window": "1m"})))
    common = ["guardrails", "--spec", str(path), "--warehouse", sqlite_url, "--baseline-version", "v1"]
    common += ["--canary-version", "v2", "--at", at.isoformat()]
    assert main([*common, "--canary-percent", "10"]) == 4  # INVALID
    out = capsys.readouterr().out
    assert _MISMATCH.search(out) and "(window; anytime p=" in out
    assert "verdict: INVALID: traffic split mismatch: configured 10 %" in out
    assert main([*common, "--canary-percent", "20"]) == 0
    out = capsys.readouterr().out
    assert "traffic split as configured: configured 20 %" in out and "verdict: PASS" in out
    assert main(common) == 0
    assert "sample_ratio" not in capsys.readouterr().out
    for bad in ("0", "100", "ten"):
        with pytest.raises(SystemExit):
            main([*common, "--canary-percent", bad])
        assert "strictly between 0 and 100" in capsys.readouterr().err


def test_a_canary_that_turns_bad_late_in_a_long_stage_is_caught_by_its_window(
    engine: sa.Engine, spec: RolloutSpec
) -> None:
    """An hour of healthy traffic (0.5 % failed against a 2 % budget), then a window at 25 % failed:
    the stage's counts alone are not yet significant (the good hour outweighs it), the window's exact
    test at the watch's share of alpha (0.01 / 2 over 3,600 polls) is, at once."""
    at = utcnow()
    since = at - timedelta(hours=1)
    window = at - spec.guardrails.window
    _traffic(engine, "v2", 36_000, 180, since, window)
    _traffic(engine, "v2", 400, 100, window, at)
    stage_only = _check(_poll(engine, spec, at, since=since), "success_rate")
    assert stage_only.verdict is Verdict.INCONCLUSIVE
    both = _check(_poll(engine, spec, at, since=since, window_alpha=0.01 / (2 * 3600)), "success_rate")
    assert both.verdict is Verdict.FAIL
    assert "window n=400, window p=" in both.reason and "(level 1.4e-06)" in both.reason
    healthy_window = at + timedelta(seconds=4)  # a window of the same healthy traffic as the hour
    _traffic(engine, "v2", 400, 2, at, healthy_window)
    calm = _check(_poll(engine, spec, healthy_window, since=since, window_alpha=0.01 / (2 * 3600)), "success_rate")
    assert calm.verdict is Verdict.PASS
