#!/usr/bin/env bash
# One command to set up and run locally:  bash infra/local/dev.sh demo   |   bash infra/local/dev.sh test [pytest args]
# Creates .venv (Python 3.11 or 3.12), installs torch unless the venv already has one (here: the CPU build
# 2.13.0; on a GPU machine install your CUDA torch into .venv first), then this project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[test]'

# The browser test of `instaflow-batch report` runs Debian's Chromium: installed for `test` where apt-get can.
if [ "${1:-}" = test ] && ! command -v chromium >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && as_root="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$as_root" ]; }; then
    { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null; } \
      || echo "note: could not install Chromium; the report's browser test will say so" >&2
  else
    echo "note: the report's browser test needs Chromium (Debian: apt-get install chromium)" >&2
  fi
fi

# Local servers and Ray listen on 127.0.0.1 only; no model hub is ever needed.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
case "${1:-}" in
  demo) shift; exec .venv/bin/python -m jobs.demo "$@" ;;
  # Two test processes by default (pytest-xdist), a file each at a time (module fixtures start one Ray per file):
  # the tests keep about 1.4 of the 2 cores busy in one process. TEST_PROCESSES=0 runs them in this process.
  test) shift; exec .venv/bin/python -m pytest -q -n "${TEST_PROCESSES:-2}" --dist loadfile "$@" ;;
  *) echo "usage: bash infra/local/dev.sh {demo|test} [args]" >&2; exit 2 ;;
esac
