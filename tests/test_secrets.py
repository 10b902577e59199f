"""Secrets stay out of sight: planted in every kind of connection, searched for in the audit tables,
the XComs, the logs, the messages and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import base_spec
from local_servers import Service, serve, traffic_service
from mlcanary.cli import main
from mlcanary.redact import MASK, redact, register
from mlcanary.warehouse.schema import metadata
from rollout_runner import MODEL, run_rollout

HMAC = "hmac-shared-ROUTERSECRET"
PLANTED = {
    "router url password": "ROUTERPASS-1f3a",
    "router url token": "ROUTERTOKEN-9b2c",
    "prometheus url password": "PROMPASS-77de",
    "prometheus url token": "PROMTOKEN-5e1a",
    "prometheus bearer": "PROMBEARER-c0ffee",
    "slack webhook token": "SLACKTOKEN-b33f",
    "smtp password": "SMTPPASS-4242",
    "router hmac": HMAC,
}


def test_redact_masks_what_looks_like_a_credential() -> None:
    register("a-registered-connection-password")
    cases = {
        "GET https://u:p4ss@host/x failed": "GET https://***@host/x failed",
        "POST http://host/split?model=m&token=abc123&x=1": "POST http://host/split?model=m&token=***&x=1",
        "url http://h/?access_token=zz;api_key=yy&sig=ss": "url http://h/?access_token=***;api_key=***&sig=***",
        "header Authorization: Bearer eyJhbGciOi.J9": "header Authorization: Bearer ***",
        "https://hooks.slack.com/services/T00/B00/XXXX said 404": "https://hooks.slack.com/services/*** said 404",
        "login with a-registered-connection-password": f"login with {MASK}",
        "ctr fell 0.25 -> 0.14 (n=577), region=key-west": "ctr fell 0.25 -> 0.14 (n=577), region=key-west",
    }
    for text, shown in cases.items():
        assert redact(text) == shown


def _texts_of_every_table(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return "\n".join(repr(row) for table in metadata.sorted_tables for row in conn.execute(sa.select(table)).all())


def _xcoms(dag_id: str) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return "\n".join(repr(x.value) for x in session.query(XComModel).filter(XComModel.dag_id == dag_id))


def test_planted_secrets_appear_nowhere(
    airflow_db: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rollout whose router's first POSTs fail (503), whose Prometheus is unreachable (every poll
    an error naming its URL, so the guardrails fail closed), and whose Slack and SMTP channels get
    the rollback's message: every text it leaves is searched for each planted secret."""
    p = PLANTED
    seen_by_router: list[str] = []
    posts = {"n": 0}
    honest = traffic_service(HMAC)

    def router(service: Service, request: Any) -> Any:
        seen_by_router.append(request.path)
        if request.method == "POST" and posts["n"] < 2:
            posts["n"] += 1
            return 503, {"error": f"busy, retry (you sent {request.path})"}  # a service echoing the URL
        return honest(service, request)

    with serve(router) as routing, serve(lambda s, r: (200, None)) as slack:
        routing.state["splits"] = {
            MODEL: {"model": MODEL, "baseline_version": "v1", "canary_version": None, "canary_percent": 0.0}
        }
        host = routing.url.removeprefix("http://")
        connections = {
            "SECRET_ROUTER": {
                "conn_type": "http",
                "password": HMAC,
                "extra": {
                    "url": f"http://router:{p['router url password']}@{host}/split?token={p['router url token']}",
                    "allow_http": True,
                },
            },
            "SECRET_PROM": {
                "conn_type": "http",
                "extra": {
                    "url": f"http://prom:{p['prometheus url password']}@127.0.0.1:9/"
                    f"?access_token={p['prometheus url token']}",
                    "headers": {"Authorization": f"Bearer {p['prometheus bearer']}"},
                },
            },
            "SLACK_SECRET": {
                "conn_type": "slackwebhook",
                "password": f"{slack.url}/hook?token={p['slack webhook token']}",
            },
            "SMTP_SECRET": {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": 9,
                "login": "mailer",
                "password": p["smtp password"],
            },
        }
        for name, conn in connections.items():
            monkeypatch.setenv(f"AIRFLOW_CONN_{name}", json.dumps(conn))
        queries = {"requests": "sum(r)", "failures": "sum(f)", "p99_latency_ms": "p", "cpu": "c", "memory": "m"}
        out = run_rollout(
            tmp_path,
            monkeypatch,
            router={"kind": "webhook", "conn_id": "secret_router", "retries": 1, "timeout": "5s"},
            guardrails={
                **base_spec()["guardrails"],
                "error_limit": 2,
                "source": {"kind": "prometheus", "conn_id": "secret_prom", "queries": queries, "timeout": "2s"},
            },
            notifications={
                "slack": {"conn_id": "slack_secret"},
                "email": {"conn_id": "smtp_secret", "to": ["oncall@example.com"]},
            },
            retries={"traffic": 2, "rollback": 2, "delay": "1s"},
        )
        sent = [r.body.decode() for r in slack.requests]
    assert out.rollout is not None and out.rollout.status == "rolled_back", out.rollout
    assert out.rollout.reason.startswith("guardrails stage 1 error: metric source error 2 of 2 in a row")
    assert posts["n"] == 2 and any(p["router url token"] in path for path in seen_by_router)  # it was really used
    engine = sa.create_engine(f"sqlite:///{tmp_path}/warehouse.db")
    tables = _texts_of_every_table(engine)
    assert "Prometheus at http://***@127.0.0.1:9/?access_token=***" in tables  # the errors are there, masked
    capfd_out = capfd.readouterr()
    assert (
        main(["report", "--warehouse", f"sqlite:///{tmp_path}/warehouse.db", "--rollout", out.rollout.rollout_id]) == 0
    )
    report = capfd.readouterr().out
    assert "metric source error" in report
    places = {
        "audit tables": tables,
        "XComs": _xcoms(f"rollout__{base_spec()['name']}"),
        "logs": capfd_out.out + capfd_out.err + caplog.text,
        "Slack messages": "\n".join(sent),
        "report": report,
    }
    assert sent and "rolled back" in sent[0]
    for where, text in places.items():
        for what, secret in p.items():
            assert secret not in text, f"the {what} leaked into the {where}"


