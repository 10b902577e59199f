"""The spec a running rollout started with, kept as a file beside the specs, so its DAG outlives an edit.

Airflow rebuilds a DAG from the current YAML whenever it parses the file, on the DAG processor and on
every worker. A rollout's spec broken, renamed or deleted while it runs would leave its remaining
tasks (rollback and report included) without a DAG. So ``validate_and_lock`` writes the spec it
started with to ``<snapshot dir>/<spec name>.json``; while that file exists the DAG is built from it,
whatever the YAML now says; ``report`` removes it once the lock is released. The same spec is stored
with the rollout's row in the warehouse, for the record and for ``mlcanary abort``.

The folder (``$MLCANARY_SNAPSHOT_DIR``, default ``<spec dir>/.running``) must be shared by the DAG
processor and the workers, as the spec folder is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    path: Path
    spec: dict[str, Any]
    rollout_id: str


def snapshot_dir(spec_dir: str | Path) -> Path:
    return Path(os.environ.get("MLCANARY_SNAPSHOT_DIR") or Path(spec_dir) / ".running")


def save(directory: str | Path, spec: dict[str, Any], rollout_id: str) -> Path:
    """Write the snapshot atomically (a reader never sees half a file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec['name']}.json"
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"rollout_id": rollout_id, "spec": spec}, indent=1, sort_keys=True))
    partial.replace(path)
    return path


def remove(directory: str | Path, name: str, rollout_id: str) -> bool:
    """Remove the snapshot of ``name`` if ``rollout_id`` wrote it; returns whether it did."""
    path = Path(directory) / f"{name}.json"
    found = read(path)
    if found is None or found.rollout_id != rollout_id:
        return False
    path.unlink(missing_ok=True)
    return True


def read(path: Path) -> Snapshot | None:
    try:
        data = json.loads(path.read_text())
        return Snapshot(path, dict(data["spec"]), str(data["rollout_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_all(directory: str | Path) -> tuple[list[Snapshot], list[str]]:
    """Every readable snapshot, and a problem line for each unreadable one."""
    directory = Path(directory)
    found, problems = [], []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        snapshot = read(path)
        if snapshot is None:
            problems.append(f"{path}: not a readable rollout snapshot")
        else:
            found.append(snapshot)
    return found, problems
