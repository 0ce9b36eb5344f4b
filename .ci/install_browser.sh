#!/usr/bin/env bash
# What tests/test_viewer_browser.py needs: Debian's Chromium and the playwright driver from PyPI
# (pointed at /usr/bin/chromium; no browser is downloaded). Idempotent and quiet.
# Usage: .ci/install_browser.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "playwright>=1.40"
fi
if ! "$PYTHON" -c "import bokeh, jinja2" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "bokeh>=3.4" "jinja2>=3.1"
fi
