"""The rollout report page, its file (`mlcanary report --html`), the Airflow plugin that serves it
with Airflow's own authorization, and the Prometheus metrics.

One real rollout (a DAG run against the live simulator, rolled back at stage 2 by a latency fault)
is recorded once for the module; every test reads its audit rows.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from mlcanary import report_page, rollout_metrics
from mlcanary.spec import parse_spec
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import decisions, measurements, rollouts, traffic_history
from rollout_runner import E2E_ANALYSIS, E2E_POLICIES, run_rollout

pytestmark = pytest.mark.e2e
# few enough samples needed that the looks compare (and draw intervals) within seconds of traffic
DRIFT = {**E2E_ANALYSIS, "min_samples": 100, "drift": {"features": ["f1", "f2"], "output": "report"}}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, airflow_db: None) -> Iterator[dict[str, Any]]:
    """The warehouse of one rolled-back rollout, its id and its connection's environment."""
    tmp = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as mp:
        out = run_rollout(tmp, mp, faults=("v2:latency_ms=300;min_percent=30",), analysis=DRIFT, policies=E2E_POLICIES)
        assert out.rollout is not None and out.rollout.status == "rolled_back", out
        yield {
            "url": f"sqlite:///{tmp}/warehouse.db",
            "rollout_id": out.rollout.rollout_id,
            "reason": out.rollout.reason,
            "spec_dir": tmp / "specs",
        }


def _page(url: str, rollout_id: str) -> str:
    with make_engine(url).connect() as conn:
        data = report_page.load(conn, rollout_id)
    assert data is not None
    return report_page.render(data)


def _copy(url: str, tmp_path: Path) -> str:
    """A copy of the recorded warehouse, for a test that changes it."""
    target = tmp_path / "copy.db"
    with sqlite3.connect(url.removeprefix("sqlite:///")) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return f"sqlite:///{target}"


def _section(page: str, name: str) -> str:
    found = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
    assert found, f"no section {name}"
    return found.group(1)


def test_the_page_tells_what_happened_and_why(recorded: dict[str, Any]) -> None:
    url, rid = recorded["url"], recorded["rollout_id"]
    page = _page(url, rid)
    engine = make_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rid)).one()
        history = conn.execute(sa.select(traffic_history).where(traffic_history.c.rollout_id == rid)).all()
        decided = conn.execute(sa.select(decisions).where(decisions.c.rollout_id == rid).order_by(decisions.c.id)).all()
        m = measurements.c
        checks = conn.execute(
            sa.select(m.check_name, sa.func.count(), sa.func.sum(sa.case((m.verdict == "FAIL", 1), else_=0)))
            .where(m.rollout_id == rid, m.tier == "guardrail", m.check_name != "data")
            .group_by(m.check_name)
        ).all()
    # the headline: model, versions, outcome and the deciding reason, as recorded
    assert "unit-ranker: v1 → v2" in page and "rolled back" in page
    assert f'<p class="reason">{escape(row.reason)}</p>' in page
    assert row.reason.startswith("guardrails stage 2 breach: p99_latency_ms")
    assert "mlcanary, on its own" in page  # nobody chose: no person is named as the decider
    # the traffic timeline: one table row per history row, and a step chart
    traffic = _section(page, "traffic")
    assert traffic.count("<svg") == 1 and traffic.count("<tr>") == len(history) + 1
    assert "final split: 0 %" in traffic
    # the guardrails: one chart per check, each breach marked on the canary's line
    guard = _section(page, "guardrails")
    assert guard.count("<svg") == len(checks) >= 4
    for name, polls, _ in checks:
        assert f"{name}: {polls} polls" in guard
    p99 = next(c for c in checks if c[0] == "p99_latency_ms")
    assert p99[2] >= 1 and f"{p99[2]} breach" in guard
    assert len(re.findall(r"<circle[^>]*><title>\d\d:\d\d:\d\d FAIL: p99_latency_ms", guard)) == p99[2]
    # the analysis: a forest plot for the metric (overall + each segment), drift histograms
    analysis = _section(page, "analysis")
    assert 'id="metric-ctr"' in analysis
    assert "<h3>Drift between the arms</h3>" in analysis
    assert analysis.count("bins (baseline quantiles)") == 3  # f1, f2 and the score
    # the decision log: every decision, in order
    log = _section(page, "decisions")
    assert log.count("<tr>") == len(decided) + 1
    assert [a for a in re.findall(r"<td>(start|advance|rollback|promote)</td>", log)] == [
        d.action for d in decided if d.action in ("start", "advance", "rollback", "promote")
    ]
    # offline: nothing fetched, no script
    assert "<script" not in page and not re.search(r'(src|href)="https?://', page)


