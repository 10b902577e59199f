"""The warehouse tables a spec points at, as :class:`~mlcanary.warehouse.queries.MappedTable`."""

from __future__ import annotations

from collections.abc import Iterable

from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.queries import MappedTable, mapped_table


def predictions_table(spec: RolloutSpec, extra: Iterable[str] = ()) -> MappedTable:
    p = spec.warehouse.predictions
    return mapped_table(p.table, p.db_schema, p.columns.model_dump(), extra)


def resources_table(spec: RolloutSpec) -> MappedTable:
    r = spec.warehouse.resource_metrics
    return mapped_table(r.table, r.db_schema, r.columns.model_dump())
