#!/usr/bin/env python3
"""Refuse an API port that Airflow itself needs (``make ui`` runs this before starting anything).

``airflow standalone`` also starts the worker's and the triggerer's log servers, on the ports of
``[logging] worker_log_server_port`` (8793) and ``[logging] trigger_log_server_port`` (8794). An API
server on one of them fails late and obscurely; this names the clash at once, e.g.
``port 8793 is Airflow's worker log server port ([logging] worker_log_server_port); choose another
AIRFLOW__API__PORT``. Exit code 0 when the port is fine, 2 when it is refused.

Usage: ``check_ui_port.py [PORT]`` (default: ``$AIRFLOW__API__PORT``, else ``[api] port``).
"""

from __future__ import annotations

import os
import sys

LOG_SERVERS = {  # option: (what uses it, Airflow's default)
    "worker_log_server_port": ("worker log server", 8793),
    "trigger_log_server_port": ("triggerer log server", 8794),
}


def reserved_ports() -> dict[int, str]:
    """Airflow's own ports as this Airflow home configures them (its defaults before the venv has
    Airflow): port → what uses it."""
    try:
        from airflow.configuration import conf
    except ImportError:
        conf = None
    ports = {}
    for option, (what, default) in LOG_SERVERS.items():
        port = default if conf is None else conf.getint("logging", option, fallback=default)
        ports[port] = f"Airflow's {what} port ([logging] {option})"
    return ports


def problem(port_text: str, reserved: dict[int, str]) -> str | None:
    """Why ``port_text`` cannot be the API server's port, or None."""
    try:
        port = int(port_text)
    except ValueError:
        return f"AIRFLOW__API__PORT={port_text!r} is not a port number"
    if not 0 < port < 65536:
        return f"port {port} is not a TCP port (1 to 65535)"
    if port in reserved:
        return f"port {port} is {reserved[port]}"
    return None


def main(argv: list[str]) -> int:
    port_text = argv[0] if argv else os.environ.get("AIRFLOW__API__PORT") or "8080"
    why = problem(port_text.strip(), reserved_ports())
    if why is not None:
        print(f"make ui: {why}; choose another AIRFLOW__API__PORT", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
