"""Where a rollout's report lives in the Airflow UI: the "Rollout report" tab of its run.

The tab is the ``dag_run`` external view of :mod:`mlcanary_airflow.ui`; the report task links to it,
and so do the Slack and e-mail messages and the approval question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from airflow.configuration import conf
from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.sdk import BaseOperator

TAB_ROUTE = "rollout_report"  # the tab's url_route on a run's page
APP_PREFIX = "/mlcanary"  # where the plugin's FastAPI app is mounted


def base_url() -> str:
    """The UI's address as the API server is configured (``[api] base_url``), without a trailing slash."""
    return (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")


def report_url(dag_id: str, run_id: str) -> str:
    """The run's "Rollout report" tab in the Airflow UI."""
    return f"{base_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/plugin/{TAB_ROUTE}"


def page_url(dag_id: str, run_id: str) -> str:
    """The report page itself (what the tab shows in its frame)."""
    return f"{base_url()}{APP_PREFIX}/report/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


class RolloutReportLink(BaseOperatorLink):
    """The "Rollout report" button of a task of a rollout DAG."""

    name = "Rollout report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return report_url(ti_key.dag_id, ti_key.run_id)
