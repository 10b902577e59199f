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
  sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>.<body>"`` under the shared secret (for a GET,
  of ``"<timestamp>.<query string>"`` as sent), so the service can reject forged or replayed requests.
- With ``verify_answers`` (the connection's extra ``signed_answers: true``) every answer must carry
  the same two headers over its own body, no more than 5 minutes old: the read-back that confirms a
  step is then as authenticated as the step.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from mlcanary.redact import redact
from mlcanary.routers.base import Split, TrafficShiftError, with_retries


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``: what the service recomputes to verify."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


ANSWER_MAX_AGE_S = 300


def _said(response: httpx.Response) -> str:
    """``HTTP <status>: <the answer's start>``, with anything like a credential masked (a service may echo the URL)."""
    return redact(f"HTTP {response.status_code}: {response.text[:200]!r}")


class _Retryable(Exception):
    """A 5xx or 429 answer: worth another attempt."""


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


class WebhookRouter:
    def __init__(
        self, url: str, secret: str | None, timeout: float = 10.0, retries: int = 3, verify_answers: bool = False
    ) -> None:
        if verify_answers and not secret:
            raise ValueError("signed answers need the shared secret (the connection's password)")
        self.verify_answers = verify_answers
        self.url = url
        self.shown = redact(url)  # for messages: never a credential in a reason, a note or a log
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

    def _check_answer(self, response: httpx.Response) -> None:
        """The answer's signature, when the service signs its answers: a forged read-back is an error."""
        if not self.verify_answers or not self.secret:
            return
        timestamp = response.headers.get("X-Mlcanary-Timestamp", "")
        expected = signature(self.secret, timestamp, response.content)
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= ANSWER_MAX_AGE_S
        if not (fresh and hmac.compare_digest(response.headers.get("X-Mlcanary-Signature", ""), expected)):
            raise TrafficShiftError(
                f"{response.request.method} {self.shown}: the answer (HTTP {response.status_code}) carries no valid "
                "signature, or an old one: not trusted"
            )

    def _send(
        self, method: str, body: bytes = b"", params: dict[str, str] | None = None, **extra: str
    ) -> httpx.Response:
        target = httpx.URL(self.url).copy_merge_params(params or {})
        signed = body if method != "GET" else target.query  # a GET's query string, exactly as sent

        def attempt() -> httpx.Response:
            response = httpx.request(
                method,
                target,
                content=body or None,
                headers=self._headers(signed) | extra,
                timeout=self.timeout,
            )
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(_said(response))
            self._check_answer(response)
            return response

        return with_retries(attempt, self.retries, _transient, f"{method} {self.shown}")

    def get_split(self, model: str) -> Split | None:
        response = self._send("GET", params={"model": model})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise TrafficShiftError(f"GET {self.shown} answered {_said(response)}")
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
            raise TrafficShiftError(f"GET {self.shown} returned no split: {_said(response)} ({exc})") from None

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
            raise TrafficShiftError(f"POST {self.shown} answered {_said(response)}")
