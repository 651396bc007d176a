"""Few-shot evaluation: accuracy over fixed episodes, with a 95% interval.

The test protocol of the paper: mean query accuracy over 1,000 test
episodes and its 95% confidence interval 1.96 * std / sqrt(n). The episodes
come from `comln_tf.data.eval_episodes` with a fixed seed, so every run on
every machine is evaluated on the same episodes.
"""

import json
import math
import os

import numpy as np
import tensorflow as tf

from comln_tf import data

# Seeds of the fixed evaluation episodes (any fixed values would do; they
# differ so that validation and test draws are unrelated).
TEST_SEED = 2022
VALIDATION_SEED = 1


def accuracy_function(model):
  """A compiled function: meta-batch of episodes -> accuracy per episode.

  Args:
    model: a COMLN.

  Returns:
    tf.function taking an episode dict with a task axis (see
    `comln_tf.data.meta_batches`) and returning float64 [B], the fraction
    of each episode's queries classified correctly. The adaptation uses
    the plain solve (`training=False`).
  """

  @tf.function(reduce_retracing=True)
  def accuracies(episodes):
    logits = model(episodes, training=False)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    correct = tf.equal(predictions, tf.cast(episodes["query_labels"],
                                            tf.int32))
    return tf.reduce_mean(tf.cast(correct, tf.float64), axis=-1)

  return accuracies


def episode_accuracies(accuracy_fn, episodes, batch_size):
  """Runs `accuracy_fn` over a finite set of episodes.

  Args:
    accuracy_fn: from `accuracy_function`.
    episodes: tf.data.Dataset of single (unbatched) episodes, e.g. from
      `comln_tf.data.eval_episodes`.
    batch_size: episodes per call.

  Returns:
    float64 numpy array [n], the accuracy of each episode, in order.
  """
  results = [accuracy_fn(batch).numpy()
             for batch in episodes.batch(batch_size)]
  return np.concatenate(results)


def summarize(accuracies):
  """Mean and 95% confidence interval of per-episode accuracies.

  The interval is 1.96 * std / sqrt(n), with the population standard
  deviation (numpy's default, as in the few-shot literature's code).

  Args:
    accuracies: float array [n], n >= 1.

  Returns:
    dict: "accuracy" (mean, in [0, 1]), "ci95" (half-width of the
    interval), "episodes" (n).
  """
  accuracies = np.asarray(accuracies, np.float64)
  n = accuracies.size
  return {"accuracy": float(np.mean(accuracies)),
          "ci95": float(1.96 * np.std(accuracies) / math.sqrt(n)),
          "episodes": int(n)}


def evaluate(model, class_set, *, ways, shots, queries, num_episodes=1000,
             seed=TEST_SEED, batch_size=16, rotate_classes=False):
  """Mean accuracy and 95% interval of `model` on fixed episodes.

  Args:
    model: a COMLN.
    class_set: the classes to draw episodes from (e.g. `splits.test`).
    ways, shots, queries: the episodes' N, k and queries per class.
    num_episodes: number of episodes.
    seed: seed of the episodes (the default gives the standard test set).
    batch_size: episodes per model call.
    rotate_classes: rotate each class of an episode by a random multiple of
      90 degrees, as MAML's Omniglot evaluation does (see
      `data.eval_episodes`).

  Returns:
    dict of `summarize` plus ways, shots, queries, seed, split and
    rotate_classes.

  Raises:
    ValueError: the class set cannot make such episodes.
  """
  episodes = data.eval_episodes(class_set, ways=ways, shots=shots,
                                queries=queries, seed=seed,
                                num_episodes=num_episodes,
                                rotate_classes=rotate_classes)
  accuracies = episode_accuracies(accuracy_function(model), episodes,
                                  batch_size)
  return {**summarize(accuracies), "ways": ways, "shots": shots,
          "queries": queries, "seed": seed, "split": class_set.split,
          "rotate_classes": rotate_classes}


def write_json(path, value):
  """Writes `value` as JSON to `path`, atomically (temporary file + rename).

  A reader, or a run killed mid-write, never sees half a file.

  Args:
    path: str, the output file; its directory is created if needed.
    value: JSON-serializable value.
  """
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  partial = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(partial, "w") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
  tf.io.gfile.rename(partial, path, overwrite=True)
