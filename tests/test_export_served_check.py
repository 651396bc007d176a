"""Tests of export/served_check.py: an export against an evaluation.

The comparison with a stand-in server is in test_evaluation_served.py;
here a real export of a run's checkpoint is compared.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import REPO
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from export import served_check
from export_helpers import IMAGE_SHAPE
from export_helpers import WAYS
from export_helpers import run


@pytest.mark.slow
def test_export_serves_the_model_launch_evaluate_evaluates(tmp_path):
  # A run whose best checkpoint (step 3) and latest (step 5) hold two
  # different models, as after a training whose validation peaked early.
  config = training.make_config(
    {
      "data.example_shape": list(IMAGE_SHAPE),
      "data.queries": 3,
      "data.meta_batch_size": 2,
      "model.initial_t": 1.5,
    }
  )
  model_dir = tmp_path / "run"
  training.save_config(str(model_dir), config)
  models = {}
  for which, seed, step, directory in (
    ("best", 1, 3, model_dir / training.BEST_DIR),
    ("latest", 2, 5, model_dir),
  ):
    keras.utils.set_random_seed(seed)
    models[which] = training.build_model(config)
    checkpoint = training.make_checkpoint(
      models[which], step=tf.Variable(step, dtype=tf.int64)
    )
    tf.train.CheckpointManager(checkpoint, str(directory), 1).save(step)
  episodes = 4
  results = training.evaluate_run(
    str(model_dir),
    num_episodes=episodes,
    output=str(tmp_path / "evaluation.json"),
  )
  assert (results["which"], results["step"]) == ("best", 3)
  base = tmp_path / "exports"
  printed = run(
    [
      sys.executable,
      "-m",
      "export.export_model",
      f"--model_dir={model_dir}",
      f"--export_base={base}",
    ],
    REPO,
  ).stdout
  assert f"Exported {results['checkpoint']} (step 3)" in printed

  compared = served_check.compare(results["output"], str(base / "1"))
  assert (
    compared["export_checkpoint"]
    == compared["checkpoint"]
    == (results["checkpoint"])
  )
  # The reference: each model called eagerly on each fixed test episode.
  test_set = data.load_splits("omniglot").test
  classes = {
    which: np.stack(
      [
        np.argmax(
          model(
            {key: value[None] for key, value in episode.items()}, training=False
          )[0],
          axis=-1,
        )
        for episode in data.eval_episodes(
          test_set,
          ways=WAYS,
          shots=1,
          queries=3,
          seed=evaluation.TEST_SEED,
          num_episodes=episodes,
        )
      ]
    )
    for which, model in models.items()
  }
  np.testing.assert_array_equal(compared["served_classes"], classes["best"])
  np.testing.assert_array_equal(compared["evaluated_classes"], classes["best"])
  assert compared["disagreements"] == 0
  assert compared["served_accuracy"] == pytest.approx(
    results["accuracy"], abs=1e-12
  )
  # The latest model classifies these queries otherwise: serving it would
  # fail the comparison.
  assert np.any(classes["latest"] != classes["best"])
