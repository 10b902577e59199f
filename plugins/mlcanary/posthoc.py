"""Post-hoc analysis: the slow analysis of one past window, for the versions that served in it, stored once.

Which versions served comes from the traffic history (``mlcanary_traffic_history``): the split in
force during ``[start, end)`` is the last row at or before ``start`` and every row inside the window.
Each row gives the canary's share at that moment as a rollout set it or read it back: the applied
steps, and the rows that changed nothing (a rollout's start, a step already in force, a failed or
refused step as read back, the final split). Skipped: rows whose share is unknown (NULL: the
platform could not be read), which say nothing, and every row of a dry-run rollout, whose steps were
never applied. A canary at 100 % serves alone (a promotion): it is then the only version serving.

Each (baseline, canary) pair whose canary had a share between 0 and 100 % for some time in the window
is analysed over exactly the window, with the labels observed by ``end + analysis.label_delay``. A
window without one is recorded as ``no_canary`` with the version that served, or ``no_history``
when the history knows of none. Rows are upserted on (spec, window, baseline, canary): analysing a
window again replaces its rows and never adds a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateTable

from mlcanary.analysis import AnalysisResult, AnalysisWindow, analyze
from mlcanary.spec import VERSION_PATTERN, RolloutSpec
from mlcanary.warehouse.engine import naive_utc, utcnow
from mlcanary.warehouse.schema import posthoc_results, rollouts, traffic_history

NONE = ""  # a key column's "no version": no canary (canary_version), no version known (baseline_version)
KEY = tuple(c.name for c in posthoc_results.primary_key.columns)


@dataclass(frozen=True)
class Served:
    """A split that was in force for some time in the window."""

    baseline_version: str
    canary_version: str | None  # None: the baseline served alone
    percent: float  # the canary's share

    @property
    def compared(self) -> bool:
        """Both versions had traffic: a comparison of the two."""
        return self.canary_version is not None and 0.0 < self.percent < 100.0

    @property
    def alone(self) -> str:
        """The version that served alone (a canary at 100 %, else the baseline)."""
        return self.canary_version if self.canary_version and self.percent >= 100.0 else self.baseline_version


@dataclass(frozen=True)
class PosthocResult:
    """One stored row: a window and a pair of versions (or the version that served alone)."""

    spec_name: str
    model: str
    window_start: datetime
    window_end: datetime
    baseline_version: str  # "": no version is known to have served
    canary_version: str | None  # None: no canary
    status: str  # analysed | no_canary | no_history
    verdict: str | None
    reason: str
    baseline_n: int | None
    canary_n: int | None
    checks: dict[str, Any] | None  # the analysis result, AnalysisResult.to_dict()
    label_asof: datetime
    versions_from: str  # history | params
    spec_hash: str
    run_id: str | None
    computed_at: datetime

    def row(self) -> dict[str, Any]:
        return {
            "spec_name": self.spec_name,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "baseline_version": self.baseline_version,
            "canary_version": self.canary_version or NONE,
            "model": self.model,
            "status": self.status,
            "verdict": self.verdict,
            "reason": self.reason,
            "baseline_n": self.baseline_n,
            "canary_n": self.canary_n,
            "checks": None if self.checks is None else json.dumps(self.checks),
            "label_asof": self.label_asof,
            "versions_from": self.versions_from,
            "spec_hash": self.spec_hash,
            "run_id": self.run_id,
            "computed_at": self.computed_at,
        }

    def line(self) -> str:
        """One readable line: window, versions, verdict, reason."""
        end = f"{self.window_end:%H:%M}" if self.window_end.date() == self.window_start.date() else f"{self.window_end}"
        window = f"{self.window_start:%Y-%m-%d %H:%M}-{end} UTC"
        if self.status == "analysed":
            counts = f" (labelled rows: baseline {self.baseline_n or 0:,}, canary {self.canary_n or 0:,})"
            return f"{window} {self.baseline_version} vs {self.canary_version}: {self.verdict}{counts}: {self.reason}"
        serving = f"{self.baseline_version} alone" if self.baseline_version else "nothing known"
        return f"{window} {serving}: {self.status}: {self.reason}"


def spec_hash(spec: RolloutSpec) -> str:
    """A hash of what decides a window's result: the model, the warehouse mapping, the analysis settings."""
    data = spec.model_dump(mode="json", by_alias=True, include={"model", "warehouse", "analysis"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def served_in(conn: Connection, model: str, start: datetime, end: datetime) -> list[Served]:
    """The distinct splits in force for some time in ``[start, end)``, in the order they began."""
    start, end = naive_utc(start), naive_utc(end)
    h = traffic_history.c
    dry_runs = sa.select(rollouts.c.rollout_id).where(rollouts.c.dry_run == sa.true())
    counted = [
        h.model == model,
        h.to_percent.is_not(None),
        sa.or_(h.rollout_id.is_(None), h.rollout_id.not_in(dry_runs)),
    ]
    columns = [h.applied_at, h.baseline_version, h.canary_version, h.to_percent]
    before = conn.execute(
        sa.select(*columns).where(*counted, h.applied_at <= start).order_by(h.applied_at.desc(), h.id.desc()).limit(1)
    ).all()
    inside = conn.execute(
        sa.select(*columns).where(*counted, h.applied_at > start, h.applied_at < end).order_by(h.applied_at, h.id)
    ).all()
    rows = [*before, *inside]
    found: list[Served] = []
    for i, row in enumerate(rows):
        begins = max(row.applied_at, start)
        ends = rows[i + 1].applied_at if i + 1 < len(rows) else end
        if ends <= begins:  # superseded at the same moment: it never served
            continue
        served = Served(row.baseline_version, row.canary_version, float(row.to_percent))
        if served not in found:
            found.append(served)
    return found


def analyse_window(
    engine: Engine,
    spec: RolloutSpec,
    start: datetime,
    end: datetime,
    baseline: str | None = None,
    canary: str | None = None,
    run_id: str | None = None,
) -> list[PosthocResult]:
    """Analyse ``[start, end)`` and store the results (replacing the window's earlier ones).

    Without versions, every pair the traffic history shows serving is analysed, and the window's
    earlier history-derived rows that no longer apply are removed. With ``canary`` (and optionally
    ``baseline``, else the baseline the history shows), that pair alone is analysed and upserted.
    Raises ``ValueError`` for versions that cannot be used.
    """
    start, end = naive_utc(start), naive_utc(end)
    if end <= start:
        raise ValueError(f"the window {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} is empty")
    for what, version in (("baseline_version", baseline), ("canary_version", canary)):
        if version is not None and not re.fullmatch(VERSION_PATTERN, version):
            raise ValueError(f"{what} {version!r} is not a version (1-128 letters, digits, . _ : + -)")
    if baseline and not canary:
        raise ValueError("baseline_version was given without canary_version: give both, the canary alone, or neither")
    window = AnalysisWindow(start=start, end=end, label_asof=end + spec.analysis.label_delay)
    common = dict(
        spec_name=spec.name,
        model=spec.model,
        window_start=start,
        window_end=end,
        label_asof=window.label_asof,
        versions_from="params" if canary else "history",
        spec_hash=spec_hash(spec),
        run_id=run_id,
    )
    results: list[PosthocResult] = []
    with engine.connect() as conn:
        served = served_in(conn, spec.model, start, end)
        if canary:
            pairs = [(baseline or _baseline_for(served, canary), canary)]
        else:
            pairs = list(dict.fromkeys((s.baseline_version, s.canary_version) for s in served if s.compared))
        for base, can in pairs:
            assert can is not None
            if base == can:
                raise ValueError(f"baseline and canary are the same version {can!r}")
            results.append(_analysed(analyze(conn, spec, base, can, window), common))
    if not pairs:
        alone = list(dict.fromkeys(s.alone for s in served))
        results = [_not_analysed(spec, version, len(alone), common) for version in alone or [NONE]]
    store(engine, results, replace_window=not canary)
    return results


def _baseline_for(served: Sequence[Served], canary: str) -> str:
    for s in served:
        if s.compared and s.canary_version == canary:
            return s.baseline_version
    others = [s.alone for s in served if s.alone != canary]
    if not others:
        raise ValueError(
            f"the traffic history shows no baseline serving beside {canary} in the window: give baseline_version"
        )
    return others[-1]


def _analysed(result: AnalysisResult, common: dict[str, Any]) -> PosthocResult:
    overall = next((c for c in result.checks if c.segment == "*" and c.canary_n is not None), None)
    return PosthocResult(
        baseline_version=result.baseline_version,
        canary_version=result.canary_version,
        status="analysed",
        verdict=result.verdict.value,
        reason=result.reason,
        baseline_n=None if overall is None else overall.baseline_n,
        canary_n=None if overall is None else overall.canary_n,
        checks=result.to_dict(),
        computed_at=utcnow(),
        **common,
    )


def _not_analysed(spec: RolloutSpec, version: str, versions: int, common: dict[str, Any]) -> PosthocResult:
    if not version:
        status = "no_history"
        reason = (
            f"the traffic history of {spec.model} has no split in force in this window: "
            "no version is known to have served, nothing to compare"
        )
    else:
        status = "no_canary"
        also = f" (one of {versions} versions that served alone)" if versions > 1 else ""
        reason = f"no canary served in this window: {version} served alone{also}, nothing to compare"
    return PosthocResult(
        baseline_version=version,
        canary_version=None,
        status=status,
        verdict=None,
        reason=reason,
        baseline_n=None,
        canary_n=None,
        checks=None,
        computed_at=utcnow(),
        **common,
    )


def ensure_table(engine: Engine) -> None:
    """Create the results table if it is missing (safe when several runs start at once)."""
    with engine.begin() as conn:
        conn.execute(CreateTable(posthoc_results, if_not_exists=True))


def store(engine: Engine, found: Sequence[PosthocResult], *, replace_window: bool) -> None:
    """Upsert ``found`` (all of one window); ``replace_window``: drop the window's other history-derived rows."""
    if not found:
        return
    ensure_table(engine)
    first = found[0]
    c = posthoc_results.c
    with engine.begin() as conn:
        for result in found:
            _upsert(conn, result.row())
        if replace_window:
            kept = sa.or_(
                *(
                    sa.and_(c.baseline_version == r.baseline_version, c.canary_version == (r.canary_version or NONE))
                    for r in found
                )
            )
            conn.execute(
                sa.delete(posthoc_results).where(
                    c.spec_name == first.spec_name,
                    c.window_start == first.window_start,
                    c.window_end == first.window_end,
                    c.versions_from == "history",
                    sa.not_(kept),
                )
            )


def _upsert(conn: Connection, values: dict[str, Any]) -> None:
    """INSERT, or UPDATE the row with the same key: ON CONFLICT where the dialect has it, else look first."""
    changes = {k: v for k, v in values.items() if k not in KEY}
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        statement = insert(posthoc_results).values(**values)
        conn.execute(
            statement.on_conflict_do_update(index_elements=list(KEY), set_={k: statement.excluded[k] for k in changes})
        )
        return
    where = [posthoc_results.c[k] == values[k] for k in KEY]
    if conn.execute(sa.select(sa.literal(1)).select_from(posthoc_results).where(*where)).first():
        conn.execute(sa.update(posthoc_results).where(*where).values(**changes))
    else:
        conn.execute(sa.insert(posthoc_results).values(**values))


def results(
    conn: Connection, spec_name: str, start: datetime | None = None, end: datetime | None = None
) -> list[sa.Row]:
    """The stored rows of a spec whose windows lie within ``[start, end]``, in window order."""
    c = posthoc_results.c
    where = [c.spec_name == spec_name]
    if start is not None:
        where.append(c.window_start >= naive_utc(start))
    if end is not None:
        where.append(c.window_end <= naive_utc(end))
    return list(
        conn.execute(
            sa.select(posthoc_results).where(*where).order_by(c.window_start, c.baseline_version, c.canary_version)
        ).all()
    )
