"""Spec validation: good specs load; a broken one names its file and field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_spec
from mlcanary.spec import SpecError, load_spec, load_specs, parse_spec

EXAMPLES = sorted((ROOT / "include" / "rollouts").glob("*.yaml"))


def test_every_example_spec_is_valid() -> None:
    assert {p.stem for p in EXAMPLES} >= {"demo_ranker", "feed_ranker", "eta_regressor", "recommender"}
    for path in EXAMPLES:
        spec = load_spec(path)
        assert spec.dag_id == f"rollout__{spec.name}"


def test_examples_carry_the_field_cases() -> None:
    feed = load_spec(ROOT / "include/rollouts/feed_ranker.yaml")
    assert feed.guardrails.interval == timedelta(seconds=30)
    assert feed.guardrails.p99_latency_ms_max == 200 and feed.guardrails.success_rate_min == 0.99
    assert feed.analysis.window == timedelta(minutes=20) and feed.analysis.metrics[0].tolerance == 0.03
    eta = load_spec(ROOT / "include/rollouts/eta_regressor.yaml")
    assert {(c.column, c.value, c.tolerance) for c in eta.analysis.critical_segments} == {
        ("trip_type", "airport", 0.05),
        ("time_of_day", "peak", 0.05),
    }
    assert eta.analysis.metrics[0].higher_is_better is False
    reco = load_spec(ROOT / "include/rollouts/recommender.yaml")
    assert reco.guardrails.p99_latency_ms_max == 150
    assert reco.analysis.window > feed.analysis.window


def test_durations_accept_units_and_iso() -> None:
    spec = parse_spec(
        base_spec(stages=[{"percent": 5, "bake": "1.5m"}, {"percent": 50, "bake": "PT2H"}, {"percent": 60, "bake": 90}])
    )
    assert [s.bake for s in spec.stages] == [timedelta(seconds=90), timedelta(hours=2), timedelta(seconds=90)]


def test_defaults_follow_the_warehouse_contract() -> None:
    spec = parse_spec(base_spec())
    assert spec.warehouse.predictions.table == "predictions"
    assert spec.warehouse.predictions.columns.version == "model_version"
    assert spec.warehouse.resource_metrics.columns.cpu == "cpu_util"
    assert spec.schedule is None


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {"stages": [{"percent": 10, "bake": "1m"}, {"percent": 120, "bake": "1m"}]},
            "stages.1.percent",
            "less than or equal to 100",
        ),
        ({"stages": [{"percent": 50, "bake": "1m"}, {"percent": 20, "bake": "1m"}]}, "stages", "must be above"),
        ({"stages": [{"percent": 10, "bake": "soon"}]}, "stages.0.bake", "duration"),
        ({"stages": []}, "stages", "at least 1"),
        ({"guardrails": {"p99_latncy_ms_max": 200}}, "guardrails.p99_latncy_ms_max", "Extra inputs are not permitted"),
        ({"guardrails": {"success_rate_min": 1.5}}, "guardrails.success_rate_min", "less than 1"),
        ({"guardrails": {"interval": "1m", "window": "30s"}}, "guardrails", "at least one interval"),
        ({"analysis": {"metrics": []}}, "analysis.metrics", "at least 1"),
        (
            {
                "analysis": {
                    "metrics": [{"name": "ctr", "tolerance": 0.05}],
                    "critical_segments": [{"column": "city", "value": "x", "tolerance": 0.05}],
                }
            },
            "analysis",
            "not listed in segments",
        ),
        (
            {"analysis": {"metrics": [{"name": "ctr", "kind": "rate", "value": "abs_error", "tolerance": 0.05}]}},
            "analysis.metrics.0",
            "must be 'label'",
        ),
        (
            {"warehouse": {"predictions": {"table": "predictions; DROP TABLE rollouts"}}},
            "warehouse.predictions.table",
            "should match pattern",
        ),
        (
            {"warehouse": {"predictions": {"columns": {"score": 'score" OR 1=1'}}}},
            "warehouse.predictions.columns.score",
            "should match pattern",
        ),
        (
            {"analysis": {"segments": ["user cohort"], "metrics": [{"name": "ctr", "tolerance": 0.05}]}},
            "analysis.segments.0",
            "should match pattern",
        ),
        ({"policies": {"inconclusive": "promote"}}, "policies.inconclusive", "'rollback', 'extend' or 'ask'"),
        ({"guardrails": {"source": {"kind": "prometheus"}}}, "guardrails.source", "needs queries"),
        (
            {"guardrails": {"source": {"kind": "prometheus", "queries": {"requests": "sum(r)", "failures": "sum(f)"}}}},
            "guardrails",
            "source.queries.p99_latency_ms is needed for the p99_latency_ms limit",
        ),
        ({"guardrails": {"no_data_policy": "ignore"}}, "guardrails.no_data_policy", "'fail' or 'hold'"),
        ({"router": {"kind": "sagemaker"}}, "router.sagemaker.endpoint_name", "Field required"),
        (
            {"router": {"kind": "kserve", "inference_service": "r"}, "stages": [{"percent": 12.5, "bake": "1m"}]},
            "stages.0.percent 12.5",
            "KServe takes whole percentages",
        ),
        ({"notifications": {"email": {"to": ["not-an-address"]}}}, "notifications.email.to.0", "should match pattern"),
        ({"policies": {"inconclusive": "ask", "ask_timeout": "soon"}}, "policies.ask_timeout", "duration"),
        (
            {"guardrails": {"baseline": {"error_rate_ratio_max": 0.5}}},
            "guardrails.baseline.error_rate_ratio_max",
            "greater than 1",
        ),
        (
            {"guardrails": {"baseline": {"error_rate_ratio_max": None, "p99_latency_ratio_max": None}}},
            "guardrails.baseline",
            "all off",
        ),
        ({"name": "Feed-Ranker"}, "name", "should match pattern"),
        ({"retries": {"rollback": 0}}, "retries.rollback", "greater than or equal to 1"),
        ({"retries": {"delay": "0s"}}, "retries.delay", "longer than 0 s"),
        ({"stages": [{"percent": 10, "bake": "0s"}]}, "stages.0.bake", "longer than 0 s"),
        ({"stages": [{"percent": 10, "bake": -60}]}, "stages.0.bake", "longer than 0 s"),
        ({"guardrails": {"interval": 0}}, "guardrails.interval", "longer than 0 s"),
        ({"guardrails": {"window": "0s"}}, "guardrails.window", "longer than 0 s"),
        ({"guardrails": {"deadline_margin": -5}}, "guardrails.deadline_margin", "must not be negative"),
        ({"guardrails": {"source": {"timeout": "0s"}}}, "guardrails.source.timeout", "longer than 0 s"),
        ({"analysis": {"interval": "0s"}}, "analysis.interval", "longer than 0 s"),
        ({"analysis": {"label_delay": -3600}}, "analysis.label_delay", "must not be negative"),
        ({"analysis": {"interval": "2m", "window": "1m"}}, "analysis", "window must be at least one interval long"),
        ({"policies": {"ask_timeout": -1}}, "policies.ask_timeout", "longer than 0 s"),
        ({"policies": {"max_extension": -1}}, "policies.max_extension", "must not be negative"),
        ({"approval": {"timeout": "0s"}}, "approval.timeout", "longer than 0 s"),
        ({"router": {"kind": "webhook", "timeout": "0s"}}, "router.webhook.timeout", "longer than 0 s"),
        (
            {"guardrails": {"source": {"kind": "prometheus", "queries": {"requests": "$modle", "failures": "f"}}}},
            "guardrails.source.queries.requests",
            "unknown placeholder $modle: use $model, $version and $window",
        ),
        (
            {"guardrails": {"source": {"kind": "prometheus", "queries": {"requests": "sum(r) * $", "failures": "f"}}}},
            "guardrails.source.queries.requests",
            "write $$ for a literal dollar sign",
        ),
    ],
)
def test_broken_spec_names_file_and_field(tmp_path: Path, change: dict, field: str, message: str) -> None:
    data = base_spec()
    for key, value in change.items():
        data[key] = value if not isinstance(value, dict) or key not in data else {**data[key], **value}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert text.startswith(f"{path}: "), text
    assert any(p.startswith(f"{field}: ") and message in p for p in err.value.problems), text


def test_a_bake_that_can_never_see_its_own_labels_is_refused_unless_the_spec_says_so(tmp_path: Path) -> None:
    data = base_spec(stages=[{"percent": 5, "bake": "10m"}, {"percent": 50, "bake": "1h"}])
    data["analysis"] |= {"label_delay": "30m", "min_label_window": "5m"}
    path = tmp_path / "late_labels.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.problems == [
        "stages.0.bake 10m shorter than analysis.label_delay 30m + analysis.min_label_window 5m: the analysis "
        "could never see label-complete rows of that stage's own traffic; bake longer, or set "
        "analysis.allow_short_bakes: true to let the guardrails alone gate it"
    ]
    assert str(err.value).startswith(f"{path}: stages.0.bake 10m")
    data["analysis"]["allow_short_bakes"] = True
    assert parse_spec(data).analysis.allow_short_bakes
    data["analysis"] |= {"allow_short_bakes": False, "label_delay": "56m"}
    with pytest.raises(SpecError, match=r"stages\.0\.bake 10m, stages\.1\.bake 1h shorter"):
        parse_spec(data)
    data["analysis"]["label_delay"] = "5m"  # 10m = 5m + 5m: just enough
    assert parse_spec(data).analysis.label_delay == timedelta(minutes=5)


def test_the_rule_to_advance_a_stage_is_explicit() -> None:
    assert parse_spec(base_spec()).analysis.advance_on == "pass_or_inconclusive"
    data = base_spec()
    data["analysis"]["advance_on"] = "pass"
    assert parse_spec(data).analysis.advance_on == "pass"
    data["analysis"]["advance_on"] = "inconclusive"
    with pytest.raises(SpecError, match=r"analysis\.advance_on: Input should be 'pass' or 'pass_or_inconclusive'"):
        parse_spec(data)


def test_validate_reports_every_problem_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlcanary.cli import main

    data = base_spec(stages=[{"percent": 10, "bake": "0s"}])
    data["guardrails"] |= {"interval": 0, "deadline_margin": -1}
    data["analysis"] |= {"label_delay": "-1m"}
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    for field in ("stages.0.bake", "guardrails.interval", "guardrails.deadline_margin", "analysis.label_delay"):
        assert f"{path}: {field}: " in err, err


def test_a_version_is_the_whole_string(tmp_path: Path) -> None:
    """A trailing newline passes Python's ``$``; the form, the registry and the start refuse it."""
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamValidationError

    from mlcanary import rollout as steps
    from mlcanary.cli import main
    from mlcanary.routers.warehouse import WarehouseRouter
    from mlcanary.spec import VERSION_PATTERN
    from mlcanary.warehouse.engine import make_engine

    param = Param(type="string", pattern=VERSION_PATTERN)
    assert param.resolve("v2.1+build:7") == "v2.1+build:7"
    for bad in ("v2\n", "v2\nX-Header: 1", "", "-v2", "v" * 129):
        with pytest.raises(ParamValidationError):
            Param(type="string", pattern=VERSION_PATTERN).resolve(bad)
    url = f"sqlite:///{tmp_path}/w.db"
    assert main(["registry", "add", "--warehouse", url, "--model", "m", "--version", "v2\n"]) == 2
    engine = make_engine(url)
    with pytest.raises(steps.RolloutError, match=r"candidate version 'v2\\n' is not a version"):
        steps.begin_rollout(engine, WarehouseRouter(engine), parse_spec(base_spec()), "r", "v2\n")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: m\nstages: [\n  {percent: 10, bake: 1m\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: line \d+, column \d+"):
        load_spec(path)


def test_non_mapping_and_missing_fields(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("name: only_a_name\n")
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "empty.yaml")
    assert {p.split(":")[0] for p in err.value.problems} == {"model", "stages", "analysis"}


def test_load_specs_keeps_good_specs_and_reports_bad_and_duplicate(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(base_spec(name="a_model")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(base_spec(name="b_model", stages="nope")))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base_spec(name="a_model")))
    specs, errors = load_specs(tmp_path)
    assert [s.name for _, s in specs] == ["a_model"]
    assert sorted(Path(e.source).name for e in errors) == ["b.yaml", "c.yaml"]
    assert any("already used by" in str(e) for e in errors)
