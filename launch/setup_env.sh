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
# comln_tf itself, editable: the venv's python imports this clone's
# library from any folder (the README's API snippet as a file, say).
if ! .venv/bin/python -m pip show --quiet comln_tf >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --no-deps --no-build-isolation --editable .
fi
