"""docker-compose.yaml, validated offline: `docker-compose config` (nothing is pulled, built or started).

``make test`` provides a compose through scripts/fetch_compose.sh (Debian's ``docker-compose`` 1.29.2,
or ``docker compose`` if it is there). Without one the tests skip with the reason; under CI=true
they fail. The env file is .env.example (its placeholders) or a copy whose secrets are replaced by
random tokens, to follow each secret from .env into the services; the caller's environment is not
passed, since compose prefers it to the env file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

INFRA = ("postgres", "redis")
AIRFLOW = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
LONG_RUNNING = tuple(s for s in (*INFRA, *AIRFLOW) if s != "airflow-init")
# .env variable -> the container variable that carries it (in every Airflow service).
SECRETS = {
    "AIRFLOW_JWT_SECRET": "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY": "AIRFLOW__API__SECRET_KEY",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$|SQL_ALCHEMY_CONN|RESULT_BACKEND|AIRFLOW_CONN_|WAREHOUSE$")


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI must validate docker-compose.yaml for real")
    pytest.skip(message)


def _compose_command() -> list[str] | None:
    if found := shutil.which("docker-compose"):
        return [found]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


Compose = Callable[[Path, list[str]], subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    command = _compose_command()
    if command is None:
        _unavailable("no docker-compose and no `docker compose` (make test installs one: scripts/fetch_compose.sh)")
    assert command is not None
    home = tmp_path_factory.mktemp("compose-home")  # no ~/.docker of the caller's
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}

    def run(env_file: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def _env_lines() -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of .env.example with each change-me-... value replaced by a random token."""
    replaced = {name: secrets.token_urlsafe(24) for name, value in _env_lines() if value.startswith("change-me")}
    path = tmp_path_factory.mktemp("compose-env") / ".env"
    path.write_text("".join(f"{n}={replaced.get(n, v)}\n" for n, v in _env_lines()))
    return path, replaced


@pytest.fixture(scope="module")
def config(compose: Compose, tokens: tuple[Path, dict[str, str]]) -> dict[str, Any]:
    result = compose(tokens[0], ["config"])
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source, from short ("src:dst:rw") or long ({source, target}) volume entries."""
    found: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found[str(volume["target"])] = str(volume.get("source", ""))
        else:
            source, target = str(volume).split(":")[:2]
            found[target] = source
    return found


def _ports(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(published, target) pairs, from short ("8080:8080/tcp") or long ({published, target}) entries."""
    found: set[tuple[str, str]] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add((str(port.get("published")), str(port["target"])))
        else:
            published, _, target = str(port).split("/")[0].rpartition(":")
            found.add((published.rpartition(":")[2], target))
    return found


def test_config_with_env_example_is_valid(compose: Compose, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = compose(env_file, ["config", "-q"])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "WAREHOUSE_PASSWORD", *SECRETS, "AIRFLOW_ADMIN_PASSWORD"])
def test_a_missing_secret_stops_compose(compose: Compose, tmp_path: Path, missing: str) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{n}={v}\n" for n, v in _env_lines() if n != missing))
    result = compose(env_file, ["config", "-q"])
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stdout + result.stderr


