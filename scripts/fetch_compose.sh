#!/usr/bin/env bash
# A docker-compose for tests/test_compose.py, which validates docker-compose.yaml offline
# (`docker-compose config`: nothing is pulled, built or started). Uses `docker-compose` (v1) or
# `docker compose` (v2) if either is there; else installs Debian's `docker-compose` package (1.29.2 on
# bookworm, a Python program on the system python3, so it is installed, not unpacked into .venv).
# Without apt (not Debian), say so and leave it: the compose test then skips with that reason, or
# fails under CI=true.
set -euo pipefail
if command -v docker-compose >/dev/null; then docker-compose version --short; exit 0; fi
if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  docker compose version --short
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "fetch_compose: no apt-get here; the compose test will skip (install docker-compose or docker compose)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "fetch_compose: not root and no sudo; the compose test will skip (install docker-compose)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: it recommends docker.io, which would clash with a Docker installed otherwise.
# The package lists may be missing (a slim image) or stale: update once and retry.
$sudo apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
  || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }
docker-compose version --short
