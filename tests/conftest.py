"""Shared test set-up: offline TFDS data, quiet TensorFlow, float64 helpers."""

import os
import pathlib

# Tests never download: TFDS reads the prepared copy beside the project
# (../shared/tensorflow_datasets), unless the caller already chose a data dir.
_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "tensorflow_datasets"
os.environ.setdefault("TFDS_DATA_DIR", str(_SHARED_TFDS))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import cli_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def processes(tmp_path):
  """Subprocesses started by a test; all killed when it ends."""
  started = cli_helpers.Processes(tmp_path)
  yield started
  started.kill_all()
