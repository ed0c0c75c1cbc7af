#!/usr/bin/env bash
# Fresh-machine test run: make a venv, install ernie45 with its test extras (torch pinned to the CPU
# wheel), install Chromium for the chat-page test when apt is available, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the chat-page browser test will skip"
fi
exec .venv/bin/python -m pytest -q "$@"
