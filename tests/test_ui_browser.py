"""The mlcanary UI plugin (``mlcanary_airflow/ui.py``) in a real Airflow, seen through a real browser
and scraped by a real Prometheus.

One Airflow for the module (scheduler, DAG processor, triggerer, API server; LocalExecutor), with the
simple auth manager's all-admins mode off, so a person has to sign in. One short rollout runs to its
end against the live simulator: v2 gets +400 ms of latency once it has 50 % of the traffic, so the
guardrails roll it back in stage 2 and the report has a breach to show.

- the browser: Playwright's Python client driving Debian's chromium (/usr/bin/chromium, installed by
  ``scripts/fetch_chromium.sh``; never a browser downloaded by Playwright). It signs in through the
  login form, opens the run's "Rollout report" tab and the "Rollouts" nav page, and saves full-page
  screenshots in the test's folder and in docs/screenshots/;
- Prometheus (Debian's, from .venv/prometheus) scrapes ``/mlcanary/metrics`` with a bearer token.

Without playwright or chromium (or prometheus) the test skips with the reason; under CI=true it fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import httpx
import pytest
import sqlalchemy as sa
import yaml

import prometheus_server as prom
from airflow_stack import AirflowStack
from conftest import ROOT, base_spec
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import Fault, LiveSimulator, SimConfig
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import create_schema, measurements, rollouts, traffic_split

pytestmark = pytest.mark.airflow

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"
NAME, MODEL = "ui_ranker", "ui-ranker"
DAG_ID = f"rollout__{NAME}"
USER, PASSWORD = "admin", secrets.token_urlsafe(12)
FAULT = "v2:latency_ms=400;min_percent=50"  # stage 2 (50 %) breaches the P99 guardrail
# Bakes of 12 s: shorter ones can meet Airflow 3.3's deferral race (see tests/test_faults_airflow.py).
SPEC = base_spec(
    name=NAME,
    model=MODEL,
    stages=[{"percent": 20, "bake": "12s"}, {"percent": 50, "bake": "12s"}],
    guardrails={**base_spec()["guardrails"], "min_requests": 10, "success_rate_min": 0.9},
    analysis={
        "interval": "3s",
        "window": "10m",
        "label_delay": "1s",
        "min_label_window": "1s",
        "min_samples": 100,
        "sequential": False,
        "segments": [],
        "metrics": [{"name": "ctr", "tolerance": 0.5}],
    },
    policies={"inconclusive": "rollback"},
    retries={"traffic": 2, "rollback": 2, "delay": "2s"},
)


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI must run the UI browser tests for real")
    pytest.skip(message)


@dataclass(frozen=True)
class Finished:
    """The rollout run to its end, as the warehouse recorded it."""

    run_id: str
    rollout: dict[str, Any]  # its mlcanary_rollouts row
    split: dict[str, Any]  # the model's mlcanary_traffic_split row afterwards
    last_p99: dict[str, float]  # the latest guardrail poll's P99 latency, by arm (canary, baseline)

    @property
    def rollout_id(self) -> str:
        return f"{DAG_ID}/{self.run_id}"

    @property
    def path(self) -> str:  # the run in URLs: /dags/{dag_id}/runs/{run_id}
        return f"{quote(DAG_ID, safe='')}/runs/{quote(self.run_id, safe='')}"

    @property
    def report(self) -> str:  # the report page itself, mounted by the plugin
        return f"/mlcanary/report/{quote(DAG_ID, safe='')}/{quote(self.run_id, safe='')}"


# --- the stack and the rollout ----------------------------------------------------------------


@pytest.fixture(scope="module")
def warehouse_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("ui-warehouse") / "warehouse.db"
    create_schema(make_engine(f"sqlite:///{db}"))
    return db


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, warehouse_db: Path) -> Iterator[AirflowStack]:
    if os.environ.get("CI") != "true" and os.environ.get("MLCANARY_SKIP_AIRFLOW_STACK"):
        pytest.skip("MLCANARY_SKIP_AIRFLOW_STACK is set")
    if not (ROOT / "plugins" / "mlcanary_airflow" / "ui.py").exists():
        _unavailable("no plugins/mlcanary_airflow/ui.py (the UI plugin) yet")
    spec_dir = tmp_path_factory.mktemp("ui-specs")
    (spec_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(SPEC))
    home = tmp_path_factory.mktemp("ui-airflow-home")
    passwords = home / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}) + "\n")  # the format of the generated file
    env = {
        # a real login: the simple auth manager with one user, admin, and its password in our file
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)}),
        "MLCANARY_WAREHOUSE": f"sqlite:///{warehouse_db}",
    }
    airflow = AirflowStack(home, spec_dir, env, credentials=(USER, PASSWORD))
    try:
        airflow.start()
        airflow.wait_dag(DAG_ID)
        yield airflow
    except Exception:
        print(airflow.logs())
        raise
    finally:
        airflow.stop()


class Traffic:
    """The live simulator for the model, following the routing table's split, in a thread."""

    def __init__(self, engine: sa.Engine) -> None:
        config = SimConfig(model=MODEL, seed=13, label_delay=timedelta(seconds=1), faults=[Fault.parse(FAULT)])
        self.sim = LiveSimulator(engine, config, rate=400, tick=0.5)
        self.thread = threading.Thread(target=self.sim.run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        time.sleep(2)  # some baseline traffic before the rollout starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop_event.set()
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def finished(stack: AirflowStack, warehouse_db: Path) -> Finished:
    engine = make_engine(f"sqlite:///{warehouse_db}")
    WarehouseRouter(engine).set_split(Split(MODEL, "v1", None, 0.0), None)
    started = time.monotonic()
    with Traffic(engine):
        run_id = stack.trigger(DAG_ID, {"candidate_version": "v2"})
        try:
            state = stack.wait_run(DAG_ID, run_id, timeout=300)
        except Exception:
            print(stack.logs())
            raise
    print(f"\nrollout {run_id}: {state} after {time.monotonic() - started:.0f} s")
    with engine.connect() as conn:
        rollout = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == f"{DAG_ID}/{run_id}")).one()
        split = conn.execute(sa.select(traffic_split).where(traffic_split.c.model == MODEL)).one()
        m = measurements.c
        polled = (m.rollout_id == rollout.rollout_id) & (m.tier == "guardrail") & (m.segment == "*")
        last = conn.execute(
            sa.select(m.canary_value, m.baseline_value).where(
                polled,
                m.check_name == "p99_latency_ms",
                m.measured_at == sa.select(sa.func.max(m.measured_at)).where(polled).scalar_subquery(),
            )
        ).one()
    engine.dispose()
    done = Finished(
        run_id,
        dict(rollout._mapping),
        dict(split._mapping),
        {"canary": last.canary_value, "baseline": last.baseline_value},
    )
    assert state == "failed", stack.states(DAG_ID, run_id)  # not promoted: the run fails
    assert done.rollout["status"] == "rolled_back" and done.rollout["stage_reached"] == 2, done.rollout
    assert done.rollout["reason"].startswith("guardrails stage 2 breach: p99_latency_ms"), done.rollout["reason"]
    assert done.split["canary_percent"] == 0.0
    return done


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium under Playwright; closed (and Playwright's driver stopped) afterwards."""
    if importlib.util.find_spec("playwright") is None:
        _unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        _unavailable(f"no {CHROMIUM} (run scripts/fetch_chromium.sh)")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])  # root here
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


