#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned requirements, once.
# Run by main_job.sh, run_tests.sh and .ci/run; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip skips what is already installed at the pinned versions.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -r requirements.txt
