"""A real Airflow for the tests that need one: scheduler, DAG processor, triggerer and API server as
separate processes (LocalExecutor), on free loopback ports, with an Airflow home and a metadata
database of their own. Each component runs in a process group of its own; ``stop`` ends every one.

``executor="celery"`` runs the distributed topology instead: the CeleryExecutor with a Redis broker,
and a ``celery worker`` as a fifth component (its metadata database must then be PostgreSQL, which
is also Celery's result backend); the worker's and the triggerer's log servers get free ports.

Used where ``dag.test()`` cannot do what an operator does: clear a task of a finished run, mark a
run failed or success from the REST API while a task waits, delete a DAG, kill a task's process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from conftest import ROOT

BIN = Path(sys.executable).parent
COMPONENTS = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--port", "{port}"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}
# ``airflow celery worker``: it forks its pool, whose task processes run in process groups of their own
CELERY_WORKER = "celery-worker"

# What a component's log ends with when Airflow 3.3 crashed on a DAG deleted under it (see _check_alive).
KNOWN_CRASHES = {
    "scheduler": "ObjectDeletedError",
    "dag-processor": "UPDATE statement on table 'dag' expected to update",  # StaleDataError
}


def _kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each process still alive (psutil checks it is the same process, not a reused pid)."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(processes, timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class AirflowStack:
    def __init__(
        self,
        home: Path,
        spec_dir: Path,
        extra_env: dict[str, str],
        credentials: tuple[str, str] | None = None,
        *,
        executor: str = "local",
        broker_url: str | None = None,
        worker_concurrency: int = 4,
    ) -> None:
        """``credentials`` (user, password): log in with them (``POST /auth/token``), for a stack whose
        ``extra_env`` turns off the simple auth manager's all-admins mode; without, ``GET /auth/token``.

        ``executor="celery"``: the CeleryExecutor on ``broker_url`` (Redis), with a ``celery worker``
        of ``worker_concurrency`` slots; ``extra_env`` must set a PostgreSQL
        ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` (Celery's result backend is the same database)."""
        if executor not in ("local", "celery"):
            raise ValueError(f"executor must be local or celery, not {executor!r}")
        self.home, self.spec_dir = home, spec_dir
        self.executor = executor
        self.credentials = credentials
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLCANARY"))},
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "6",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex * 2,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "MLCANARY_SPEC_DIR": str(spec_dir),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            **extra_env,
        }
        self.components = dict(COMPONENTS)
        if executor == "celery":
            self._celery(extra_env, broker_url, worker_concurrency)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = dict.fromkeys(KNOWN_CRASHES, 0)  # restarts after Airflow's deleted-DAG crashes
        self.down: set[str] = set()  # components killed on purpose (kill, restart): not a crash
        self.client: httpx.Client | None = None

    def _celery(self, extra_env: dict[str, str], broker_url: str | None, concurrency: int) -> None:
        """The CeleryExecutor's settings and the ``celery worker`` component."""
        metadata = extra_env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
        if not metadata.startswith("postgresql") or not broker_url:
            raise ValueError("executor='celery' needs a PostgreSQL metadata database and a broker_url")
        self.broker_url = broker_url
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
                "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,  # the same in every process
                # the worker's and the triggerer's log servers: free ports, never Airflow's 8793/8794
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                **{k: v for k, v in extra_env.items() if k.startswith("AIRFLOW__CELERY")},
            }
        )
        self.components[CELERY_WORKER] = ["celery", "worker", "--without-mingle", "--without-gossip"]

    # --- life --------------------------------------------------------------------------------

    def start(self, timeout: float = 240) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=self.env, check=True, capture_output=True)
        for name in self.components:
            self._launch(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=3).json()
                if all(
                    health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "triggerer")
                ):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"Airflow did not come up in {timeout:.0f} s: see the logs in {self.home}")
        if CELERY_WORKER in self.components:
            self.wait_worker(max(30.0, deadline - time.monotonic()))
        self.client = httpx.Client(
            base_url=f"{self.url}/api/v2", headers={"Authorization": f"Bearer {self.token()}"}, timeout=30
        )

    def token(self) -> str:
        """A new JWT for the REST API: the all-admins one, or the one of ``credentials``."""
        if self.credentials is None:
            response = httpx.get(f"{self.url}/auth/token", timeout=10)
        else:
            username, password = self.credentials
            response = httpx.post(
                f"{self.url}/auth/token", json={"username": username, "password": password}, timeout=10
            )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def _launch(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [str(BIN / "airflow"), *(a.format(port=self.port) for a in self.components[name])],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: stop() ends it with its children
        )

    def _check_alive(self) -> None:
        for name, proc in list(self.procs.items()):
            if name in self.down:
                continue
            if proc.poll() is not None:
                tail = (self.home / f"{name}.log").read_text(errors="replace")[-3000:]
                crash = KNOWN_CRASHES.get(name)
                if crash is not None and crash in tail and self.restarts[name] < 2:
                    # Airflow 3.3 races with a DAG deleted through the REST API (the watchdog test does):
                    # the scheduler dies on the deleted run it is scheduling, the DAG processor on the
                    # deleted DAG row it is updating. A supervisor restarts them in a deployment, and so
                    # does this stack (twice each at most).
                    print(f"\nairflow {name} died on a deleted DAG ({crash}, exit {proc.returncode}): restarted")
                    self.restarts[name] += 1
                    self._launch(name)
                    continue
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        # Airflow 3.3 runs each task in a process group of its own (its supervisor's setpgid): found
        # now, as children of the components, so that none outlives the stack.
        descendants = [p for name in self.procs for p in self._descendants(name)]
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        _kill_all(descendants)
        if self.client is not None:
            self.client.close()

    # --- faults: one component killed, restarted -------------------------------------------------

    def _descendants(self, name: str) -> list[psutil.Process]:
        """Every process of the component: its process group, and the children of the group in
        groups of their own (tasks), however deep."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return []
        found: dict[int, psutil.Process] = {}
        for member in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(member.pid) == proc.pid:
                    found[member.pid] = member
        for member in list(found.values()):
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in member.children(recursive=True)})
        return list(found.values())

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack now (each component's group and its tasks' processes)."""
        return [p for name in list(self.procs) for p in self._descendants(name)]

    def rss(self) -> int:
        """The resident memory of every process of the stack, in bytes."""
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Send ``sig`` to the component's process group, and SIGKILL to the processes it forked
        into groups of their own (the tasks a worker runs): as if its machine went away. Waits
        until all of them are gone (SIGKILL after ``timeout``)."""
        proc = self.procs[name]
        tree = self._descendants(name)
        self.down.add(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            _kill_all(tree)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _kill_all(tree)  # a graceful stop left none of them; a hard one none either

    def restart(self, name: str, sig: int = signal.SIGKILL) -> float:
        """Kill the component (:meth:`kill`) and start it again; returns when it was started (time.time())."""
        self.kill(name, sig)
        started = time.time()
        self._launch(name)
        self.down.discard(name)
        return started

    def wait_healthy(self, name: str, since: float, timeout: float = 120) -> None:
        """Until the component (scheduler, triggerer, dag-processor) heartbeats after ``since`` (time.time())."""
        key = name.replace("-", "_")

        def beating() -> bool:
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json().get(key, {})
            except (httpx.HTTPError, ValueError):
                return False
            beat = health.get(f"latest_{key}_heartbeat")
            if health.get("status") != "healthy" or not beat:
                return False
            return datetime.fromisoformat(beat).timestamp() > since

        self.wait_for(f"airflow {name} to heartbeat again", beating, timeout)

    def workers(self) -> list[str]:
        """The Celery workers that answer a ping on the broker."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            return [name for reply in app.control.ping(timeout=1.0) for name in reply]
        finally:
            app.close()

    def wait_worker(self, timeout: float = 120) -> None:
        self.wait_for("the celery worker to answer a ping", self.workers, timeout, every=0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.home.glob("*.log"))

    # --- the REST API ------------------------------------------------------------------------

    @property
    def api(self) -> httpx.Client:
        assert self.client is not None, "start() first"
        return self.client

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.api.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 120, every: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            found = check()
            if found:
                return found
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        def parsed() -> bool:
            response = self.api.get(f"/dags/{dag_id}")
            return response.status_code == 200 and not response.json().get("is_paused")

        self.wait_for(f"DAG {dag_id}", parsed, timeout)

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        return str(
            self.call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]
        )

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        response = self.api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        return None if response.status_code == 404 else str(response.json()["state"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        return str(
            self.wait_for(
                f"run {dag_id}/{run_id} to end",
                lambda: (s := self.run_state(dag_id, run_id)) in ("success", "failed") and s,
                timeout,
            )
        )

    def tasks(self, dag_id: str, run_id: str) -> dict[str, Any]:
        found = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {ti["task_id"]: ti for ti in found["task_instances"]}

    def states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {task: ti["state"] for task, ti in self.tasks(dag_id, run_id).items()}

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states: tuple[str, ...], timeout: float = 180) -> dict:
        def reached() -> dict | None:
            ti = self.tasks(dag_id, run_id).get(task_id)
            return ti if ti and ti["state"] in states else None

        try:
            return dict(self.wait_for(f"{task_id} to be {'/'.join(states)}", reached, timeout))
        except AssertionError as exc:  # say where the run is instead
            raise AssertionError(f"{exc}; the run's tasks: {self.states(dag_id, run_id)}") from None

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        found = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}")
        return json.dumps(found.get("content"))
