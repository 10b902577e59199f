"""The post-hoc analysis DAG of a spec with a ``posthoc`` section: one run per data interval.

::

    labels_complete (deferrable: until data_interval_end + analysis.label_delay) ─► analyse

``analyse`` runs :func:`mlcanary.posthoc.analyse_window` over exactly the run's data interval and
stores one row per window and pair of versions in ``mlcanary_posthoc_results`` (replaced, never
duplicated, when the window runs again). History comes from backfills::

    airflow backfill create --dag-id posthoc__<name> --from-date 2026-11-01 --to-date 2026-11-30T23:00
    airflow backfill create ... --reprocess-behavior completed     # recompute after a spec change

A manual run needs a logical date (or ``data_interval_start`` and ``data_interval_end``): a run
without one has no window.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import DAG, BaseOperator, Context, CronDataIntervalTimetable, Param
from airflow.sdk.exceptions import AirflowFailException

from mlcanary import posthoc
from mlcanary.spec import VERSION_PATTERN, RolloutSpec
from mlcanary.words import took
from mlcanary_airflow.operators import SpecTaskMixin

RUN_TYPES = ["scheduled", "backfill", "manual"]


def window_of(context: Context) -> tuple[datetime, datetime]:
    """The run's data interval; a run without one (a manual run without a logical date) fails at once."""
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None:
        raise AirflowFailException(
            "this run has no data interval (a manual run without a logical date): trigger it with a logical "
            "date, or with data_interval_start and data_interval_end"
        )
    if end <= start:
        raise AirflowFailException(f"the data interval {start} to {end} is empty: give a window of some length")
    return start, end


class LabelsCompleteSensor(TimeDeltaSensor):
    """Waits until ``data_interval_end + delta`` (in the triggerer); passes at once for an old window."""

    def execute(self, context: Context) -> Any:
        window_of(context)  # no interval: fail now, not after the delay from run_after
        return super().execute(context)


class PosthocAnalysisOperator(SpecTaskMixin, BaseOperator):
    """The slow analysis of the run's data interval, for the versions that served in it, stored once."""

    def __init__(self, *, spec: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("retries", 2)  # the warehouse may be away for a moment
        kwargs.setdefault("retry_delay", timedelta(seconds=30))
        super().__init__(**kwargs)
        self.spec_data = spec

    def execute(self, context: Context) -> list[dict[str, Any]]:
        start, end = window_of(context)
        params = context["params"]
        try:
            found = posthoc.analyse_window(
                self.engine,
                self.spec,
                start,
                end,
                baseline=params.get("baseline_version") or None,
                canary=params.get("canary_version") or None,
                run_id=context["run_id"],
            )
        except ValueError as exc:  # versions that cannot be used: a retry would not help
            raise AirflowFailException(str(exc)) from None
        for result in found:
            self.log.info("mlcanary post-hoc: %s", result.line())
        return [
            {
                "window_start": r.window_start.isoformat(),
                "window_end": r.window_end.isoformat(),
                "baseline_version": r.baseline_version,
                "canary_version": r.canary_version,
                "status": r.status,
                "verdict": r.verdict,
            }
            for r in found
        ]


def _version(title: str, empty: str) -> Param:
    return Param(None, type=["null", "string"], pattern=VERSION_PATTERN, title=title, description=f"Empty: {empty}.")


def _params() -> dict[str, Param]:
    return {
        "baseline_version": _version("Baseline version", "the baseline the traffic history shows in the window"),
        "canary_version": _version("Canary version", "every canary the traffic history shows in the window"),
    }


def build_posthoc_dag(spec: RolloutSpec, source: str | Path = "") -> DAG:
    """The ``posthoc__<name>`` DAG of a spec that has a ``posthoc`` section."""
    if spec.posthoc is None:
        raise ValueError(f"{spec.name} has no posthoc section")
    data = spec.model_dump(mode="json", by_alias=True)
    delay = spec.analysis.label_delay
    doc = (
        f"### Post-hoc analysis of `{spec.model}`\n\n"
        f"One run per `{spec.posthoc.schedule}` interval (UTC): the slow analysis of that window for the "
        "versions the traffic history shows serving, stored once in `mlcanary_posthoc_results`. "
        f"Each run waits until its labels are complete ({took(delay)} after the window). "
        "Fill history with `airflow backfill create`; recompute with `--reprocess-behavior completed`. "
        "A paused DAG leaves a backfill's runs queued.  \n"
        f"Spec: `{source}`, analysis hash `{posthoc.spec_hash(spec)}`"
    )
    with DAG(
        dag_id=spec.posthoc_dag_id,
        description=f"post-hoc canary analysis of {spec.model}, per {spec.posthoc.schedule} window",
        doc_md=doc,
        schedule=CronDataIntervalTimetable(spec.posthoc.schedule, timezone="UTC"),
        start_date=spec.posthoc.since,
        catchup=False,  # history comes from backfills
        max_active_runs=4,
        allowed_run_types=RUN_TYPES,
        params=_params(),
        tags=["mlcanary", "posthoc", spec.model, *spec.tags],
        default_args={"owner": spec.owner},
    ) as dag:
        labels = LabelsCompleteSensor(task_id="labels_complete", delta=delay, deferrable=True)
        labels >> PosthocAnalysisOperator(task_id="analyse", spec=data)
    return dag
