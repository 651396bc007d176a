"""Helpers of the evaluation tests: a run to evaluate, direct accuracies."""

import re

import keras
import numpy as np
import tensorflow as tf

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training

# The step of the checkpoint of `make_run_dir`.
STEP = 7


def make_run_dir(model_dir):
  """Makes `model_dir` a run: config.json and a latest checkpoint at STEP.

  The run is 5-way 1-shot with 3 queries a class. The weights are the
  initial ones: the tests check the evaluation protocol, not training.

  Returns:
    `model_dir`.
  """
  config = training.make_config(
    {
      "data.ways": 5,
      "data.shots": 1,
      "data.queries": 3,
      "data.meta_batch_size": 4,
      "data.example_shape": [28, 28, 1],
    }
  )
  training.save_config(str(model_dir), config)
  keras.utils.set_random_seed(0)
  checkpoint = training.make_checkpoint(
    training.build_model(config), step=tf.Variable(STEP, dtype=tf.int64)
  )
  tf.train.CheckpointManager(checkpoint, str(model_dir), 1).save(STEP)
  return model_dir


def run_episodes(class_set, num_episodes, *, shots=1, **options):
  """The test episodes an evaluation of `make_run_dir`'s run draws.

  5-way, 3 queries a class, the standard test seed; `options` go to
  `data.eval_episodes` (e.g. rotate_classes=True).
  """
  return data.eval_episodes(
    class_set,
    ways=5,
    shots=shots,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=num_episodes,
    **options,
  )


def direct_predictions(model, episodes):
  """(accuracies, classes, margins) of each episode: one eager call per
  episode, numpy argmax and sort of its logits."""
  accuracies, classes, margins = [], [], []
  for episode in episodes.as_numpy_iterator():
    logits = model({key: value[None] for key, value in episode.items()})
    logits = logits.numpy()[0]
    classes.append(np.argmax(logits, axis=-1))
    accuracies.append(np.mean(classes[-1] == episode["query_labels"]))
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margins.append(top2[:, 1] - top2[:, 0])
  return np.array(accuracies), np.stack(classes), np.stack(margins)


def direct_accuracies(model, episodes):
  """Per-episode accuracy of `direct_predictions`."""
  return direct_predictions(model, episodes)[0]


def direct_summary(run_dir, episodes):
  """`evaluation.summarize` of `direct_accuracies` of the run's model."""
  model, _ = training.restore_model(str(run_dir))
  return evaluation.summarize(direct_accuracies(model, episodes))


def progress_lines(text, what):
  """(done, total, accuracy %) of each progress line of `what` in `text`."""
  return [
    (int(done), int(total), float(accuracy))
    for done, total, accuracy in re.findall(
      rf"{what}: (\d+)/(\d+) episodes \(\d+%\), accuracy so far "
      r"([\d.]+)%",
      text,
    )
  ]
