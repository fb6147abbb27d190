#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements; re-runs only install what changed.
# Usage: scripts/setup.sh [--dev]   (--dev adds the test tools and Debian's chromium for browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements.txt "$requirements" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing Python packages from $requirements (first time: a few minutes)…" >&2
  .venv/bin/python -m pip install -q -r "$requirements"
  touch "$stamp"
fi
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=$(command -v sudo || true)
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "installing Debian's chromium for the browser tests…" >&2
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-dejavu-core >/dev/null \
      || echo "warning: could not install chromium; browser tests will skip" >&2
  else
    echo "warning: chromium is missing and cannot be installed without root; browser tests will skip" >&2
  fi
fi
