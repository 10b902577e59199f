#!/usr/bin/env bash
# Debian's chromium at /usr/bin/chromium, for the browser tests (tests/test_ui_browser.py), which drive
# it with Playwright's Python client. Never a browser downloaded by Playwright (no `playwright install`).
# Without apt (not Debian), say so and leave it: the browser tests then skip with that reason, or fail
# under CI=true.
set -euo pipefail
browser=/usr/bin/chromium
if [ -x "$browser" ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "fetch_chromium: no apt-get here; the browser tests will skip (install chromium at $browser)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "fetch_chromium: not root and no sudo; the browser tests will skip (install chromium at $browser)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing (a slim image) or stale: update once and retry.
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
  || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
"$browser" --version
