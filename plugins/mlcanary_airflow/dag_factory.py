"""One rollout DAG per spec, and a post-hoc analysis DAG for a spec with a ``posthoc`` section.

::

    validate_and_lock ─► stage_1 [shift_traffic ─► guardrails ─► analysis] ─► … ─► [approve_final_stage]
                         (guardrails: the bake, watched; the analysis looks alongside every interval)
        ─► stage_N ─► decide ─► promote                       (final analysis PASS, or a person chose it)
                            └─► extend ─► promote_after_extension   (policy ask: a person chose Extend)
    rollback (teardown of validate_and_lock): canary to 0 % unless promoted ─► report (teardown)
    report: releases the lock once the split is safe; the run succeeds only if the candidate was promoted

``rollback`` and ``report`` are Airflow teardown tasks: they run however the run ends, also when a
person marks it failed or success (Airflow leaves teardowns to run), and they are not skipped.

Building a DAG reads nothing but the spec files and the snapshots of running rollouts' specs
(:mod:`mlcanary_airflow.snapshots`): no database, no network, no Airflow Variables.
"""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, TaskGroup, get_parsing_context

from mlcanary.spec import VERSION_PATTERN, RolloutSpec, SpecError, load_specs, parse_spec
from mlcanary.words import took
from mlcanary_airflow import snapshots
from mlcanary_airflow.hitl import ApproveFinalStageOperator, DecideOperator
from mlcanary_airflow.notifiers import RolloutNotifier
from mlcanary_airflow.operators import (
    AnalysisOperator,
    BeginRolloutOperator,
    ExtendOperator,
    PromoteOperator,
    ReportOperator,
    RollbackOperator,
    ShiftTrafficOperator,
)
from mlcanary_airflow.posthoc_dag import build_posthoc_dag
from mlcanary_airflow.sensors import GuardrailSensor

log = logging.getLogger(__name__)


class SpecWarning(UserWarning):
    """A rollout spec that could not be turned into a DAG (the others still load)."""


# What a version may be, in words. Airflow 3.3's form and REST API have no custom error messages
# (jsonschema's own: "'v 2' does not match '^[A-Za-z0-9]...'"), but the refusal quotes the schema it
# failed, so a short hint is also in the schema's ``$comment`` (short: the quote wraps at 72 columns).
VERSION_RULE = (
    "a version is 1 to 128 letters, digits or . _ : + - characters, starting with a letter or digit, "
    "without spaces (e.g. v3, 2026.12.01, v1.2+build7)"
)
VERSION_HINT = "a version: letters, digits, . _ : + - (e.g. v3)"


def _params(spec: RolloutSpec) -> dict[str, Param]:
    candidate: dict = {
        "title": "Candidate version",
        "description": f"The model version to roll out (the canary): {VERSION_RULE}.",
        "pattern": VERSION_PATTERN,
        "$comment": VERSION_HINT,
    }
    return {
        # A scheduled spec needs a default; issue-free runs without a candidate skip cleanly.
        "candidate_version": (
            Param(None, type=["null", "string"], **candidate)
            if spec.schedule
            else Param(type="string", minLength=1, **candidate)
        ),
        "baseline_version": Param(
            None,
            type=["null", "string"],
            pattern=VERSION_PATTERN,
            title="Baseline version",
            description="The version serving now, to compare with. Empty: read from the router; a version "
            f"that is not the one serving is refused before any traffic moves. {VERSION_RULE[0].upper()}"
            f"{VERSION_RULE[1:]}.",
            **{"$comment": VERSION_HINT},
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Run every check and decision but change no traffic.",
        ),
        "force_reason": Param(
            None,
            type=["null", "string"],
            maxLength=500,
            title="Force: why roll out a rejected candidate",
            description="A candidate rolled back before is refused; to roll it out again, say why (recorded).",
        ),
    }


