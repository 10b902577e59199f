"""Notifications: what a rollout did, and why, through Airflow's Slack-webhook and SMTP notifiers."""

from __future__ import annotations

import logging
from typing import Any

from airflow.configuration import conf
from airflow.sdk import Context
from airflow.sdk.bases.notifier import BaseNotifier

from mlcanary.audit import last_decision
from mlcanary.rollout import get_rollout
from mlcanary.spec import NotifyEvent, RolloutSpec
from mlcanary.warehouse.engine import make_engine
from mlcanary_airflow.hooks import WarehouseHook

log = logging.getLogger(__name__)

Event = NotifyEvent | str  # plus "rollback_failed" and "promote_failed", always sent


def base_url() -> str:
    """The Airflow UI's address: ``[api] base_url``, else host and port of the API server."""
    configured = conf.get("api", "base_url", fallback=None)
    if configured and "://" in configured:
        return configured.rstrip("/")
    host = conf.get("api", "host", fallback="localhost")
    return f"http://{'localhost' if host in ('0.0.0.0', '') else host}:{conf.get('api', 'port', fallback='8080')}"


class RolloutNotifier(BaseNotifier):
    """Sends one message about a rollout ``event`` to the spec's channels (Slack, e-mail).

    The message names the model, the versions, the stage, the reason from the audit tables, and a
    link to the run (or, for ``approval``, to the task waiting for a person). A channel that fails is
    logged and does not fail the task: the audit tables still hold everything.
    """

    def __init__(self, *, spec: dict[str, Any], event: Event, warehouse_url: str | None = None) -> None:
        super().__init__()
        self.spec_data = spec
        self.event = event
        self.warehouse_url = warehouse_url  # for tests; otherwise the spec's warehouse connection

    def message(self, context: Context) -> tuple[str, str]:
        """(subject, text) for this event, from the context and the audit tables."""
        spec = RolloutSpec.model_validate(self.spec_data)
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        rollout_id = f"{dag_id}/{run_id}"
        engine = (
            make_engine(self.warehouse_url)
            if self.warehouse_url
            else WarehouseHook(spec.warehouse.conn_id).get_engine()
        )
        with engine.connect() as conn:
            rollout = get_rollout(conn, rollout_id)
            decided = last_decision(conn, rollout_id, "rollback")
        canary = rollout.canary_version if rollout else context["params"].get("candidate_version")
        baseline = rollout.baseline_version if rollout else "?"
        what = f"{spec.model} {canary} (baseline {baseline})"
        run = f"{base_url()}/dags/{dag_id}/runs/{run_id}"
        stage = f"stage {rollout.stage_reached} of {len(spec.stages)}" if rollout else "before any traffic"
        if self.event == "rollback":
            reason = rollout.reason if rollout and rollout.reason else (decided.reason if decided else "see the run")
            subject = f"mlcanary: {what} rolled back"
            text = f"{subject} at {stage}: the canary is at 0 %.\nWhy: {reason}\nRun: {run}"
        elif self.event == "rollback_failed":
            subject = f"mlcanary: ROLLBACK FAILED for {what}"
            text = (
                f"{subject}: the canary may still receive traffic ({rollout.canary_percent:g} % last recorded). "
                f"Act now: check the router, then clear the rollback task.\nWhy it was rolled back: "
                f"{decided.reason if decided else 'see the run'}\nRun: {run}"
                if rollout
                else f"{subject}.\nRun: {run}"
            )
        elif self.event == "promote":
            subject = f"mlcanary: {what} promoted"
            why = rollout.reason if rollout else "-"
            text = f"{subject}: {canary} serves 100 % and is the new baseline.\nWhy: {why}\nRun: {run}"
        elif self.event == "promote_failed":
            subject = f"mlcanary: promotion of {what} failed"
            if rollout and rollout.status == "promoted":  # the traffic moved; a later step (MLflow) did not
                text = f"{subject} after the switch: {canary} serves 100 %, but a later step failed.\nRun: {run}"
            else:
                text = f"{subject}; the rollback task takes the canary back to 0 %.\nRun: {run}"
        else:  # approval
            task = context["task"]
            link = task.generate_link_to_ui(task_instance=context["task_instance"], base_url=base_url())
            subject = f"mlcanary: {what} waits for a decision"
            question = f"{getattr(task, 'subject', '')}\n{getattr(task, 'body', '') or ''}"
            text = f"{subject}: {question}\nRespond: {link}\nRun: {run}"
        return subject, text

    def notify(self, context: Context) -> None:
        spec = RolloutSpec.model_validate(self.spec_data)
        n = spec.notifications
        always = self.event in ("rollback_failed", "promote_failed")
        if not n.channels or not (always or self.event in n.events):
            return
        subject, text = self.message(context)
        if n.slack is not None:
            self._send("Slack", lambda: _slack(n.slack.conn_id, text, context))  # type: ignore[union-attr]
        if n.email is not None:
            email = n.email
            self._send("e-mail", lambda: _email(email.conn_id, email.to, email.from_email, subject, text, context))

    def _send(self, channel: str, send: Any) -> None:
        try:
            send()
        except Exception:  # a notification must never change the rollout's outcome
            log.exception("mlcanary: the %s notification about %s could not be sent", channel, self.event)


def _slack(conn_id: str, text: str, context: Context) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text).notify(context)


def _email(conn_id: str, to: list[str], from_email: str | None, subject: str, text: str, context: Context) -> None:
    from html import escape

    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    html = "<pre>" + escape(text) + "</pre>"
    SmtpNotifier(to=to, from_email=from_email, subject=subject, html_content=html, smtp_conn_id=conn_id).notify(context)
