"""A retried analysis task (its worker died between two looks) goes on from its last saved look:
the failing-look count and the extension's start are not reset by the retry."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from airflow.sdk.exceptions import TaskDeferred

from conftest import Writer, base_spec
from mlcanary import progress
from mlcanary import rollout as steps
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.spec import parse_spec
from mlcanary.warehouse.schema import decisions, rollouts
from mlcanary_airflow.operators import AnalysisOperator


def test_a_retried_analysis_keeps_its_failing_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, write_batch: Writer
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")})
    )
    data = base_spec(analysis={**base_spec()["analysis"], "consecutive_fails": 3})
    spec = parse_spec(data)
    router = WarehouseRouter(engine)
    router.set_split(Split(spec.model, "v1", None, 0.0), None)
    rollout = steps.begin_rollout(engine, router, spec, "rollout__unit_ranker/run1", "v2")
    end = write_batch(engine, minutes=10, rate=50, faults=("v2:ctr_drop=0.5",))
    with engine.begin() as conn:  # the rollout started before that traffic
        conn.execute(sa.update(rollouts).values(started_at=end - timedelta(minutes=11)))
    context = {"dag": SimpleNamespace(dag_id="rollout__unit_ranker"), "run_id": "run1"}
    spec_data = spec.model_dump(mode="json", by_alias=True)

    def look() -> dict:
        """One try of the task, up to its deferral (a fresh operator: a new worker)."""
        op = AnalysisOperator(task_id="stage_1.analysis", spec=spec_data, stage=1, final=False)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)  # type: ignore[arg-type]
        return deferred.value.trigger.state

    first = look()
    assert (first["fails"], first["look"]) == (1, 1)
    second = look()  # the retry: the worker died while the look waited
    assert (second["fails"], second["look"]) == (2, 2)
    assert second["first_look"] == first["first_look"]  # the extension's clock is not restarted
    with engine.connect() as conn:
        reasons = (
            conn.execute(sa.select(decisions.c.reason).where(decisions.c.action == "confirm").order_by(decisions.c.id))
            .scalars()
            .all()
        )
        saved = progress.load(conn, rollout.rollout_id, "analysis:stage_1.analysis")
    assert [r.split(":")[0] for r in reasons] == ["failing look 1 of 3", "failing look 2 of 3"]
    assert saved == second