@pytest.mark.parametrize("kind", ["warehouse", "mlflow", "aws", "kubernetes"])
def test_a_failing_client_of_every_other_connection_kind_leaks_nothing(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other connection kinds, each failing against a closed port: the error, as mlcanary would
    record or log it, names no secret (the hooks register them with the masker and redact)."""
    from mlcanary.spec import parse_spec
    from mlcanary_airflow import hooks

    secret = f"{kind.upper()}-PLANTED-SECRET-8d1f"
    data = base_spec()
    if kind == "warehouse":
        monkeypatch.setenv(
            "AIRFLOW_CONN_SECRET_WH",
            json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": f"postgresql://u:{secret}@127.0.0.1:9/x"}}),
        )
        data["warehouse"] = {"conn_id": "secret_wh"}

        def call() -> None:
            with hooks.WarehouseHook("secret_wh").get_engine().connect():
                pass
    elif kind == "mlflow":
        monkeypatch.setenv(
            "AIRFLOW_CONN_SECRET_MLFLOW",
            json.dumps({"conn_type": "http", "extra": {"tracking_uri": "http://127.0.0.1:9", "token": secret}}),
        )
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

        def call() -> None:
            hooks.mlflow_client("secret_mlflow").get_registered_model("m")
    elif kind == "aws":
        monkeypatch.setenv(
            "AIRFLOW_CONN_SECRET_AWS",
            json.dumps(
                {
                    "conn_type": "aws",
                    "login": "AKIAPLANTED",
                    "password": secret,
                    "extra": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"},
                }
            ),
        )
        data["router"] = {"kind": "sagemaker", "conn_id": "secret_aws", "endpoint_name": "e", "retries": 0}

        def call() -> None:
            hooks.router_for(parse_spec(data)).get_split("m")
    else:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SECRET_KUBE",
            json.dumps({"conn_type": "kubernetes", "host": "http://127.0.0.1:9", "password": secret}),
        )
        data["router"] = {"kind": "kserve", "conn_id": "secret_kube", "inference_service": "r", "retries": 0}

        def call() -> None:
            hooks.router_for(parse_spec(data)).get_split("m")

    with pytest.raises(Exception) as failed:
        call()
    text = f"{failed.value!r} {failed.value}"
    assert secret not in redact(text)  # what any reason, note or message would hold
    assert redact(f"x {secret} y") == f"x {MASK} y"  # registered by the hook for the masker too
