"""A router for KServe: ``canaryTrafficPercent`` of an InferenceService's predictor.

KServe sends ``canaryTrafficPercent`` of the traffic to the latest revision (the canary) and the rest
to the previously rolled-out one (the baseline). A split is one JSON merge patch:

- a stage: ``canaryTrafficPercent: p`` (and, with ``storage_uri``, the canary's ``storageUri``);
- promotion: the field removed (``null``), so the latest revision takes all traffic;
- rollback: ``canaryTrafficPercent: 0``.

The versions are kept in the annotations ``mlcanary.io/baseline-version`` and
``mlcanary.io/canary-version``, and the rollout that set them in ``mlcanary.io/rollout``, so the split
reads back whole, with its owner. An InferenceService mlcanary has not touched yet reads as its
current model's version serving alone (from ``storageUri``, with ``storage_uri``), and nothing is
patched before a rollout's first traffic step.
"""

from __future__ import annotations

from typing import Any

from mlcanary.routers.base import Split, TrafficShiftError, with_retries
from mlcanary.versions import VersionNames

GROUP, API_VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
BASELINE, CANARY = "mlcanary.io/baseline-version", "mlcanary.io/canary-version"
OWNER = "mlcanary.io/rollout"  # the rollout that set the split


def _transient(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)
    return status in (409, 429, 500, 502, 503, 504) or type(exc).__name__ in ("MaxRetryError", "ProtocolError")


class KServeRouter:
    def __init__(
        self,
        api: Any,  # kubernetes.client.CustomObjectsApi
        namespace: str,
        name: str,
        storage_uri: str | None = None,
        retries: int = 3,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.uris = VersionNames(storage_uri) if storage_uri else None
        self.retries = retries

    def _get(self) -> dict[str, Any]:
        return with_retries(
            lambda: self.api.get_namespaced_custom_object(GROUP, API_VERSION, self.namespace, PLURAL, self.name),
            self.retries,
            _transient,
            f"GET inferenceservice {self.namespace}/{self.name}",
        )

    def get_split(self, model: str) -> Split | None:
        isvc = self._get()
        annotations = isvc.get("metadata", {}).get("annotations") or {}
        predictor = isvc.get("spec", {}).get("predictor", {})
        baseline = annotations.get(BASELINE)
        if baseline is None and self.uris is not None:  # not rolled out by mlcanary yet: its model's version
            baseline = self.uris.version(predictor.get("model", {}).get("storageUri", ""))
        if baseline is None:
            return None
        canary = annotations.get(CANARY)
        owner = annotations.get(OWNER) or None
        if not canary:
            return Split(model, baseline, None, 0.0, owner)
        percent = predictor.get("canaryTrafficPercent")
        return Split(model, baseline, canary, 100.0 if percent is None else float(percent), owner)

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        canary = split.canary_version
        percent = split.canary_percent if canary else None
        if percent is not None and percent != int(percent):
            raise TrafficShiftError(f"KServe takes whole percentages, not {percent:g}")
        predictor: dict[str, Any] = {"canaryTrafficPercent": None if percent in (None, 100.0) else int(percent)}
        if self.uris is not None:
            predictor["model"] = {"storageUri": self.uris.name(canary or split.baseline_version)}
        patch = {
            "metadata": {"annotations": {BASELINE: split.baseline_version, CANARY: canary, OWNER: rollout_id}},
            "spec": {"predictor": predictor},
        }
        with_retries(  # the client sends custom-object patches as application/merge-patch+json
            lambda: self.api.patch_namespaced_custom_object(
                GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
                self.name,
                patch,
            ),
            self.retries,
            _transient,
            f"PATCH inferenceservice {self.namespace}/{self.name}",
        )
