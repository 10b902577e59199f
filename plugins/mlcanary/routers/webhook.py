"""A router for your own traffic service, over HTTP: POST the split as JSON, GET it back.

Protocol (the README's *Routers* section):

- ``POST <url>`` with ``{"model", "baseline_version", "canary_version", "canary_percent", "rollout_id"}``
  applies the split; any 2xx is success. The ``Idempotency-Key`` header is the same for every retry
  of the same split, so the service can drop repeats.
- ``GET <url>?model=<model>`` returns the split in force in the same shape, ``rollout_id`` included
  (404: none yet). mlcanary changes only a split whose ``rollout_id`` says it set it (its first step
  may start from the baseline serving alone), so a service that drops ``rollout_id`` stops every
  rollout after its first step.
- Every request carries ``X-Mlcanary-Timestamp`` (Unix seconds) and ``X-Mlcanary-Signature:
  sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>.<body>"`` under the shared secret (the body is
  empty for GET), so the service can reject forged or replayed requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from mlcanary.routers.base import Split, TrafficShiftError, with_retries


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``: what the service recomputes to verify."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class _Retryable(Exception):
    """A 5xx or 429 answer: worth another attempt."""


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


class WebhookRouter:
    def __init__(self, url: str, secret: str | None, timeout: float = 10.0, retries: int = 3) -> None:
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.retries = retries

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "mlcanary"}
        if self.secret:
            timestamp = str(int(time.time()))
            headers |= {
                "X-Mlcanary-Timestamp": timestamp,
                "X-Mlcanary-Signature": signature(self.secret, timestamp, body),
            }
        return headers

    def _send(
        self, method: str, body: bytes = b"", params: dict[str, str] | None = None, **extra: str
    ) -> httpx.Response:
        def attempt() -> httpx.Response:
            response = httpx.request(
                method,
                self.url,
                content=body or None,
                params=params,
                headers=self._headers(body) | extra,
                timeout=self.timeout,
            )
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
            return response

        return with_retries(attempt, self.retries, _transient, f"{method} {self.url}")

    def get_split(self, model: str) -> Split | None:
        response = self._send("GET", params={"model": model})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise TrafficShiftError(f"GET {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            data: dict[str, Any] = response.json()
            return Split(
                data.get("model", model),
                str(data["baseline_version"]),
                data.get("canary_version") or None,
                float(data.get("canary_percent") or 0.0),
                data.get("rollout_id") or None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise TrafficShiftError(f"GET {self.url} returned no split: {response.text[:200]!r} ({exc})") from None

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        payload = {
            "model": split.model,
            "baseline_version": split.baseline_version,
            "canary_version": split.canary_version,
            "canary_percent": split.canary_percent,
            "rollout_id": rollout_id,
        }
        body = json.dumps(payload, sort_keys=True).encode()
        key = hashlib.sha256(body).hexdigest()
        response = self._send("POST", body, **{"Idempotency-Key": key})
        if not response.is_success:
            raise TrafficShiftError(f"POST {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
