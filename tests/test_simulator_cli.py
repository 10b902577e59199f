"""The traffic simulator and the mlcanary command line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from conftest import Writer, base_spec
from mlcanary import registry
from mlcanary.cli import main
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.warehouse.engine import make_engine, utcnow
from mlcanary.warehouse.schema import create_schema, predictions, resource_metrics


def _summary(engine: sa.Engine) -> list[tuple]:
    p = predictions.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(
                p.model_version, sa.func.count(), sa.func.sum(p.label), sa.func.sum(p.score), sa.func.count(p.label)
            )
            .group_by(p.model_version)
            .order_by(p.model_version)
        ).all()


def test_batch_is_reproducible_with_a_seed(tmp_path: Path, write_batch: Writer) -> None:
    end = utcnow().replace(microsecond=0)
    engines = []
    for name in ("a", "b"):
        eng = make_engine(f"sqlite:///{tmp_path}/{name}.db")
        create_schema(eng)
        write_batch(eng, minutes=3, rate=40, seed=9, end=end)
        engines.append(eng)
    assert _summary(engines[0]) == _summary(engines[1])
    other = make_engine(f"sqlite:///{tmp_path}/c.db")
    create_schema(other)
    write_batch(other, minutes=3, rate=40, seed=10, end=end)
    assert _summary(other) != _summary(engines[0])


def test_batch_split_and_label_delay(engine: sa.Engine, write_batch: Writer) -> None:
    end = write_batch(engine, minutes=10, rate=50, canary_percent=25)
    rows = {r[0]: r for r in _summary(engine)}
    share = rows["v2"][1] / (rows["v1"][1] + rows["v2"][1])
    assert share == pytest.approx(0.25, abs=0.02)
    with engine.connect() as conn:
        p = predictions.c
        late = conn.execute(sa.select(sa.func.count()).where(p.label.is_(None))).scalar()
        early_unlabelled = conn.execute(
            sa.select(sa.func.count()).where(p.label.is_(None), p.ts < end - timedelta(seconds=1))
        ).scalar()
        assert late > 0 and early_unlabelled == 0  # only the last label delay is still unlabelled
        assert conn.execute(sa.select(sa.func.count()).select_from(resource_metrics)).scalar() > 0


def test_live_follows_the_routing_table_and_labels_arrive_later(engine: sa.Engine) -> None:
    router = WarehouseRouter(engine)
    router.set_split(Split("m", "v1", "v2", 40.0), None)
    sim = LiveSimulator(engine, SimConfig(model="m", seed=1, label_delay=timedelta(seconds=2)), rate=2000)
    t0 = utcnow()
    sim.step(t0, t0 + timedelta(seconds=1), router.get_split("m"))
    first = {r[0]: r for r in _summary(engine)}
    assert first["v2"][1] / (first["v1"][1] + first["v2"][1]) == pytest.approx(0.4, abs=0.05)
    assert sum(r[4] for r in first.values()) == 0  # no label has arrived yet
    router.set_split(Split("m", "v1", "v2", 0.0), None)
    sim.step(t0 + timedelta(seconds=1), t0 + timedelta(seconds=4), router.get_split("m"))
    after = {r[0]: r for r in _summary(engine)}
    assert after["v2"][1] == first["v2"][1]  # at 0 % the canary gets nothing
    assert after["v2"][4] == first["v2"][1]  # ... and its labels have all arrived
    assert sim.labels_written >= first["v1"][1] + first["v2"][1]


def test_no_row_is_stamped_with_a_split_before_it_was_set(engine: sa.Engine) -> None:
    """Requests are routed as they arrive: a split change shows in rows stamped after it, never in
    the rows of the tick already under way (a replay of the rollout would read those as the old stage's)."""
    router = WarehouseRouter(engine)
    router.set_split(Split("m", "v1", "v2", 0.0), None)
    sim = LiveSimulator(engine, SimConfig(model="m", seed=1), rate=2000, tick=0.3, router=router)
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while sim.rows_written == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.15)  # into a tick
        before = utcnow()
        router.set_split(Split("m", "v1", "v2", 40.0), None)
        time.sleep(1.5)
    finally:
        sim.stop_event.set()
        thread.join(timeout=10)
    p = predictions.c
    with engine.connect() as conn:
        early = conn.execute(sa.select(sa.func.count()).where(p.model_version == "v2", p.ts < before)).scalar()
        later = conn.execute(sa.select(sa.func.count()).where(p.model_version == "v2", p.ts >= before)).scalar()
    assert early == 0
    assert later > 0  # and it does follow the table


def test_fault_parsing() -> None:
    f = Fault.parse("v3:latency_ms=300;min_percent=50;segment=user_cohort:new")
    assert (f.version, f.kind, f.value, f.min_percent, f.segment) == (
        "v3",
        "latency_ms",
        300,
        50,
        ("user_cohort", "new"),
    )
    for bad, message in [
        ("v3:latency=300", "kind must be one of"),
        ("v3", "expected VERSION"),
        ("v3:cpu=high", "expected VERSION"),
        ("v3:cpu=0.9;segment=city:x", "segment"),
        ("v3:cpu=0.9;when=now", "unknown option"),
    ]:
        with pytest.raises(ValueError, match=message):
            Fault.parse(bad)


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec()))
    return path


