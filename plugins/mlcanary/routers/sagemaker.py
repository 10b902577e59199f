"""A router for SageMaker: the production-variant weights of one endpoint, one variant per version.

The endpoint and its variants exist (one per model version, named by ``variant_name``); a split
sets the canary's weight to its percentage, the baseline's to the rest, and every other variant's to 0
(``UpdateEndpointWeightsAndCapacities``), then waits for the endpoint to be ``InService`` again and
reads the weights back. The rollout that set the split is the endpoint's tag ``mlcanary:rollout``,
written before the weights (so a step killed in between is still its own on the retry).
"""

from __future__ import annotations

import time
from typing import Any

from mlcanary.routers.base import Split, TrafficShiftError, with_retries
from mlcanary.versions import VersionNames

OWNER_TAG = "mlcanary:rollout"
_TRANSIENT_CODES = {"ThrottlingException", "ValidationException", "InternalFailure", "ServiceUnavailable"}


def _transient(exc: BaseException) -> bool:
    """Throttling, an endpoint still updating (a ValidationException), network trouble."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    return code in _TRANSIENT_CODES or type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError")


class SageMakerRouter:
    def __init__(
        self,
        client: Any,  # boto3.client("sagemaker")
        endpoint_name: str,
        variant_name: str = "{version}",
        retries: int = 3,
        settle_seconds: float = 300.0,
        poll_seconds: float = 5.0,
    ) -> None:
        self.client = client
        self.endpoint = endpoint_name
        self.names = VersionNames(variant_name)
        self.retries = retries
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds

    def _describe(self) -> dict[str, Any]:
        return with_retries(
            lambda: self.client.describe_endpoint(EndpointName=self.endpoint),
            self.retries,
            _transient,
            f"DescribeEndpoint {self.endpoint}",
        )

    def _settled(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.settle_seconds
        while True:
            endpoint = self._describe()
            status = endpoint.get("EndpointStatus")
            if status == "InService":
                return endpoint
            if status in ("Failed", "OutOfService", "Deleting") or time.monotonic() > deadline:
                raise TrafficShiftError(
                    f"endpoint {self.endpoint} is {status} ({endpoint.get('FailureReason', 'no reason given')})"
                )
            time.sleep(self.poll_seconds)

    def _owner(self, arn: str) -> str | None:
        tags = with_retries(
            lambda: self.client.list_tags(ResourceArn=arn).get("Tags", []),
            self.retries,
            _transient,
            f"ListTags {self.endpoint}",
        )
        owners = [t["Value"] for t in tags if t["Key"] == OWNER_TAG]
        return owners[-1] if owners and owners[-1] else None  # AWS keeps one value per key; moto appends

    def get_split(self, model: str) -> Split | None:
        weights: dict[str, float] = {}
        endpoint = self._settled()
        for variant in endpoint.get("ProductionVariants", []):
            version = self.names.version(variant["VariantName"])
            current = variant.get("CurrentWeight")
            weight = float(variant.get("DesiredWeight") or 0.0) if current is None else float(current)
            if version is not None and weight > 0:
                weights[version] = weight
        total = sum(weights.values())
        if not total:
            return None
        ranked = sorted(weights, key=lambda v: (-weights[v], v))  # the heavier variant is the baseline
        if len(ranked) > 2:
            raise TrafficShiftError(f"endpoint {self.endpoint} sends traffic to {len(ranked)} variants: {weights}")
        canary = ranked[1] if len(ranked) == 2 else None
        owner = self._owner(endpoint["EndpointArn"])
        return Split(model, ranked[0], canary, 100.0 * weights[canary] / total if canary else 0.0, owner)

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        endpoint = self._settled()
        variants = [v["VariantName"] for v in endpoint.get("ProductionVariants", [])]
        wanted = {self.names.name(v) for v in (split.baseline_version, split.canary_version) if v}
        if missing := wanted - set(variants):
            raise TrafficShiftError(
                f"endpoint {self.endpoint} has no variant {', '.join(sorted(missing))} (it has {', '.join(variants)})"
            )
        with_retries(
            lambda: self.client.add_tags(
                ResourceArn=endpoint["EndpointArn"], Tags=[{"Key": OWNER_TAG, "Value": rollout_id or ""}]
            ),
            self.retries,
            _transient,
            f"AddTags {self.endpoint}",
        )
        desired = []
        for name in variants:
            version = self.names.version(name)
            desired.append({"VariantName": name, "DesiredWeight": split.share(version) if version else 0.0})
        with_retries(
            lambda: self.client.update_endpoint_weights_and_capacities(
                EndpointName=self.endpoint, DesiredWeightsAndCapacities=desired
            ),
            self.retries,
            _transient,
            f"UpdateEndpointWeightsAndCapacities {self.endpoint}",
        )
        self._settled()
