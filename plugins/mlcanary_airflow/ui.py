"""mlcanary in the Airflow UI: a "Rollout report" tab on every run, a "Rollouts" page, post-hoc
time series and ``/mlcanary/metrics`` for Prometheus.

A FastAPI app mounted by the API server at ``/mlcanary``. Airflow does not protect a plugin's routes
(a mounted app does not inherit the core API's dependencies), so each route asks Airflow's auth
manager itself: 401 without credentials; the UI's ``_token`` cookie works in the tab's frame, a
bearer token from ``POST /auth/token`` anywhere else (a Prometheus scrape).

The pages are rendered by :mod:`mlcanary.report_page` from the warehouse's audit tables; a
rollout's warehouse is found through the specs' connections (the default ``mlcanary_warehouse``
first).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import sqlalchemy as sa
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.engine import Engine

from mlcanary import posthoc, report_page, rollout_metrics
from mlcanary.spec import load_specs
from mlcanary.warehouse.engine import make_engine
from mlcanary.warehouse.schema import posthoc_results, rollouts
from mlcanary_airflow.hooks import WarehouseHook
from mlcanary_airflow.links import APP_PREFIX, TAB_ROUTE

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
_engines: dict[str, Engine] = {}


def spec_dir() -> Path:
    """Where the DAG files read the specs from (``$MLCANARY_SPEC_DIR``, else the repo's include/rollouts)."""
    return Path(os.environ.get("MLCANARY_SPEC_DIR") or ROOT / "include" / "rollouts")


def warehouses() -> Iterator[Engine]:
    """Each warehouse the specs name, the default connection first; one engine per URL."""
    specs, _ = load_specs(spec_dir())
    seen: set[str] = set()
    for conn_id in dict.fromkeys([WarehouseHook.default_conn_name, *(s.warehouse.conn_id for _, s in specs)]):
        try:
            url = WarehouseHook(conn_id).get_url()
        except Exception as exc:  # a connection not defined here: that spec's rollouts are not shown
            log.warning("mlcanary ui: warehouse connection %s: %s", conn_id, exc)
            continue
        if url in seen:
            continue
        seen.add(url)
        if url not in _engines:
            _engines[url] = make_engine(url)
        yield _engines[url]


def _page(rollout_id: str) -> str:
    """A rollout's report page. The pages are shown in the UI's frames, which Airflow sandboxes
    without top navigation: links open the page in the same frame."""
    dag_id, run_id = rollout_id.split("/", 1)
    return f"{APP_PREFIX}/report/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


def _html(page: str) -> HTMLResponse:
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


app = FastAPI(title="mlcanary", description="Rollout reports and metrics from mlcanary's audit tables")
ReadDag = Depends(requires_access_dag("GET"))


@app.get("/report/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[ReadDag])
def report(dag_id: str, run_id: str) -> HTMLResponse:
    """One rollout's report: the run ``run_id`` of the rollout DAG ``dag_id``."""
    rollout_id = f"{dag_id}/{run_id}"
    for engine in warehouses():
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(rollouts.name):
                continue
            data = report_page.load(conn, rollout_id)
        if data is not None:
            return _html(report_page.render(data, links={"all rollouts": f"{APP_PREFIX}/rollouts"}))
    return HTMLResponse(
        report_page.missing_page(
            f"No rollout {rollout_id} in the specs' warehouses: this run has not started its rollout yet "
            "(its start task records it), or it is not a rollout DAG's run."
        ),
        status_code=404,
    )


@app.get("/rollouts", response_class=HTMLResponse, dependencies=[ReadDag])
def rollouts_list(user: GetUserDep, model: str | None = None, limit: int = 50) -> HTMLResponse:
    """Recent rollouts per model (only those of DAGs the user may read), each linking to its tab."""
    from airflow.api_fastapi.app import get_auth_manager

    rows: list[Any] = []
    for engine in warehouses():
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(rollouts.name):
                continue
            stmt = sa.select(rollouts).order_by(rollouts.c.started_at.desc()).limit(max(1, min(limit, 500)))
            if model:
                stmt = stmt.where(rollouts.c.model == model)
            rows += conn.execute(stmt).all()
    dag_ids = {r.rollout_id.split("/", 1)[0] for r in rows}
    allowed = get_auth_manager().filter_authorized_dag_ids(dag_ids=dag_ids, user=user)
    rows = [r for r in rows if r.rollout_id.split("/", 1)[0] in allowed]
    rows.sort(key=lambda r: r.started_at, reverse=True)
    return _html(report_page.rollouts_page(rows, lambda r: _page(r.rollout_id)))


@app.get("/posthoc/{dag_id}", response_class=HTMLResponse, dependencies=[ReadDag])
def posthoc_windows(dag_id: str) -> HTMLResponse:
    """A post-hoc DAG's windows (``posthoc__<spec name>``) with each metric over time."""
    name = dag_id.removeprefix("posthoc__")
    found: list[Any] = []
    for engine in warehouses():
        with engine.connect() as conn:
            if sa.inspect(conn).has_table(posthoc_results.name):
                found += posthoc.results(conn, name)
    return _html(report_page.posthoc_page(name, found))


@app.get("/metrics", dependencies=[ReadDag])
def metrics() -> Response:
    """Rollout metrics in the Prometheus text format."""
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(engine.connect()) for engine in warehouses()]
        body = rollout_metrics.exposition([c for c in conns if sa.inspect(c).has_table(rollouts.name)])
    return Response(body, media_type=rollout_metrics.CONTENT_TYPE)


NAV_ROUTE = "mlcanary_rollouts"


class MlcanaryUiPlugin(AirflowPlugin):
    name = "mlcanary_ui"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [{"app": app, "url_prefix": APP_PREFIX, "name": "mlcanary"}]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "Rollout report",
            "href": f"{APP_PREFIX}/report/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": TAB_ROUTE,
        },
        {
            "name": "Rollouts",
            "href": f"{APP_PREFIX}/rollouts",
            "destination": "nav",
            "url_route": NAV_ROUTE,
        },
    ]
