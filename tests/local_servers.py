"""Local stand-ins of the services routers and notifiers talk to, on free loopback ports.

Each records what it received, so a test asserts on the requests a real service would have seen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Request:
    method: str
    path: str
    headers: Message  # case-insensitive, as HTTP headers are
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Service:
    """What a stand-in knows: its received requests, and answers to fail with first (e.g. 503s)."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # status codes to answer the next requests with
    state: dict[str, Any] = field(default_factory=dict)


@contextmanager
def serve(handle: Any) -> Iterator[Service]:
    """Serve ``handle(service, request) -> (status, body dict | bytes | None[, headers])`` until the block ends."""
    service = Service()

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(self.command, self.path, self.headers, self.rfile.read(length))
            service.requests.append(request)
            if service.fail_next:
                status, body = service.fail_next.pop(0), {"error": "injected failure"}
            else:
                status, body, *more = handle(service, request)
            payload = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in (more[0] if more else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_PUT = _any

        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()


def traffic_service(secret: str) -> Any:
    """The webhook protocol of :mod:`mlcanary.routers.webhook`, as a traffic service would implement it:
    signatures checked (of the body, or of a GET's query string), splits stored per model, a repeated
    Idempotency-Key applied once, and every answer signed the same way."""

    def mac(timestamp: str, content: bytes) -> str:
        return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + content, hashlib.sha256).hexdigest()

    def signed(status: int, body: dict) -> tuple[int, bytes, dict[str, str]]:
        payload, now = json.dumps(body).encode(), str(int(time.time()))
        return status, payload, {"X-Mlcanary-Timestamp": now, "X-Mlcanary-Signature": mac(now, payload)}

    def handle(service: Service, request: Request) -> tuple[int, bytes, dict[str, str]]:
        timestamp = request.headers.get("X-Mlcanary-Timestamp", "")
        query = urlparse(request.path).query.encode()
        expected = mac(timestamp, request.body if request.method != "GET" else query)
        if not hmac.compare_digest(request.headers.get("X-Mlcanary-Signature", ""), expected):
            return signed(401, {"error": "bad signature"})
        splits: dict[str, dict] = service.state.setdefault("splits", {})
        if request.method == "GET":
            model = parse_qs(urlparse(request.path).query)["model"][0]
            return signed(200, splits[model]) if model in splits else signed(404, {"error": "unknown model"})
        seen: set[str] = service.state.setdefault("keys", set())
        key = request.headers["Idempotency-Key"]
        if key not in seen:
            seen.add(key)
            body = request.json()
            splits[body["model"]] = body
            service.state["applied"] = service.state.get("applied", 0) + 1
        return signed(200, {"ok": True})

    return handle


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: what the Kubernetes API server does with application/merge-patch+json."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def kube_api(objects: dict[str, dict], token: str) -> Any:
    """GET and PATCH of custom objects by path, as the API server answers them (no controller runs)."""

    def handle(service: Service, request: Request) -> tuple[int, dict | None]:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return 401, {"kind": "Status", "message": "Unauthorized", "code": 401}
        path = urlparse(request.path).path
        if path not in objects:
            return 404, {"kind": "Status", "message": f"{path} not found", "code": 404}
        if request.method == "PATCH":
            if request.headers.get("Content-Type") != "application/merge-patch+json":
                return 415, {"kind": "Status", "message": "unsupported patch type", "code": 415}
            objects[path] = merge_patch(objects[path], request.json())
        return 200, objects[path]

    return handle


class TcpProxy:
    """A TCP forwarder on a loopback port: ``stop()`` closes the port and cuts every open connection
    (the database is gone: connection refused), ``start()`` listens on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import socket

        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._server: Any = None
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        import socket

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: Any) -> None:
        import socket

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with suppress(OSError):
                    s.close()

    def stop(self) -> None:
        import socket

        if self._server is not None:
            with suppress(OSError):  # wakes the thread blocked in accept(), which close() alone does not
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                s.close()
