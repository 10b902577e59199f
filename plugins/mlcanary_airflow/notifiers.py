"""Notifications: what a rollout did, and why, through Airflow's Slack-webhook and SMTP notifiers."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from airflow.configuration import conf
from airflow.sdk import Context
from airflow.sdk.bases.notifier import BaseNotifier

from mlcanary.escape import slack_text
from mlcanary.redact import redact
from mlcanary.spec import NotifyEvent, RolloutSpec
from mlcanary_airflow.hooks import _connection
from mlcanary_airflow.links import report_url

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

    The message names the model, the versions, the reason and a link to the run (or, for
    ``approval``, to the task waiting for a person). It is built from the task's context alone (its
    XCom and its exception), never from the warehouse: a rollback is announced when the warehouse is
    down too. A channel that fails is logged and does not fail the task.
    """

    def __init__(self, *, spec: dict[str, Any], event: Event) -> None:
        super().__init__()
        self.spec_data = spec
        self.event = event

    def message(self, context: Context) -> tuple[str, str]:
        """(subject, text) for this event, from the context."""
        spec = RolloutSpec.model_validate(self.spec_data)
        ti = context["ti"]
        started = ti.xcom_pull(task_ids="validate_and_lock") or {}
        canary = started.get("canary_version") or context["params"].get("candidate_version") or "?"
        what = f"{spec.model} {canary} (baseline {started.get('baseline_version', '?')})"
        run = run_link(context)
        report = report_url(context["dag"].dag_id, context["run_id"])
        error = context.get("exception")
        if self.event == "rollback":
            done = ti.xcom_pull(task_ids=ti.task_id) or {}
            subject = f"mlcanary: {what} rolled back"
            text = (
                f"{subject}: the canary is at 0 % (the router reports {done.get('split', '?')}).\n"
                f"Why: {done.get('reason', 'see the run')}\nReport: {report}\nRun: {run}"
            )
        elif self.event == "rollback_failed":
            subject = f"mlcanary: ROLLBACK FAILED for {what}"
            text = (
                f"{subject}: the canary may still receive traffic. Act now: check the router, then clear the "
                f"rollback task or run `mlcanary abort --rollout {started.get('rollout_id', '?')} --reason ...`.\n"
                f"What failed: {error or 'see the run'}\nReport: {report}\nRun: {run}"
            )
        elif self.event == "promote":
            subject = f"mlcanary: {what} promoted"
            why = ti.xcom_pull(task_ids=ti.task_id) or "-"
            text = (
                f"{subject}: {canary} serves 100 % and is the new baseline.\nWhy: {why}\nReport: {report}\nRun: {run}"
            )
        elif self.event == "promote_failed":
            subject = f"mlcanary: promotion of {what} failed"
            text = (
                f"{subject}: {error or 'see the run'}\n"
                f"The rollback task takes the canary back to 0 % unless it was promoted.\nReport: {report}\nRun: {run}"
            )
        else:  # approval
            task = context["task"]
            link = task.generate_link_to_ui(task_instance=context["task_instance"], base_url=base_url())
            subject = f"mlcanary: {what} waits for a decision"
            question = f"{getattr(task, 'subject', '')}\n{getattr(task, 'body', '') or ''}"
            text = f"{subject}: {question}\nRespond: {link}\nReport: {report}\nRun: {run}"
        return subject, text

    def notify(self, context: Context) -> None:
        spec = RolloutSpec.model_validate(self.spec_data)
        n = spec.notifications
        always = self.event in ("rollback_failed", "promote_failed")
        if not n.channels or not (always or self.event in n.events):
            return
        try:
            subject, text = self.message(context)
        except Exception as exc:  # a message that cannot be built must still go out, plainly
            log.exception("mlcanary: the message about %s could not be built", self.event)
            subject, text = f"mlcanary: {self.event} for {spec.model}", f"{self.event}: see {run_link(context)} ({exc})"
        send(spec, subject, text, context, self.event)


def run_link(context: Context) -> str:
    return f"{base_url()}/dags/{context['dag'].dag_id}/runs/{context['run_id']}"


def alert(spec: RolloutSpec, context: Context, status: str, problem: str, rollout_id: str) -> None:
    """Always sent, whatever the spec subscribes to: the model stays locked because its split is not safe."""
    subject = f"mlcanary: {status.upper().replace('_', ' ')} for {spec.model}"
    text = (
        f"{subject}: {problem}.\nThe model stays locked until the split is safe. Act now: check the router, "
        f"then run `mlcanary abort --rollout {rollout_id} --reason ...`.\n"
        f"Report: {report_url(context['dag'].dag_id, context['run_id'])}\nRun: {run_link(context)}"
    )
    send(spec, subject, text, context, status)


def send(spec: RolloutSpec, subject: str, text: str, context: Context, what: str) -> None:
    """``text`` to every channel of the spec; a channel that fails is logged, never raised."""
    n = spec.notifications
    for conn_id in (n.slack.conn_id if n.slack else None, n.email.conn_id if n.email else None):
        if conn_id:  # its secrets masked in the logs, should the provider's error quote them
            with contextlib.suppress(Exception):
                _connection(conn_id)
    subject, text = redact(subject), redact(text)
    if n.slack is not None:
        slack = n.slack.conn_id
        _guarded("Slack", what, lambda: _slack(slack, text, context))
    if n.email is not None:
        email = n.email
        _guarded("e-mail", what, lambda: _email(email.conn_id, email.to, email.from_email, subject, text, context))


def _guarded(channel: str, what: str, call: Any) -> None:
    try:
        call()
    except Exception:  # a notification must never change the rollout's outcome
        log.exception("mlcanary: the %s notification about %s could not be sent", channel, what)


def _slack(conn_id: str, text: str, context: Context) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=slack_text(text)).notify(context)


def _email(conn_id: str, to: list[str], from_email: str | None, subject: str, text: str, context: Context) -> None:
    from html import escape

    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    html = "<pre>" + escape(text) + "</pre>"
    SmtpNotifier(to=to, from_email=from_email, subject=subject, html_content=html, smtp_conn_id=conn_id).notify(context)