def build_dag(
    spec: RolloutSpec, source: str | Path = "", snapshot_dir: str | Path = "", built_from: str | None = None
) -> DAG:
    """The rollout DAG of ``spec``; ``built_from`` names the running rollout whose snapshot it comes from."""
    data = spec.model_dump(mode="json", by_alias=True)
    snapshot_dir = str(snapshot_dir or snapshots.snapshot_dir(Path(source).parent if source else "."))
    doc = (
        f"### Rollout of `{spec.model}`\n\n{spec.description}\n\n"
        f"Stages: {', '.join(f'{s.percent:g} % for {s.bake}' for s in spec.stages)}.  \n"
        f"Spec: `{source}`"
    )
    with DAG(
        dag_id=spec.dag_id,
        description=spec.description or f"canary rollout of {spec.model}",
        doc_md=doc,
        schedule=spec.schedule,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        # No backfill: a run shifts live traffic, so a run for a past date is refused (REST 400, CLI error).
        allowed_run_types=["manual", "scheduled"] if spec.schedule else ["manual"],
        params=_params(spec),
        tags=["mlcanary", spec.model, *spec.tags],
        default_args={"owner": spec.owner},
    ) as dag:

        def notify(event: str) -> list[RolloutNotifier]:
            return [RolloutNotifier(spec=data, event=event)] if spec.notifications.channels else []

        begin = BeginRolloutOperator(
            task_id="validate_and_lock", spec=data, snapshot_dir=snapshot_dir, built_from=built_from
        )
        previous: Any = begin
        stage_tasks = []
        final_analysis = None
        for number in range(1, len(spec.stages) + 1):
            last = number == len(spec.stages)
            if last and spec.approval.before_final_stage:
                approve = ApproveFinalStageOperator(
                    task_id="approve_final_stage", spec=data, notifiers=notify("approval")
                )
                previous >> approve
                previous = approve
            stage = spec.stages[number - 1]
            share = f"{stage.percent:g} %"
            # The grid shows each stage's share (ids stay stage_N.shift_traffic, ...): "stage_1 (10 %)",
            # "shift to 10 %", "guardrails at 10 % (4 s)", "analysis at 10 %".
            with TaskGroup(
                group_id=f"stage_{number}",
                group_display_name=f"stage_{number} ({share})",
                tooltip=f"{share} canary for {took(stage.bake)}",
            ) as group:
                shift = ShiftTrafficOperator(
                    task_id="shift_traffic", task_display_name=f"shift to {share}", spec=data, stage=number
                )
                guard = GuardrailSensor(
                    task_id="guardrails",
                    task_display_name=f"guardrails at {share} ({took(stage.bake)})",
                    spec=data,
                    stage=number,
                )
                analysis = AnalysisOperator(
                    task_id="analysis",
                    task_display_name=f"analysis at {share}",
                    spec=data,
                    stage=number,
                    final=last,
                    guardrails_task_id=guard.task_id,
                )
                shift >> guard >> analysis
            previous >> group
            previous = group
            stage_tasks += [shift, guard, analysis]
            final_analysis = analysis
        assert final_analysis is not None
        promoted = {"on_success_callback": notify("promote"), "on_failure_callback": notify("promote_failed")}
        promote = PromoteOperator(task_id="promote", spec=data, **promoted)
        promotions, choices = [promote], [promote]  # decide's branches; every task that can promote
        extend_id = None
        if spec.policies.asks:  # a person may choose Extend: look again, then decide automatically
            extend = ExtendOperator(task_id="extend", spec=data, promote_task_id="promote_after_extension")
            promote_after = PromoteOperator(task_id="promote_after_extension", spec=data, **promoted)
            extend >> promote_after
            promotions.append(promote_after)
            choices.append(extend)
            extend_id = extend.task_id
        decide = DecideOperator(
            task_id="decide",
            spec=data,
            final_analysis_task_id=final_analysis.task_id,
            extend_task_id=extend_id,
            notifiers=notify("approval"),
        )
        previous >> decide >> choices
        rollback = RollbackOperator(
            task_id="rollback",
            spec=data,
            on_success_callback=notify("rollback"),
            on_failure_callback=notify("rollback_failed"),
        ).as_teardown(setups=begin)
        report = ReportOperator(task_id="report", spec=data, snapshot_dir=snapshot_dir).as_teardown(
            setups=begin, on_failure_fail_dagrun=True
        )
        # Not downstream of the branching tasks (approve, decide, extend): a branch skips its direct
        # children, and the rollback must stay able to run. It waits for them through their children.
        [*stage_tasks, *promotions] >> rollback >> report
    return dag


def build_dags(spec_dir: str | Path) -> dict[str, DAG]:
    """A DAG for every valid spec of ``spec_dir``; each broken spec is reported and left out.

    A spec whose rollout is running is built from the snapshot that rollout started with, whatever
    its YAML says now (edited, broken, renamed or deleted): the rollout ends on the spec it began.
    A spec with a ``posthoc`` section also gets its post-hoc DAG, always from the YAML as it is now.
    """
    specs, errors = load_specs(spec_dir)
    for error in errors:
        _report(error)
    snapshot_dir = snapshots.snapshot_dir(spec_dir)
    running, unreadable = snapshots.load_all(snapshot_dir)
    for problem in unreadable:
        _warn(f"mlcanary: {problem}")
    chosen: dict[str, tuple[str, RolloutSpec, str | None]] = {s.name: (str(p), s, None) for p, s in specs}
    for snap in running:
        try:
            stored = parse_spec(snap.spec, str(snap.path))
        except SpecError as exc:
            _report(exc)
            continue
        current = chosen.get(stored.name)
        if current is None or current[1] != stored:
            state = "is broken, renamed or deleted" if current is None else "was edited"
            _warn(
                f"mlcanary: the spec of {stored.dag_id} {state} while rollout {snap.rollout_id} runs: "
                f"its DAG is built from the spec that rollout started with ({snap.path}) until it ends"
            )
        chosen[stored.name] = (str(snap.path), stored, snap.rollout_id)
    wanted = get_parsing_context().dag_id  # a worker builds only the DAG it runs
    dags: dict[str, DAG] = {}
    for source, spec, built_from in chosen.values():
        if wanted is not None and wanted != spec.dag_id:
            continue
        try:
            dags[spec.dag_id] = build_dag(spec, source, snapshot_dir, built_from)
        except Exception as exc:  # one spec must never take the other rollouts' DAGs down
            _report(SpecError(source, [f"cannot build the DAG: {exc}"]))
    for path, spec in specs:
        if spec.posthoc is None or (wanted is not None and wanted != spec.posthoc_dag_id):
            continue
        try:
            dags[spec.posthoc_dag_id] = build_posthoc_dag(spec, str(path))
        except Exception as exc:  # nor the rollout DAGs, nor the other post-hoc ones
            _report(SpecError(str(path), [f"posthoc: cannot build the DAG {spec.posthoc_dag_id}: {exc}"]))
    return dags


def _report(error: SpecError) -> None:
    message = f"mlcanary: rollout spec skipped, its DAG is not loaded:\n{error}"
    log.error(message)
    warnings.warn(message, SpecWarning, stacklevel=2)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, SpecWarning, stacklevel=2)
