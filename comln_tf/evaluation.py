"""Few-shot evaluation: accuracy over fixed episodes, with a 95% interval.

The test protocol of the paper: mean query accuracy over 1,000 test
episodes and its 95% confidence interval 1.96 * std / sqrt(n). The episodes
come from `comln_tf.data.eval_episodes` with a fixed seed, so every run on
every machine is evaluated on the same episodes.
"""

import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from comln_tf import data

# Seeds of the fixed evaluation episodes (any fixed values would do; they
# differ so that validation and test draws are unrelated).
TEST_SEED = 2022
VALIDATION_SEED = 1

# What classifies the queries on the model's embeddings: COMLN's adapted
# classifier, or the nearest class mean of Prototypical Networks (a
# baseline on the same embeddings).
CLASSIFIERS = ("comln", "prototypes")


def prototype_logits(
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  query_embeddings: tf.Tensor,
) -> tf.Tensor:
  """Minus the squared Euclidean distances of queries to the class means.

  The classifier of Prototypical Networks (Snell et al. 2017).

  Args:
    support_embeddings: float [B, M, d].
    support_labels: int [B, M] in [0, N); every class has a support example.
    query_embeddings: float [B, Q, d].

  Returns:
    float [B, Q, N] logits, -||query - mean of class n||^2.
  """
  num_ways = tf.reduce_max(support_labels) + 1
  one_hot = tf.one_hot(
    support_labels, num_ways, dtype=support_embeddings.dtype
  )  # [B, M, N]
  prototypes = (
    tf.einsum("bmn,bmd->bnd", one_hot, support_embeddings)
    / (tf.reduce_sum(one_hot, axis=1)[..., None])
  )
  # ||q||^2 - 2 q.p + ||p||^2, without a [B, Q, N, d] difference tensor.
  return -(
    tf.reduce_sum(tf.square(query_embeddings), -1)[..., None]
    - 2.0 * tf.einsum("bqd,bnd->bqn", query_embeddings, prototypes)
    + tf.reduce_sum(tf.square(prototypes), -1)[:, None, :]
  )


def check_classifier(classifier: str) -> None:
  """Raises ValueError unless `classifier` is one of CLASSIFIERS."""
  if classifier not in CLASSIFIERS:
    raise ValueError(
      f"classifier must be one of {', '.join(CLASSIFIERS)}; got {classifier!r}"
    )


def accuracy_function(
  model: keras.Model, classifier: str = "comln"
) -> Callable[[Mapping[str, tf.Tensor]], tf.Tensor]:
  """A compiled function: meta-batch of episodes -> accuracy per episode.

  Args:
    model: a COMLN.
    classifier: "comln" (the model's adapted classifier) or "prototypes"
      (`prototype_logits` on the model's embeddings).

  Returns:
    tf.function taking an episode dict with a task axis (see
    `comln_tf.data.meta_batches`) and returning float64 [B], the fraction
    of each episode's queries classified correctly. The adaptation uses
    the plain solve (`training=False`).

  Raises:
    ValueError: unknown `classifier`.
  """
  check_classifier(classifier)

  @tf.function(reduce_retracing=True)
  def accuracies(episodes):
    if classifier == "comln":
      logits = model(episodes, training=False)
    else:
      support, query = model.embed_episode(episodes, training=False)
      logits = prototype_logits(
        support, tf.cast(episodes["support_labels"], tf.int32), query
      )
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    correct = tf.equal(predictions, tf.cast(episodes["query_labels"], tf.int32))
    return tf.reduce_mean(tf.cast(correct, tf.float64), axis=-1)

  return accuracies


def episode_accuracies(
  accuracy_fn: Callable[[Mapping[str, tf.Tensor]], tf.Tensor],
  episodes: tf.data.Dataset,
  batch_size: int,
) -> np.ndarray:
  """Runs `accuracy_fn` over a finite set of episodes.

  Args:
    accuracy_fn: from `accuracy_function`.
    episodes: tf.data.Dataset of single (unbatched) episodes, e.g. from
      `comln_tf.data.eval_episodes`.
    batch_size: episodes per call.

  Returns:
    float64 numpy array [n], the accuracy of each episode, in order.
  """
  results = [accuracy_fn(batch).numpy() for batch in episodes.batch(batch_size)]
  return np.concatenate(results)


def summarize(accuracies: Sequence[float]) -> Dict[str, Any]:
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
  return {
    "accuracy": float(np.mean(accuracies)),
    "ci95": float(1.96 * np.std(accuracies) / math.sqrt(n)),
    "episodes": int(n),
  }


def evaluate(
  model: keras.Model,
  class_set: data.ClassSet,
  *,
  ways: int,
  shots: int,
  queries: int,
  num_episodes: int = 1000,
  seed: int = TEST_SEED,
  batch_size: int = 16,
  rotate_classes: bool = False,
  classifier: str = "comln",
  class_sampling: str = "uniform",
) -> Dict[str, Any]:
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
    classifier: "comln" or "prototypes" (see `accuracy_function`).
    class_sampling: how the episodes draw their classes
      (`data.CLASS_SAMPLING`; "within_alphabet": all from one alphabet).

  Returns:
    dict of `summarize` plus ways, shots, queries, seed, split,
    rotate_classes, classifier and class_sampling.

  Raises:
    ValueError: the class set cannot make such episodes, or unknown
      `classifier`.
  """
  episodes = data.eval_episodes(
    class_set,
    ways=ways,
    shots=shots,
    queries=queries,
    seed=seed,
    num_episodes=num_episodes,
    rotate_classes=rotate_classes,
    class_sampling=class_sampling,
  )
  accuracies = episode_accuracies(
    accuracy_function(model, classifier), episodes, batch_size
  )
  return {
    **summarize(accuracies),
    "ways": ways,
    "shots": shots,
    "queries": queries,
    "seed": seed,
    "split": class_set.split,
    "rotate_classes": rotate_classes,
    "classifier": classifier,
    "class_sampling": class_sampling,
  }


def write_json(path: str, value: Any) -> None:
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
