"""Routers against their platforms: a local traffic service (webhook), moto (SageMaker) and a stand-in
of the Kubernetes API server (KServe), through the rollout lifecycle and through Airflow connections."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from conftest import base_spec
from local_servers import Service, kube_api, serve, traffic_service
from mlcanary import rollout as lifecycle
from mlcanary.lifecycle import Status
from mlcanary.routers.base import Split, TrafficShiftError
from mlcanary.routers.kserve import BASELINE, CANARY
from mlcanary.routers.webhook import WebhookRouter
from mlcanary.spec import RolloutSpec, parse_spec
from mlcanary.warehouse.schema import traffic_history
from mlcanary_airflow.hooks import router_for

SECRET = "s3cret-hmac-key"


def _spec(**router: object) -> RolloutSpec:
    return parse_spec(base_spec(router=router))


def _history(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.select(traffic_history).order_by(traffic_history.c.id)).all()


# --- webhook -------------------------------------------------------------------------------------


@pytest.fixture
def traffic() -> Iterator[Service]:
    with serve(traffic_service(SECRET)) as service:
        yield service


def test_webhook_round_trip_is_signed_and_idempotent(
    traffic: Service, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_ROUTER",
        json.dumps({"conn_type": "http", "extra": {"url": traffic.url}, "password": SECRET}),
    )
    spec = _spec(kind="webhook", retries=2)
    with pytest.raises(ValueError, match=r"without TLS; use https, or set the extra \"allow_http\": true"):
        router_for(spec)  # traffic changes in the clear only when the connection says so
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLCANARY_ROUTER",
        json.dumps({"conn_type": "http", "extra": {"url": traffic.url, "allow_http": True}, "password": SECRET}),
    )
    router = router_for(spec)
    assert isinstance(router, WebhookRouter) and router.get_split(spec.model) is None
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2", "v1")
    assert [q.method for q in traffic.requests] == ["GET", "GET"]  # the start reads, it never writes
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    lifecycle.shift_to_stage(engine, router, spec, r, 1)  # an Airflow retry of the same step: no new POST
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 10.0)
    assert router.get_split(spec.model).owner == "dag/run"  # the service echoes who set it
    posts = [q for q in traffic.requests if q.method == "POST"]
    assert len(posts) == 1 and traffic.state["applied"] == 1
    assert posts[0].json() == {
        "model": spec.model,
        "baseline_version": "v1",
        "canary_version": "v2",
        "canary_percent": 10.0,
        "rollout_id": "dag/run",
    }
    assert posts[0].headers["X-Mlcanary-Signature"].startswith("sha256=")
    lifecycle.promote(engine, router, r, "ok")
    assert router.get_split(spec.model) == Split(spec.model, "v2", None, 0.0)


def test_webhook_retries_transient_errors_with_backoff(traffic: Service) -> None:
    router = WebhookRouter(traffic.url, SECRET, timeout=2, retries=3)
    traffic.fail_next = [503, 502]
    started = time.monotonic()
    router.set_split(Split("m", "v1", "v2", 25.0), "r")
    assert time.monotonic() - started >= 1.4  # waited 0.5 s, then 1 s
    assert len(traffic.requests) == 3 and traffic.state["applied"] == 1
    # the retried POSTs carried the same Idempotency-Key: the service could drop repeats
    assert len({q.headers["Idempotency-Key"] for q in traffic.requests}) == 1
    traffic.fail_next = [503] * 4
    with pytest.raises(TrafficShiftError, match=r"POST .* failed after 4 attempts"):
        router.set_split(Split("m", "v1", "v2", 50.0), "r")


def test_webhook_refuses_a_wrong_secret_without_retrying(traffic: Service) -> None:
    router = WebhookRouter(traffic.url, "not-the-secret", retries=3)
    with pytest.raises(TrafficShiftError, match="HTTP 401"):
        router.set_split(Split("m", "v1", "v2", 25.0), "r")
    assert len(traffic.requests) == 1


def test_an_unreachable_platform_leaves_the_failure_recorded(engine: sa.Engine, spec: RolloutSpec) -> None:
    with serve(traffic_service(SECRET)) as service:
        router = WebhookRouter(service.url, SECRET, timeout=1, retries=1)
        r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2", "v1")
    with pytest.raises(TrafficShiftError):  # the server is gone now
        lifecycle.shift_to_stage(engine, router, spec, r, 1)
    failed = _history(engine)[-1]
    assert not failed.applied and failed.to_percent is None  # unknown, and said so
    assert failed.note.startswith("FAILED stage 1: canary to 10 %")
    assert "the split could not be read" in failed.note


# --- SageMaker -----------------------------------------------------------------------------------


def test_signed_answers_are_checked_so_a_forged_read_back_is_not_trusted(traffic: Service) -> None:
    """The service signs its answers; a man in the middle that rewrites the read-back (the canary
    "at 0 %") cannot sign it, and the router refuses the answer instead of believing it."""
    router = WebhookRouter(traffic.url, SECRET, retries=0, verify_answers=True)
    router.set_split(Split("m", "v1", "v2", 20.0), "r")
    assert router.get_split("m") == Split("m", "v1", "v2", 20.0, "r")
    forged = {"model": "m", "baseline_version": "v1", "canary_version": "v2", "canary_percent": 0.0, "rollout_id": "r"}
    with serve(lambda service, request: (200, forged)) as impostor:  # answers, but cannot sign
        with pytest.raises(TrafficShiftError, match="carries no valid signature, or an old one: not trusted"):
            WebhookRouter(impostor.url, SECRET, retries=0, verify_answers=True).get_split("m")
        assert WebhookRouter(impostor.url, SECRET, retries=0).get_split("m").canary_percent == 0.0  # unverified
    with pytest.raises(ValueError, match="signed answers need the shared secret"):
        WebhookRouter(traffic.url, None, verify_answers=True)


@pytest.fixture
def sagemaker(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An endpoint with a variant per version (v1 serving everything), in moto's mock of AWS."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {"conn_type": "aws", "login": "AKIAEXAMPLE", "password": "secret", "extra": {"region_name": "eu-west-1"}}
        ),
    )
    with mock_aws():
        client = boto3.client("sagemaker", region_name="eu-west-1")
        variants = []
        for version, weight in (("v1", 1.0), ("v2", 0.0), ("v3", 0.0)):
            client.create_model(
                ModelName=f"ranker-{version}",
                ExecutionRoleArn="arn:aws:iam::123456789012:role/sagemaker",
                PrimaryContainer={"Image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ranker:latest"},
            )
            variants.append(
                {
                    "VariantName": f"ranker-{version}",
                    "ModelName": f"ranker-{version}",
                    "InitialInstanceCount": 1,
                    "InstanceType": "ml.m5.large",
                    "InitialVariantWeight": weight,
                }
            )
        client.create_endpoint_config(EndpointConfigName="ranker-config", ProductionVariants=variants)
        client.create_endpoint(EndpointName="ranker", EndpointConfigName="ranker-config")
        yield client


def _weights(client: object) -> dict[str, float]:
    variants = client.describe_endpoint(EndpointName="ranker")["ProductionVariants"]  # type: ignore[attr-defined]
    return {v["VariantName"]: float(v.get("CurrentWeight") or 0.0) for v in variants}


def test_sagemaker_weights_follow_the_rollout(sagemaker: object, engine: sa.Engine) -> None:
    spec = _spec(kind="sagemaker", endpoint_name="ranker", variant_name="ranker-{version}")
    router = router_for(spec)  # credentials and region from the Airflow connection
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2")
    assert r.baseline_version == "v1"  # read from the endpoint
    lifecycle.shift_to_stage(engine, router, spec, r, 2)
    assert _weights(sagemaker) == {"ranker-v1": 70.0, "ranker-v2": 30.0, "ranker-v3": 0.0}
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 30.0)
    lifecycle.promote(engine, router, r, "ok")
    assert _weights(sagemaker) == {"ranker-v1": 0.0, "ranker-v2": 100.0, "ranker-v3": 0.0}
    assert router.get_split(spec.model) == Split(spec.model, "v2", None, 0.0)
    notes = [h.note for h in _history(engine)]
    assert notes[-1].endswith("(already in force)")  # the platform has no roles: 100 % is already the new baseline


def test_sagemaker_rollback_and_a_missing_variant(sagemaker: object, engine: sa.Engine) -> None:
    spec = _spec(kind="sagemaker", endpoint_name="ranker", variant_name="ranker-{version}")
    router = router_for(spec)
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v3")
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    lifecycle.rollback(engine, router, r, "p99 breach")
    assert _weights(sagemaker) == {"ranker-v1": 100.0, "ranker-v2": 0.0, "ranker-v3": 0.0}
    with pytest.raises(TrafficShiftError, match="has no variant ranker-v9"):
        router.set_split(Split(spec.model, "v1", "v9", 10.0), "r")


# --- KServe --------------------------------------------------------------------------------------

ISVC = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/ranker"


@pytest.fixture
def kserve(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Service, dict]]:
    objects = {
        ISVC: {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "ranker", "namespace": "ml"},
            "spec": {
                "predictor": {"model": {"modelFormat": {"name": "xgboost"}, "storageUri": "s3://models/ranker/v1"}}
            },
        }
    }
    with serve(kube_api(objects, token="kube-token")) as service:
        monkeypatch.setenv(
            "AIRFLOW_CONN_KUBERNETES_DEFAULT",
            json.dumps({"conn_type": "generic", "host": service.url, "password": "kube-token"}),
        )
        yield service, objects


def test_kserve_canary_percent_promotion_and_rollback(kserve: tuple[Service, dict], engine: sa.Engine) -> None:
    service, objects = kserve
    spec = _spec(kind="kserve", namespace="ml", inference_service="ranker", storage_uri="s3://models/ranker/{version}")
    router = router_for(spec)
    assert router.get_split(spec.model) == Split(spec.model, "v1", None, 0.0)  # from the storageUri
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2")
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    predictor = objects[ISVC]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10 and predictor["model"]["storageUri"] == "s3://models/ranker/v2"
    assert objects[ISVC]["metadata"]["annotations"][CANARY] == "v2"
    patches = [q for q in service.requests if q.method == "PATCH"]
    assert all(q.headers["Content-Type"] == "application/merge-patch+json" for q in patches)
    lifecycle.promote(engine, router, r, "ok")
    predictor = objects[ISVC]["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor  # promotion removes the field: the latest revision takes all
    assert objects[ISVC]["metadata"]["annotations"] == {BASELINE: "v2", "mlcanary.io/rollout": "dag/run"}
    assert router.get_split(spec.model) == Split(spec.model, "v2", None, 0.0)
    assert lifecycle.finish(engine, router, r).released
    r3 = lifecycle.begin_rollout(engine, router, spec, "dag/run-3", "v3")
    lifecycle.shift_to_stage(engine, router, spec, r3, 2)
    lifecycle.rollback(engine, router, r3, "analysis FAIL")
    assert objects[ISVC]["spec"]["predictor"]["canaryTrafficPercent"] == 0  # rollback sets 0
    assert router.get_split(spec.model) == Split(spec.model, "v2", "v3", 0.0)


def test_kserve_refuses_fractions_and_reports_auth_errors(
    kserve: tuple[Service, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _ = kserve
    spec = _spec(kind="kserve", namespace="ml", inference_service="ranker")
    with pytest.raises(TrafficShiftError, match="whole percentages"):
        router_for(spec).set_split(Split(spec.model, "v1", "v2", 12.5), "r")
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "generic", "host": service.url, "password": "wrong"}),
    )
    with pytest.raises(TrafficShiftError, match="Unauthorized"):
        router_for(spec).get_split(spec.model)


# --- ownership: each platform's split is changed only by the rollout that set it ------------------


def test_webhook_steps_are_compare_and_set_on_the_owner(traffic: Service, engine: sa.Engine) -> None:
    spec = _spec(kind="webhook")
    router = WebhookRouter(traffic.url, SECRET, timeout=2, retries=1)
    router.set_split(Split(spec.model, "v1", None, 0.0), None)
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2")
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    router.set_split(Split(spec.model, "v1", "v2", 50.0), "rollout__other/run")  # another run took it over
    posts = len([q for q in traffic.requests if q.method == "POST"])
    with pytest.raises(lifecycle.StepRefused, match=r"v1 50 %, v2 50 % \(set by rollout__other/run\)"):
        lifecycle.shift_to_stage(engine, router, spec, r, 2)
    with pytest.raises(lifecycle.StepRefused, match="which this rollout did not set"):
        lifecycle.rollback(engine, router, r, "breach")
    assert len([q for q in traffic.requests if q.method == "POST"]) == posts  # nothing was written
    assert router.get_split(spec.model) == Split(spec.model, "v1", "v2", 50.0)


def test_sagemaker_records_the_owner_in_a_tag_and_respects_it(sagemaker: object, engine: sa.Engine) -> None:
    spec = _spec(kind="sagemaker", endpoint_name="ranker", variant_name="ranker-{version}")
    router = router_for(spec)
    r = lifecycle.begin_rollout(engine, router, spec, "rollout__unit_ranker/manual__2026-12-01T10:00:00+00:00", "v2")
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    assert router.get_split(spec.model).owner == r.rollout_id
    router.set_split(Split(spec.model, "v1", "v2", 50.0), "rollout__other/run")
    with pytest.raises(lifecycle.StepRefused, match="which this rollout did not set"):
        lifecycle.shift_to_stage(engine, router, spec, r, 2)
    assert _weights(sagemaker) == {"ranker-v1": 50.0, "ranker-v2": 50.0, "ranker-v3": 0.0}


def test_kserve_deploys_nothing_before_stage_1_and_checks_the_typed_baseline(
    kserve: tuple[Service, dict], engine: sa.Engine
) -> None:
    """The first rollout of an InferenceService mlcanary never touched: its storageUri names the
    serving version; a baseline typed wrong is refused, and the start patches nothing."""
    service, objects = kserve
    spec = _spec(kind="kserve", namespace="ml", inference_service="ranker", storage_uri="s3://models/ranker/{version}")
    router = router_for(spec)
    with pytest.raises(lifecycle.RolloutError, match="baseline v0 was asked for, but the router reports v1 serving"):
        lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2", "v0")
    r = lifecycle.begin_rollout(engine, router, spec, "dag/run", "v2", "v1")
    assert [q.method for q in service.requests if q.method == "PATCH"] == []  # nothing deployed by the start
    assert objects[ISVC]["spec"]["predictor"]["model"]["storageUri"] == "s3://models/ranker/v1"
    lifecycle.shift_to_stage(engine, router, spec, r, 1)
    assert objects[ISVC]["metadata"]["annotations"]["mlcanary.io/rollout"] == "dag/run"
    objects[ISVC]["metadata"]["annotations"]["mlcanary.io/rollout"] = "someone-else"  # edited by hand
    with pytest.raises(lifecycle.StepRefused, match="which this rollout did not set"):
        lifecycle.shift_to_stage(engine, router, spec, r, 2)
    assert objects[ISVC]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    with engine.connect() as conn:
        assert lifecycle.get_rollout(conn, "dag/run").status is Status.RUNNING