def test_cli_analyze_and_guardrails_json(
    tmp_path: Path, sqlite_url: str, engine: sa.Engine, write_batch: Writer, capsys: pytest.CaptureFixture
) -> None:
    end = write_batch(engine, minutes=10, rate=50, faults=("v2:ctr_drop=0.3",))
    spec = _spec_file(tmp_path)
    common = ["--spec", str(spec), "--warehouse", sqlite_url, "--baseline-version", "v1", "--canary-version", "v2"]
    code = main(
        [
            "analyze",
            *common,
            "--start",
            (end - timedelta(minutes=10)).isoformat(),
            "--end",
            end.isoformat(),
            "--label-asof",
            end.isoformat(),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["verdict"] == "FAIL" and out["checks"][0]["segment"] == "*"
    code = main(["guardrails", *common, "--at", end.isoformat(), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verdict"] == "PASS" and out["canary"]["requests"] > 0


def test_cli_bad_input_is_a_clear_error(tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture) -> None:
    spec = _spec_file(tmp_path)
    args = [
        "analyze",
        "--spec",
        str(spec),
        "--warehouse",
        sqlite_url,
        "--baseline-version",
        "v1",
        "--canary-version",
        "v2",
        "--start",
        "2026-11-02T00:00:00Z",
        "--end",
        "2026-11-01T00:00:00Z",
    ]
    assert main(args) == 2
    assert "--end must be after --start" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args[:-4], "--start", "yesterday", "--end", "2026-11-01"])
    assert exit_.value.code == 2
    assert "not an ISO 8601 time" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n")
    assert main(["validate", str(broken), str(spec)]) == 1
    assert f"{broken}: model: Field required" in capsys.readouterr().err


def test_cli_simulate_batch_then_report(sqlite_url: str, capsys: pytest.CaptureFixture) -> None:
    end = utcnow()
    code = main(
        [
            "simulate",
            "batch",
            "--warehouse",
            sqlite_url,
            "--model",
            "m",
            "--rate",
            "20",
            "--baseline-version",
            "v1",
            "--canary-version",
            "v2",
            "--canary-percent",
            "50",
            "--start",
            (end - timedelta(minutes=2)).isoformat(),
            "--end",
            end.isoformat(),
            "--json",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["rows"] > 1500
    assert main(["report", "--warehouse", sqlite_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_installed_console_script_help() -> None:
    exe = Path(sys.executable).parent / "mlcanary"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("analyze", "guardrails", "simulate", "report", "registry"):
        assert command in out


def _arm_stats(engine: sa.Engine, where: sa.ColumnElement | None = None) -> dict[str, dict[str, float]]:
    p = predictions.c
    positives = sa.func.sum(sa.case((p.label == 1, 1), else_=0))
    recall_hits = sa.func.sum(sa.case(((p.label == 1) & (p.score >= 0.2), 1), else_=0))  # threshold ~ base CTR
    stmt = sa.select(
        p.model_version, sa.func.avg(p.f1), sa.func.avg(p.score), sa.func.avg(p.label), recall_hits * 1.0 / positives
    ).where(p.label.is_not(None))
    if where is not None:
        stmt = stmt.where(where)
    with engine.connect() as conn:
        rows = conn.execute(stmt.group_by(p.model_version)).all()
    return {r[0]: {"f1": r[1], "score": r[2], "label": r[3], "recall": r[4]} for r in rows}


@pytest.mark.parametrize(
    ("fault", "effect"),
    [
        ("v2:input_drift=0.5", lambda s, b: s["f1"] - b["f1"] > 0.4),
        ("v2:miscalibration=0.85", lambda s, b: s["score"] - s["label"] > 0.1 > abs(b["score"] - b["label"])),
        ("v2:ctr_drop=0.3", lambda s, b: 0.6 < s["label"] / b["label"] < 0.8),
    ],
)
def test_each_fault_shows_in_the_data(engine: sa.Engine, write_batch: Writer, fault: str, effect) -> None:  # type: ignore[no-untyped-def]
    write_batch(engine, minutes=10, rate=60, canary_percent=50, faults=(fault,))
    stats = _arm_stats(engine)
    assert effect(stats["v2"], stats["v1"]), stats


def test_recall_drop_hits_only_its_segment(engine: sa.Engine, write_batch: Writer) -> None:
    write_batch(engine, minutes=10, rate=80, canary_percent=50, faults=("v2:recall_drop=0.3;segment=user_cohort:new",))
    new = _arm_stats(engine, predictions.c.user_cohort == "new")
    rest = _arm_stats(engine, predictions.c.user_cohort != "new")
    assert new["v2"]["recall"] / new["v1"]["recall"] < 0.8  # 30 % of positives demoted
    assert 0.93 < rest["v2"]["recall"] / rest["v1"]["recall"] < 1.07


def test_cli_registry_add_and_list(sqlite_url: str, capsys: pytest.CaptureFixture) -> None:
    common = ["--warehouse", sqlite_url, "--model", "ranker"]
    assert main(["registry", "add", *common, "--version", "v7", "--note", "nightly 2026-11-27"]) == 0
    assert main(["registry", "add", *common, "--version", "v7"]) == 0  # again while still a candidate: harmless
    assert main(["registry", "add", *common, "--version", "v8; drop"]) == 2
    assert "is not a version" in capsys.readouterr().err
    assert main(["registry", "list", "--warehouse", sqlite_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["version"], r["status"], r["note"]) for r in listed] == [
        ("ranker", "v7", "candidate", "nightly 2026-11-27")
    ]
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        registry.mark(conn, "ranker", "v7", "rejected", "dag/run", "rolled back")
    assert main(["registry", "add", *common, "--version", "v7"]) == 2  # a rolled-out version is not a candidate again
    assert "already rejected" in capsys.readouterr().err