def test_the_forest_plot_draws_each_checks_recorded_interval(recorded: dict[str, Any]) -> None:
    """Every row of the ctr plot shows the interval the look recorded, in the look's verdict colour."""
    engine = make_engine(recorded["url"])
    with engine.connect() as conn:
        data = report_page.load(conn, recorded["rollout_id"])
    assert data is not None
    ctr = [m for m in data.analysis if m.check_name == "ctr"]
    assert {m.segment for m in ctr} >= {"*", "user_cohort=new", "user_cohort=returning"}
    view = next(v for v in report_page.metric_views(data) if v.name == "ctr")
    assert any(m.ci_low is not None for m in ctr)
    for m in ctr:
        label = "overall" if m.segment == "*" else m.segment
        assert f">{label}</text>" in view.plot
        if m.ci_low is not None:
            shown = f"{(m.ci_low - 1) * 100:+.1f} % to {(m.ci_high - 1) * 100:+.1f} %"  # as the reasons write it
            assert shown in view.plot, (m.segment, shown)
            point = m.canary_value / m.baseline_value  # ctr is relative: canary / baseline
            assert m.ci_low <= point <= m.ci_high
    assert f"tolerance {1 - 0.15:.3g}" in view.plot  # the spec's tolerance, as a ratio


def test_the_drift_histograms_hold_each_arms_counts(recorded: dict[str, Any]) -> None:
    """The stored histograms are the counts the drift check compared: they sum to its n's."""
    engine = make_engine(recorded["url"])
    with engine.connect() as conn:
        m = measurements.c
        rows = conn.execute(
            sa.select(m.check_name, m.histogram, m.baseline_n, m.canary_n).where(
                m.rollout_id == recorded["rollout_id"], m.histogram.is_not(None)
            )
        ).all()
    assert {r.check_name for r in rows} == {"input_drift_f1", "input_drift_f2", "output_drift"}
    for r in rows:
        h = json.loads(r.histogram)
        assert sum(h["baseline"]) == r.baseline_n and sum(h["canary"]) == r.canary_n
        assert len(h["baseline"]) == len(h["canary"]) >= 2


def test_text_from_the_data_is_escaped(recorded: dict[str, Any], tmp_path: Path) -> None:
    """A reason carrying markup (from a segment value, say) is shown as text, never run."""
    url = _copy(recorded["url"], tmp_path)
    with make_engine(url).begin() as conn:
        conn.execute(
            sa.update(rollouts)
            .where(rollouts.c.rollout_id == recorded["rollout_id"])
            .values(reason='<script>alert(1)</script> & <img src=x onerror="x()">')
        )
    page = _page(url, recorded["rollout_id"])
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;img" in page


