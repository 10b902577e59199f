#!/usr/bin/env bash
# Unpack Debian's prometheus package (prometheus + promtool) into .venv/prometheus for the tests.
# Nothing is installed system-wide. Without apt (not Debian), say so and leave it: the Prometheus
# tests then skip with that reason, or fail under CI=true.
set -euo pipefail
dest="${1:?usage: fetch_prometheus.sh DEST}"
if [ -x "$dest/usr/bin/prometheus" ] && [ -x "$dest/usr/bin/promtool" ]; then exit 0; fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "fetch_prometheus: no apt-get/dpkg-deb here; the Prometheus tests will skip (set MLCANARY_PROMETHEUS_BIN)" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
( cd "$work" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } )
mkdir -p "$dest"
dpkg-deb -x "$work"/prometheus_*.deb "$dest"
"$dest/usr/bin/prometheus" --version | head -1
