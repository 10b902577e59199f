"""The DAG run's note, which the UI shows on the run's page: ``v1 → v3: rolled back at stage 2: ...``.

A task cannot set its run's note in Airflow 3.3 (the Execution API has no route for it, and tasks
have no database access), so the tasks leave the text in XCom and an Airflow listener writes it
where the run's state changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, ClassVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


RUN_NOTE = "mlcanary_run_note"  # XCom: the run's note, which tasks leave for RunNotes
_AUTO = (" → ", ": ")  # what a note of ours looks like: a newer one of ours replaces it, a person's stays


def run_note(baseline: str | None, canary: str | None, outcome: str) -> str:
    """The DAG run's note, what the runs list shows: ``v1 → v3: rolled back at stage 2: ...``."""
    note = f"{baseline or 'serving'} → {canary or '?'}: {outcome}"
    return note if len(note) <= 600 else note[:597] + "..."


class RunNotes:
    """An Airflow listener that writes a rollout run's note (what the UI's runs list and run page
    show), so v2, v3 and v4 can be told apart at a glance: ``→ v3: running`` when the run starts,
    ``v1 → v3: rolled back at stage 2: guardrails stage 2 breach: ...`` when it ends.

    A task cannot set its run's note in Airflow 3.3: the Execution API has no route for it (only a
    new run may carry a note) and tasks have no database access. The listener runs where the run's
    state changes (the scheduler, the API server when a person marks a run, ``dag.test()``), with
    the metadata database, and takes the text the tasks left in XCom (``mlcanary_run_note``, set by
    ``validate_and_lock`` and ``report``). A note a person wrote is never overwritten.
    """

    @staticmethod
    def _ours(note: str | None) -> bool:
        return not note or all(part in note for part in _AUTO)

    @contextlib.contextmanager
    def _session(self, dag_run: Any) -> Any:
        """The session that changes the run's state (the scheduler's, the API server's): a second
        one could wait on its locks. ``dag.test()`` hands over a run detached from its session: a
        session of our own then, committed at once."""
        from airflow.utils.session import create_session
        from sqlalchemy.orm import object_session

        session = object_session(dag_run)
        if session is not None:
            yield session
            return
        with create_session() as own:
            yield own

    def _set(self, session: Any, dag_run: Any, note: str) -> None:
        """Write ``note`` as the run's note, unless a person wrote the note there is."""
        from airflow.models.dagrun import DagRunNote

        row = session.get(DagRunNote, dag_run.id)
        if row is None:
            row = DagRunNote(content=note)
            row.dag_run_id = dag_run.id
            session.add(row)
        elif self._ours(row.content) and row.content != note:
            row.content = note

    @hookimpl
    def on_dag_run_running(self, dag_run: Any, msg: str) -> None:
        if not str(dag_run.dag_id).startswith("rollout__"):
            return
        try:
            conf = dag_run.conf or {}
            candidate = conf.get("candidate_version") or "the registry's candidate"
            with self._session(dag_run) as session:
                self._set(session, dag_run, run_note(conf.get("baseline_version"), candidate, "running"))
        except Exception:  # a note must never disturb the scheduler
            log.exception("mlcanary: the run note of %s could not be set", getattr(dag_run, "run_id", "?"))

    def _from_tasks(self, dag_run: Any, fallback: str) -> None:
        if not str(dag_run.dag_id).startswith("rollout__"):
            return
        try:
            import sqlalchemy as sa
            from airflow.models.xcom import XComModel

            with self._session(dag_run) as session:
                value = session.scalar(
                    sa.select(XComModel.value)
                    .where(XComModel.dag_run_id == dag_run.id, XComModel.key == RUN_NOTE)
                    .order_by(XComModel.timestamp.desc())
                    .limit(1)
                )
                if isinstance(value, str) and value.startswith('"'):  # stored through XCom's own serializer
                    value = json.loads(value)
                if isinstance(value, str) and value:
                    if value.endswith(": running"):  # the run ended before its report said how
                        value = value.removesuffix("running") + fallback
                    self._set(session, dag_run, value)
        except Exception:  # a note must never disturb the scheduler
            log.exception("mlcanary: the run note of %s could not be set", getattr(dag_run, "run_id", "?"))

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        self._from_tasks(dag_run, "run succeeded")

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        self._from_tasks(dag_run, "run failed before its report (see the run)")


RUN_NOTES = RunNotes()


class RunNotesPlugin(AirflowPlugin):
    """Registers :class:`RunNotes` (Airflow loads the plugins folder's modules and their plugins)."""

    name = "mlcanary_run_notes"
    listeners: ClassVar[list[Any]] = [RUN_NOTES]