def _shot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page PNG in the test's folder; with MLCANARY_SCREENSHOTS=1 also copied to docs/screenshots/
    (the README's pictures: a test run changes nothing in the repo unless asked to)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("MLCANARY_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)
    return path


@pytest.fixture(scope="module")
def signed_in(browser: Any, stack: AirflowStack) -> Iterator[Any]:
    """A browser context signed in through the UI's login form, as a person does."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    try:
        page = context.new_page()
        page.goto(f"{stack.url}/dags/{quote(DAG_ID, safe='')}/runs")
        page.wait_for_url("**/auth/login**")  # the UI sends an anonymous visitor to its login form
        page.get_by_label("Username").fill(USER)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/" not in url)
        assert any(c["name"] == "_token" for c in context.cookies()), "signed in, but no _token cookie"
        page.close()
        yield context
    finally:
        context.close()


@pytest.mark.timeout(900)
def test_the_report_tab_and_the_rollouts_page_in_a_browser(
    signed_in: Any, stack: AirflowStack, finished: Finished, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = signed_in.new_page()
    # The DAG's runs: the finished run is listed.
    page.goto(f"{stack.url}/dags/{quote(DAG_ID, safe='')}/runs")
    expect(page.get_by_text(finished.run_id).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    _shot(page, tmp_path, "ui-runs.png")

    # The run's page has the plugin's tab; a click opens it, with the report in its frame.
    page.goto(f"{stack.url}/dags/{finished.path}")
    tab = page.get_by_role("link", name="Rollout report").or_(page.get_by_role("tab", name="Rollout report"))
    tab.first.click()
    page.wait_for_url(lambda url: "/plugin/rollout_report" in url)
    assert unquote(urlparse(page.url).path) == f"/dags/{DAG_ID}/runs/{finished.run_id}/plugin/rollout_report"
    _check_report(page.frame_locator("iframe").first, finished, expect)
    page.wait_for_load_state("networkidle")
    _shot(page, tmp_path, "ui-report-tab.png")

    # The page alone (the same cookie), at its full height.
    response = page.goto(f"{stack.url}{finished.report}")
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    _check_report(page, finished, expect)
    assert page.locator("script").count() == 0, "the report is meant to need no JavaScript"
    _shot(page, tmp_path, "report-page.png")

    # The nav entry "Rollouts": the model's table lists the run, with a link to its report tab.
    page.goto(f"{stack.url}/")
    _open_nav_entry(page, "Rollouts")
    page.wait_for_url(lambda url: urlparse(url).path.startswith("/plugin/mlcanary_rollouts"))
    listing = page.frame_locator("iframe").first
    expect(listing.locator("h2", has_text=MODEL)).to_be_visible()
    row = _row_of(listing, finished)
    for text in ("v1 → v2", "rolled back", finished.rollout["reason"]):
        expect(row).to_contain_text(text)
    page.wait_for_load_state("networkidle")
    _shot(page, tmp_path, "ui-rollouts-nav.png")
    page.close()
    copied = f" (copied to {SCREENSHOTS})" if os.environ.get("MLCANARY_SCREENSHOTS") == "1" else ""
    print(f"\nscreenshots: {tmp_path}{copied}")


def test_the_links_in_the_frames_open_their_pages(signed_in: Any, stack: AirflowStack, finished: Finished) -> None:
    """A person clicks a row's link on the Rollouts page and sees the run's report; clicks the
    report's "all rollouts" and sees the list. In the whole window (the run's tab, the nav page) or in
    the frame itself: the frames' sandbox (Airflow's) lets a link move the top window only with
    allow-top-navigation, so a ``target="_top"`` link does nothing there."""
    page = signed_in.new_page()
    said: list[str] = []
    page.on("console", lambda message: said.append(message.text))
    tab = f"/dags/{DAG_ID}/runs/{finished.run_id}/plugin/rollout_report"
    report = unquote(finished.report)
    try:
        failures = []
        page.goto(f"{stack.url}/plugin/mlcanary_rollouts")
        _row_of(page.frame_locator("iframe").first, finished).locator("a").first.click()
        if not _shows(page, tab, report):
            failures.append(f"Rollouts page, the row's link: the report did not open (window at {page.url})")
        page.goto(f"{stack.url}{tab}")
        page.frame_locator("iframe").first.get_by_role("link", name="all rollouts").click()
        if not _shows(page, "/plugin/mlcanary_rollouts", "/mlcanary/rollouts"):
            failures.append(f"report tab, 'all rollouts': the list did not open (window at {page.url})")
        sandbox = page.locator("iframe").first.get_attribute("sandbox")
        assert not failures, f"{failures}; the frame's sandbox is {sandbox!r}; the browser said: {said}"
    finally:
        page.close()


def _shows(page: Any, top: str, framed: str, timeout: float = 10) -> bool:
    """Whether the window moves to the UI path ``top`` (or below it), or a frame to the page ``framed``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if unquote(urlparse(page.url).path).startswith(top):
            return True
        if any(unquote(urlparse(f.url).path) == framed for f in page.frames[1:]):
            return True
        page.wait_for_timeout(200)
    return False


