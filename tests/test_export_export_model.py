"""Tests of export/export_model.py, the export's command line."""

import json
import os
import re
import sys

import keras
import pytest
import tensorflow as tf

from cli_helpers import REPO
from comln_tf import training
from export import saved_model
from export import session
from export_helpers import IMAGE_SHAPE
from export_helpers import assert_outputs
from export_helpers import keras_logits
from export_helpers import random_task
from export_helpers import run
from export_helpers import serve


def test_a_damaged_config_json_is_one_line_for_export_model(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  path = model_dir / "config.json"
  path.write_text('{"data": {"ways": 5,')
  result = run(
    [
      sys.executable,
      "-m",
      "export.export_model",
      f"--model_dir={model_dir}",
      f"--export_base={tmp_path / 'exports'}",
    ],
    REPO,
    succeed=False,
  )
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.search(
    f"^export_model: {re.escape(str(path))} is not valid JSON \\(Expecting",
    result.stderr,
    re.MULTILINE,
  ), result.stderr[-3000:]
  assert not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_export_model_cli(tmp_path):
  config = training.make_config(
    {
      "data.example_shape": list(IMAGE_SHAPE),
      "model.tie_init_rows": True,
      "model.initial_t": 1.5,
    }
  )
  keras.utils.set_random_seed(1)
  model = training.build_model(config)
  model_dir = tmp_path / "run"
  training.save_config(str(model_dir), config)
  # Saved as training saves it.
  training.make_checkpoint(model, step=tf.Variable(7, dtype=tf.int64)).save(
    str(model_dir / "ckpt")
  )
  base = tmp_path / "exports"
  command = [
    sys.executable,
    "-m",
    "export.export_model",
    f"--model_dir={model_dir}",
    f"--export_base={base}",
  ]
  run(command, REPO)
  export_dir = str(base / "1")
  with open(
    os.path.join(export_dir, "assets.extra", saved_model.METADATA_FILE)
  ) as f:
    info = json.load(f)
  assert info["step"] == 7 and info["ways"] == 5 and info["tie_init_rows"]
  assert info["t_final"] == pytest.approx(1.5)
  support, labels, query = random_task(3, 2, 4)
  # Here the served graph and eager Keras agree to the solve's accuracy
  # (default rtol = atol = 1e-5), not to rounding: rounding may tip a step
  # size decision differently in the two executions.
  assert_outputs(
    serve(
      session.SessionModel(export_dir),
      "serving_default",
      support_images=support,
      support_labels=labels,
      query_images=query,
    ),
    keras_logits(model, support, labels, query),
    atol=2e-4,
  )
  # No best checkpoint (the run never validated): a clear error, no export.
  failed = run(command + ["--checkpoint=best"], REPO, succeed=False)
  assert "No best checkpoint" in failed.stderr
  assert os.listdir(base) == ["1"]
