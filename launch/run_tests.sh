#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (what CI runs).
# Tests read the prepared TFDS copy in ../shared/tensorflow_datasets (see
# tests/conftest.py); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# Two workers, each taking whole test files (their module fixtures are
# built once per file).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