def test_every_service_is_there_with_a_healthcheck(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(INFRA + AIRFLOW) <= set(services)
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
        assert services[name].get("restart") == "always", name


def test_depends_on_like_the_official_file(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in AIRFLOW:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def test_airflow_services_share_one_image_and_the_celery_executor(config: dict[str, Any]) -> None:
    services = config["services"]
    names = [n for n, s in services.items() if "AIRFLOW__CORE__EXECUTOR" in _environment(s)]
    assert set(names) >= set(AIRFLOW)
    airflow = [services[n] for n in names]
    assert {_environment(s)["AIRFLOW__CORE__EXECUTOR"] for s in airflow} == {"CeleryExecutor"}
    assert len({s.get("image") for s in airflow}) == 1
    assert len({json.dumps(s.get("build"), sort_keys=True) for s in airflow}) == 1
    build = airflow[0]["build"]
    assert Path(build["context"] if isinstance(build, dict) else build).resolve() == ROOT
    for service in airflow:
        env = _environment(service)
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://airflow:")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].endswith("@postgres/airflow")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres/airflow")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("simple_auth_manager.SimpleAuthManager")
        assert "fab" not in json.dumps(env).lower()


def test_the_image_has_the_celery_provider_with_a_working_celery() -> None:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = dict(line.lower().split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    assert "apache-airflow-providers-celery" in pins
    assert pins["celery[redis]"] == "5.6.3"  # 5.7.0 breaks the provider's import (3.26.0)
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert [line for line in dockerfile if line.startswith("FROM ")] == ["FROM apache/airflow:3.3.2"]
    assert any("pip install --no-cache-dir" in line and "-r /requirements.txt" in line for line in dockerfile)
    assert any("pip install --no-cache-dir --no-deps -e /opt/airflow" in line for line in dockerfile)


def test_dags_plugins_include_and_volumes_are_mounted(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in AIRFLOW:
        mounts = _mounts(services[name])
        for folder in ("dags", "plugins", "include"):
            assert Path(mounts[f"/opt/airflow/{folder}"]).resolve() == ROOT / folder, (name, folder)
        env = _environment(services[name])
        assert mounts[env["MLCANARY_SNAPSHOT_DIR"]] == "mlcanary-snapshots", name
        assert env["MLCANARY_SPEC_DIR"] == "/opt/airflow/include/rollouts"
    # The admin's password file: the API server and airflow-init only.
    auth = [n for n, s in services.items() if "/opt/airflow/auth" in _mounts(s)]
    assert sorted(auth) == ["airflow-apiserver", "airflow-init"]
    init = _mounts(services["postgres"])["/docker-entrypoint-initdb.d"]
    assert Path(init).resolve() == ROOT / "docker" / "postgres-init"
    assert (ROOT / "docker" / "postgres-init" / "10-warehouse.sh").stat().st_mode & 0o111


def test_the_api_server_port(config: dict[str, Any]) -> None:
    services = config["services"]
    assert _ports(services["airflow-apiserver"]) == {("8080", "8080")}
    assert not any(_ports(services[n]) for n in LONG_RUNNING if n != "airflow-apiserver")


def test_secrets_come_from_the_env_file(config: dict[str, Any], tokens: tuple[Path, dict[str, str]]) -> None:
    _, replaced = tokens
    assert set(replaced) == {"POSTGRES_PASSWORD", "WAREHOUSE_PASSWORD", *SECRETS, "AIRFLOW_ADMIN_PASSWORD"}
    services = config["services"]
    pg = _environment(services["postgres"])
    assert pg["POSTGRES_PASSWORD"] == replaced["POSTGRES_PASSWORD"]
    assert pg["WAREHOUSE_PASSWORD"] == replaced["WAREHOUSE_PASSWORD"]
    for name in AIRFLOW:
        env = _environment(services[name])
        for source, target in SECRETS.items():
            assert env[target] == replaced[source], (name, target)
        assert f"airflow:{replaced['POSTGRES_PASSWORD']}@postgres" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        warehouse = json.loads(env["AIRFLOW_CONN_MLCANARY_WAREHOUSE"])
        assert warehouse == {
            "conn_type": "postgres",
            "host": "postgres",
            "port": 5432,
            "schema": "warehouse",
            "login": "mlcanary",
            "password": replaced["WAREHOUSE_PASSWORD"],
        }
        url = f"postgresql://mlcanary:{replaced['WAREHOUSE_PASSWORD']}@postgres:5432/warehouse"
        assert env["MLCANARY_WAREHOUSE"] == url
    init = _environment(services["airflow-init"])
    assert init["_MLCANARY_ADMIN_PASSWORD"] == replaced["AIRFLOW_ADMIN_PASSWORD"]
    assert init["_AIRFLOW_DB_MIGRATE"] == "true"
    assert all("_MLCANARY_ADMIN_PASSWORD" not in _environment(services[n]) for n in AIRFLOW if n != "airflow-init")


def test_no_secret_literal_in_the_compose_file() -> None:
    """Every secret-like value in docker-compose.yaml is a ${VAR} reference; nothing came from .env.example."""
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    for value in [v for _, v in _env_lines() if v and not v.isdigit()]:
        assert value not in text  # no placeholder copied in as a default
    assert not re.search(r"\$\{[A-Z_]+:-change-me", text)
    found = 0
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # not the password file's path
                found += 1
                if key == "AIRFLOW__CORE__FERNET_KEY":  # optional, empty by default as in the official file
                    assert value == "${AIRFLOW_FERNET_KEY:-}", (name, key)
                    continue
                assert re.search(r"\$\{[A-Z_]+:\?[^}]*\}", value), f"{name}: {key} is not a required ${{VAR}}"
                assert "change-me" not in value, (name, key)
    assert found >= 10


def test_the_env_example_holds_only_placeholders_and_env_is_ignored() -> None:
    for name, value in _env_lines():
        if SECRET_NAME.search(name) and name != "AIRFLOW_FERNET_KEY":
            assert value.startswith("change-me-"), name
    assert "secrets.token_urlsafe(32)" in ENV_EXAMPLE.read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # the build context is only what it lists again
    assert not any(line.startswith("!.env") for line in ignored)


def test_the_init_script_is_valid_bash(config: dict[str, Any]) -> None:
    command = config["services"]["airflow-init"]["command"]
    assert command[0] == "-c"
    script = command[1].replace("$$", "$")  # config prints the compose form, with $ escaped
    assert "mlcanary init" in script and "/entrypoint airflow version" in script
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