def test_report_html_writes_the_page_to_a_file(recorded: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.html"
    cli = [str(Path(sys.executable).parent / "mlcanary"), "report", "--warehouse", recorded["url"]]
    done = subprocess.run(
        [*cli, "--rollout", recorded["rollout_id"], "--html", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    page = out.read_text()

    def undated(text: str) -> str:
        return re.sub(r"Generated [^<]*", "", text)

    assert undated(page) == undated(_page(recorded["url"], recorded["rollout_id"]))  # the plugin's page
    assert "<svg" in page and recorded["reason"].split(":")[0] in page
    missing = subprocess.run([*cli, "--rollout", "rollout__x/nope", "--html", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no rollout 'rollout__x/nope'" in missing.stderr
    alone = subprocess.run([*cli, "--html", str(out)], capture_output=True, text=True)
    assert alone.returncode == 2 and "--rollout" in alone.stderr
    unwritable = subprocess.run(
        [*cli, "--rollout", recorded["rollout_id"], "--html", str(tmp_path / "no" / "dir" / "x.html")],
        capture_output=True,
        text=True,
    )
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr


def test_the_metrics_are_the_warehouses_state(recorded: dict[str, Any]) -> None:
    engine = make_engine(recorded["url"])
    with engine.connect() as conn:
        text = rollout_metrics.exposition([conn]).decode()
        m = measurements.c
        last = conn.execute(
            sa.select(sa.func.max(m.measured_at)).where(m.rollout_id == recorded["rollout_id"], m.tier == "guardrail")
        ).scalar()
        polled = {
            r.check_name: r
            for r in conn.execute(
                sa.select(measurements).where(
                    m.rollout_id == recorded["rollout_id"], m.tier == "guardrail", m.measured_at == last
                )
            )
        }
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {f: [(s.labels, s.value) for s in fam.samples] for f, fam in families.items()}
    status = {labels["status"]: v for labels, v in samples["mlcanary_rollout_status"]}
    assert status["rolled_back"] == 1.0 and sum(status.values()) == 1.0
    assert samples["mlcanary_canary_weight_percent"][0][1] == 0.0
    assert samples["mlcanary_rollout_stage"][0][1] == 2.0
    assert ({"model": "unit-ranker", "cause": "guardrails stage N breach", "check": "p99_latency_ms"}, 1.0) in samples[
        "mlcanary_rollbacks"
    ]
    values = {(s["check"], s["arm"]): v for s, v in samples["mlcanary_check_value"]}
    for name, row in polled.items():
        if row.canary_value is not None:
            assert values[(name, "canary")] == pytest.approx(row.canary_value)
    verdicts = {s["check"]: s["verdict"] for s, v in samples["mlcanary_check_verdict"] if v == 1.0}
    assert verdicts == {n: r.verdict for n, r in polled.items() if n != "data"}


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        (
            "guardrails stage 2 breach: p99_latency_ms 419.7 ms >= 200.0 ms (n=282)",
            ("guardrails stage N breach", "p99_latency_ms"),
        ),
        ("analysis: ctr fell 0.2637 → 0.1643 (-37.7 %)", ("analysis", "")),
        ("analysis stage 1: failing look 1 of 1 during the bake: ctr fell", ("analysis stage N", "")),
        (None, ("unknown", "")),
    ],
)
def test_rollback_causes_take_the_numbers_out(reason: str | None, cause: tuple[str, str]) -> None:
    assert rollout_metrics.rollback_cause(reason) == cause


# --- the plugin in Airflow's API server --------------------------------------------------------------


@pytest.fixture(scope="module")
def api(recorded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Airflow's own API app (plugins loaded from the repo) with real logins (a viewer), and the
    recorded warehouse as the mlcanary_warehouse connection."""
    from fastapi.testclient import TestClient

    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps({"ops": "s3cret-viewer"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "ops:viewer")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        host = recorded["url"].removeprefix("sqlite:///")
        mp.setenv("AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": host}))
        mp.setenv("MLCANARY_SPEC_DIR", str(recorded["spec_dir"]))
        from airflow.api_fastapi.app import create_app

        with TestClient(create_app()) as client:
            yield client


def _token(client: Any, password: str = "s3cret-viewer") -> dict[str, str]:
    """A viewer's credentials, as ``POST /auth/token`` gives them (what a scraper or a script uses)."""
    got = client.post("/auth/token", json={"username": "ops", "password": password})
    assert got.status_code == 201, got.text
    return {"Authorization": f"Bearer {got.json()['access_token']}"}


def test_every_route_asks_airflow_for_credentials(api: Any, recorded: dict[str, Any]) -> None:
    dag_id, run_id = recorded["rollout_id"].split("/", 1)
    routes = [
        f"/mlcanary/report/{dag_id}/{run_id}",
        "/mlcanary/rollouts",
        "/mlcanary/metrics",
        f"/mlcanary/posthoc/{dag_id}",
    ]
    for route in routes:
        assert api.get(route).status_code == 401, route
        assert api.get(route, headers={"Authorization": "Bearer forged"}).status_code in (401, 403), route
    assert api.post("/auth/token", json={"username": "ops", "password": "wrong"}).status_code == 401
    auth = _token(api)  # a viewer may read every page
    for route in routes:
        assert api.get(route, headers=auth).status_code == 200, route


def test_the_plugin_serves_the_report_the_list_and_the_metrics(api: Any, recorded: dict[str, Any]) -> None:
    dag_id, run_id = recorded["rollout_id"].split("/", 1)
    auth = _token(api)
    page = api.get(f"/mlcanary/report/{dag_id}/{run_id}", headers=auth)
    assert page.headers["content-type"].startswith("text/html")
    assert escape(recorded["reason"]) in page.text and "<svg" in page.text
    listing = api.get("/mlcanary/rollouts", headers=auth).text
    assert '<table class="rollouts">' in listing and "v1 → v2" in listing
    assert f'href="/mlcanary/report/{dag_id}/{quote(run_id, safe="")}"' in listing  # opens in the same frame
    missing = api.get(f"/mlcanary/report/{dag_id}/manual__never", headers=auth)
    assert missing.status_code == 404 and "No rollout" in missing.text and "<html" in missing.text
    metrics = api.get("/mlcanary/metrics", headers=auth)
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "mlcanary_rollout_status{" in metrics.text
    views = api.get("/api/v2/plugins", headers=auth).json()["plugins"]
    mine = next(p for p in views if p["name"] == "mlcanary_ui")
    tab = next(v for v in mine["external_views"] if v["name"] == "Rollout report")
    assert tab["destination"] == "dag_run" and tab["url_route"] == "rollout_report"
    assert tab["href"] == "/mlcanary/report/{DAG_ID}/{RUN_ID}"
    assert any(v["destination"] == "nav" and v["name"] == "Rollouts" for v in mine["external_views"])


def test_the_operator_link_and_messages_point_at_the_tab() -> None:
    from mlcanary_airflow.links import report_url

    url = report_url("rollout__unit_ranker", "manual__2026-12-02T10:00:00+00:00")
    assert url.endswith(
        "/dags/rollout__unit_ranker/runs/manual__2026-12-02T10%3A00%3A00%2B00%3A00/plugin/rollout_report"
    )


def test_a_rollout_without_measurements_shows_what_it_has(recorded: dict[str, Any], tmp_path: Path) -> None:
    """A rollout that ended before any poll or look (its checks purged, say) renders, and says so."""
    url = _copy(recorded["url"], tmp_path)
    with make_engine(url).begin() as conn:
        conn.execute(sa.delete(measurements))
    page = _page(url, recorded["rollout_id"])
    assert "No guardrail poll recorded." in page and "No analysis look recorded." in page
    assert "<svg" in _section(page, "traffic")


def test_the_posthoc_page_plots_each_metric_per_window(api: Any, recorded: dict[str, Any]) -> None:
    """A post-hoc DAG's windows (analysed by the post-hoc code itself) as a time series and a table."""
    from mlcanary import posthoc

    engine = make_engine(recorded["url"])
    with engine.connect() as conn:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == recorded["rollout_id"])).one()
    spec = parse_spec(json.loads(row.spec))
    starts = [row.started_at + timedelta(seconds=3 * i) for i in range(3)]
    for start in starts:
        posthoc.analyse_window(engine, spec, start, start + timedelta(seconds=3), "v1", "v2", run_id="test")
    page = api.get(f"/mlcanary/posthoc/posthoc__{spec.name}", headers=_token(api)).text
    with engine.connect() as conn:
        stored = posthoc.results(conn, spec.name)
    assert len(stored) >= 3
    table = page.split('<table class="posthoc">')[1]
    assert table.count("<tr>") == len(stored) + 1
    for start in starts:
        assert f"{start:%Y-%m-%d %H:%M}" in table
    assert [r.status for r in stored] == ["analysed"] * len(stored)  # both versions served in each window
    assert "ctr: canary / baseline per window" in page  # ... so each has a ratio on the metric's line