def _row_of(listing: Any, finished: Finished) -> Any:
    """The Rollouts page's row of the finished run: the one whose link opens its report (the run's
    tab, or the report page itself inside the frame)."""
    links = listing.locator("table.rollouts a")
    links.first.wait_for()
    wanted = {f"/dags/{DAG_ID}/runs/{finished.run_id}/plugin/rollout_report", unquote(finished.report)}
    paths = [unquote(urlparse(h).path) for h in links.evaluate_all("found => found.map(a => a.href)")]
    found = [i for i, path in enumerate(paths) if path in wanted]
    assert len(found) == 1, paths
    return links.nth(found[0]).locator("xpath=ancestor::tr[1]")


def _check_report(where: Any, finished: Finished, expect: Any) -> None:
    """The report's content, in the tab's frame or on the page alone."""
    rollout = finished.rollout
    heading = where.locator("h1").first
    for text in (rollout["model"], rollout["baseline_version"], rollout["canary_version"]):
        expect(heading).to_contain_text(text)
    expect(where.locator("p.reason").first).to_contain_text(rollout["reason"])
    for section in ("traffic", "guardrails", "analysis", "decisions"):
        expect(where.locator(f"section#{section}")).to_be_visible()
    for section in ("traffic", "guardrails", "analysis"):
        svgs = where.locator(f"section#{section} svg")
        expect(svgs.first).to_be_visible()
        shapes = where.locator(f"section#{section} svg :is(path, polyline, line, rect, circle)")
        assert shapes.count() > 0, f"the {section} plot draws nothing"
    expect(where.locator("section#decisions")).to_contain_text("rollback")


