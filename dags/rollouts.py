"""Rollout DAGs: one per spec in ``include/rollouts/`` (or ``$MLCANARY_SPEC_DIR``), and the watchdog.

A broken spec is logged with its file and field and left out; the other DAGs load.
"""

import os
from pathlib import Path

from mlcanary_airflow.dag_factory import build_dags
from mlcanary_airflow.watchdog import build_watchdog_dag

SPEC_DIR = Path(os.environ.get("MLCANARY_SPEC_DIR") or Path(__file__).resolve().parent.parent / "include" / "rollouts")

globals().update(build_dags(SPEC_DIR))
mlcanary_watchdog = build_watchdog_dag(SPEC_DIR)
