"""Hooks: Airflow connection ids in, clients of the core library out. Credentials stay in connections."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy.engine import Engine

from mlcanary.redact import redact, register
from mlcanary.routers.base import Router
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.routers.webhook import WebhookRouter
from mlcanary.sources import MetricSource, source_for
from mlcanary.spec import RolloutSpec
from mlcanary.warehouse.engine import make_engine

log = logging.getLogger(__name__)


class WarehouseHook(BaseHook):
    """Resolves a connection to a SQLAlchemy URL.

    The connection's extra ``sqlalchemy_url`` wins (any dialect: DuckDB, Trino, ...); otherwise the
    connection type's own database hook builds the URL (``sqlite``, ``postgres``, ...). Credentials
    stay in the connection, never in a spec.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "mlcanary_warehouse"
    conn_type = "generic"
    hook_name = "mlcanary warehouse"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id

    def get_url(self) -> str:
        conn = _hide(self.get_connection(self.conn_id))
        url = conn.extra_dejson.get("sqlalchemy_url")
        if url:
            return str(url)
        return conn.get_hook().get_uri()

    def get_engine(self) -> Engine:
        return make_engine(self.get_url())


def metric_source(spec: RolloutSpec) -> MetricSource:
    """The guardrail source the spec names, with its connection resolved.

    Prometheus: the URL is the connection's extra ``url``, or host (which may carry the scheme),
    port and schema; login and password give basic auth; the extra ``headers`` (a mapping) is sent
    with every query, e.g. ``{"Authorization": "Bearer ..."}``.
    """
    engine = WarehouseHook(spec.warehouse.conn_id).get_engine()
    if spec.guardrails.source.kind != "prometheus":
        return source_for(spec, engine)
    conn = _connection(spec.guardrails.source.prometheus_conn_id)
    auth = (conn.login, conn.password or "") if conn.login else None
    return source_for(spec, engine, _url(conn), auth, dict(conn.extra_dejson.get("headers") or {}))


def router_for(spec: RolloutSpec) -> Router:
    """The spec's traffic router, with its platform's client built from the router's connection.

    - ``warehouse``: the routing table, through the warehouse connection (or ``router.conn_id``);
    - ``webhook``: URL from the connection's extra ``url`` or host/port/schema, HMAC secret = password;
    - ``sagemaker``: a boto3 client from an ``aws`` connection (login/password = access key, extra
      ``region_name``, ``endpoint_url``, ``aws_session_token``), or boto3's own credential chain
      when the connection does not exist;
    - ``kserve``: a Kubernetes client from the connection: extra ``kube_config_path`` (and
      ``context``), or ``in_cluster: true``, or the API server's URL as host with a bearer token as
      password (extra ``verify_ssl``, ``ssl_ca_cert``).

    The platform clients are imported here, at run time: parsing a DAG imports none of them.
    """
    r = spec.router
    conn_id = spec.router_conn_id
    if r.kind == "warehouse":
        return WarehouseRouter(WarehouseHook(conn_id).get_engine())
    if r.kind == "webhook":
        conn = _connection(conn_id)
        url = _url(conn)
        if urlsplit(url).scheme != "https" and not conn.extra_dejson.get("allow_http"):
            raise ValueError(
                f"connection {conn_id!r}: the webhook router sends traffic changes to {redact(url)} without TLS; "
                'use https, or set the extra "allow_http": true (a private network, a test)'
            )
        signed = bool(conn.extra_dejson.get("signed_answers"))
        return WebhookRouter(url, conn.password or None, r.timeout.total_seconds(), r.retries, signed)
    if r.kind == "sagemaker":
        from mlcanary.routers.sagemaker import SageMakerRouter

        return SageMakerRouter(
            _aws_client(conn_id, "sagemaker", r.timeout.total_seconds()),
            r.endpoint_name,
            r.variant_name,
            r.retries,
            r.settle.total_seconds(),
        )
    from mlcanary.routers.kserve import KServeRouter

    return KServeRouter(
        _kubernetes_api(conn_id, r.timeout.total_seconds()), r.namespace, r.inference_service, r.storage_uri, r.retries
    )


_SECRET_EXTRAS = ("token", "password", "secret", "api_key", "aws_session_token", "aws_secret_access_key")


def _hide(conn: Any) -> Any:
    """Register the connection's secrets with Airflow's log masker and with :mod:`mlcanary.redact`
    (audit rows, notes, messages): the password, token-like extras, header values, and the password
    and token parameters of its URLs."""
    from airflow.sdk.log import mask_secret

    extra = conn.extra_dejson
    found = [conn.password]
    found += [extra.get(k) for k in _SECRET_EXTRAS]
    found += [str(v) for v in dict(extra.get("headers") or {}).values()]
    for url in (extra.get("url"), extra.get("tracking_uri"), extra.get("sqlalchemy_url"), conn.host):
        if url:
            parsed = urlsplit(str(url))
            found += [parsed.password]
            found += [v for k, v in parse_qsl(parsed.query) if redact(f"?{k}=x") != f"?{k}=x"]
    for secret in (s for s in found if s):
        mask_secret(str(secret))
        register(secret)
    return conn


def _connection(conn_id: str) -> Any:
    return _hide(BaseHook.get_connection(conn_id))


def _url(conn: Any) -> str:
    url = conn.extra_dejson.get("url")
    if url:
        return str(url)
    if not conn.host:
        raise ValueError(f"connection {conn.conn_id!r} has no host and no extra 'url'")
    host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
    return f"{host}:{conn.port}" if conn.port else host


def _aws_client(conn_id: str, service: str, timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    try:
        conn = _connection(conn_id)
    except AirflowNotFoundException:
        log.info("no connection %r: boto3's own credential chain is used", conn_id)
        session, extra = boto3.session.Session(), {}
    else:
        extra = conn.extra_dejson
        session = boto3.session.Session(
            aws_access_key_id=conn.login or None,
            aws_secret_access_key=conn.password or None,
            aws_session_token=extra.get("aws_session_token"),
            region_name=extra.get("region_name"),
        )
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    return session.client(service, endpoint_url=extra.get("endpoint_url"), config=config)


def _kubernetes_api(conn_id: str, timeout: float) -> Any:
    from kubernetes import client, config

    conn = _connection(conn_id)
    extra = conn.extra_dejson
    if extra.get("in_cluster"):
        config.load_incluster_config()
        api_client = client.ApiClient()
    elif extra.get("kube_config_path"):
        api_client = config.new_client_from_config(config_file=extra["kube_config_path"], context=extra.get("context"))
    else:
        configuration = client.Configuration()
        configuration.host = _url(conn)
        if conn.password:
            configuration.api_key = {"authorization": f"Bearer {conn.password}"}
        configuration.verify_ssl = bool(extra.get("verify_ssl", True))
        configuration.ssl_ca_cert = extra.get("ssl_ca_cert")
        api_client = client.ApiClient(configuration)
    api_client.rest_client.pool_manager.connection_pool_kw["timeout"] = timeout
    return client.CustomObjectsApi(api_client)


def mlflow_client(conn_id: str) -> Any:
    """An ``MlflowClient`` for the connection's tracking URI (extra ``tracking_uri``, else its URL);
    login/password or the extra ``token`` become MLflow's own credential variables."""
    import os

    from mlflow import MlflowClient

    conn = _connection(conn_id)
    extra = conn.extra_dejson
    uri = extra.get("tracking_uri") or _url(conn)
    if conn.login:
        os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password or ""
    if extra.get("token"):
        os.environ["MLFLOW_TRACKING_TOKEN"] = str(extra["token"])
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