def _open_nav_entry(page: Any, name: str) -> None:
    """Airflow's nav shows a single plugin view as a button of its own, several under "Plugins"."""
    direct, menu = page.get_by_role("link", name=name), page.get_by_role("button", name="Plugins")
    direct.or_(menu).first.wait_for()  # the nav is drawn after the page loads
    if direct.count() == 0:
        menu.click()
        direct = page.get_by_role("menuitem", name=name).or_(page.get_by_role("link", name=name))
    direct.first.click()


# --- no credentials, no page ------------------------------------------------------------------


def test_the_plugin_routes_refuse_anonymous_callers(stack: AirflowStack, finished: Finished) -> None:
    token = stack.token()
    for path in (finished.report, "/mlcanary/rollouts", "/mlcanary/metrics"):
        anonymous = httpx.get(f"{stack.url}{path}", timeout=30)
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text[:300])
        bad = httpx.get(f"{stack.url}{path}", headers={"Authorization": "Bearer not-a-token"}, timeout=30)
        assert bad.status_code in (401, 403), (path, bad.status_code)
        signed = httpx.get(f"{stack.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert signed.status_code == 200, (path, signed.status_code, signed.text[:300])
        cookie = httpx.get(f"{stack.url}{path}", cookies={"_token": token}, timeout=30)
        assert cookie.status_code == 200, (path, cookie.status_code)
    metrics = httpx.get(f"{stack.url}/mlcanary/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert metrics.headers["content-type"].replace(" ", "") == "text/plain;version=0.0.4;charset=utf-8"


# --- the real Prometheus scrapes the metrics --------------------------------------------------


def test_prometheus_scrapes_the_rollout_metrics(stack: AirflowStack, finished: Finished, tmp_path: Path) -> None:
    if prom.binaries() is None:
        _unavailable("no prometheus/promtool (run scripts/fetch_prometheus.sh .venv/prometheus)")
    target = urlparse(stack.url).netloc
    job = {
        "job_name": "mlcanary",
        "metrics_path": "/mlcanary/metrics",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "authorization": {"type": "Bearer", "credentials": stack.token()},  # a POST /auth/token JWT
        "static_configs": [{"targets": [target]}],
    }
    with contextlib.contextmanager(prom.scrape)(tmp_path, [job]) as url:

        def query(expr: str) -> list[dict[str, Any]]:
            body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
            assert body["status"] == "success", body
            return list(body["data"]["result"])

        def scraped() -> dict[str, Any] | None:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            if not targets or targets[0]["health"] == "unknown":
                return None  # not scraped yet
            return targets[0] if targets[0]["health"] == "down" or query("mlcanary_rollout_status") else None

        active = stack.wait_for("Prometheus to scrape /mlcanary/metrics", scraped, timeout=60)
        assert active["health"] == "up", active.get("lastError")
        assert active["scrapeUrl"] == f"{stack.url}/mlcanary/metrics"
        assert [r["value"][1] for r in query('up{job="mlcanary"}')] == ["1"]

        (weight,) = query(f'mlcanary_canary_weight_percent{{model="{MODEL}"}}')
        assert float(weight["value"][1]) == finished.split["canary_percent"] == 0.0

        status = query(f'mlcanary_rollout_status{{model="{MODEL}",rollout_id="{finished.rollout_id}"}}')
        # one series per status: 1 for the rollout's, 0 (or absent) for the others
        current = {r["metric"]["status"]: float(r["value"][1]) for r in status}
        assert current.get(finished.rollout["status"]) == 1.0, current
        assert all(v == 0.0 for s, v in current.items() if s != finished.rollout["status"]), current

        # the rollback, by cause with the numbers taken out (labels model, cause, check)
        rollbacks = query(f'mlcanary_rollbacks_total{{model="{MODEL}"}}')
        assert [(r["metric"].get("cause"), r["metric"].get("check"), r["value"][1]) for r in rollbacks] == [
            ("guardrails stage N breach", "p99_latency_ms", "1")
        ], rollbacks

        # the latest guardrail poll: the breach, as recorded
        checks = query(f'mlcanary_check_value{{model="{MODEL}",check="p99_latency_ms"}}')
        served = {r["metric"]["arm"]: float(r["value"][1]) for r in checks}
        assert served == pytest.approx(finished.last_p99), (served, finished.last_p99)
        assert served["canary"] > SPEC["guardrails"]["p99_latency_ms_max"] > served["baseline"]
