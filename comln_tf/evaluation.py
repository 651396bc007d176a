"""Few-shot evaluation: accuracy over fixed episodes, with a 95% interval.

The test protocol of the paper: mean query accuracy over 1,000 test
episodes and its 95% confidence interval 1.96 * std / sqrt(n). The episodes
come from `comln_tf.data.eval_episodes` with a fixed seed, so every run on
every machine is evaluated on the same episodes.
"""

from collections.abc import Callable, Mapping, Sequence
import datetime
import io
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from comln_tf import _validation
from comln_tf import data

# Seeds of the fixed evaluation episodes (any fixed values would do; they
# differ so that validation and test draws are unrelated).
TEST_SEED = 2022
VALIDATION_SEED = 1

# What classifies the queries on the model's embeddings: COMLN's adapted
# classifier, or the nearest class mean of Prototypical Networks (a
# baseline on the same embeddings).
CLASSIFIERS = ("comln", "prototypes")

# Progress lines of a long evaluation: one each time another PROGRESS_FRACTION
# of the episodes is done, and one at least every PROGRESS_INTERVAL seconds.
PROGRESS_FRACTION = 0.1
PROGRESS_INTERVAL = 5.0

_LOG = logging.getLogger(__name__)


class NonFiniteLogitsError(ValueError):
  """A classifier gave NaN or infinite logits: no class can be read."""


class ResultNotWrittenError(OSError):
  """An evaluation ran, but its result file could not be written.

  Attributes:
    results: the evaluation's results, to show or keep all the same.
  """

  def __init__(self, message: str, results: dict[str, Any]):
    super().__init__(message)
    self.results = results


def non_finite_message(what: str, episodes: Sequence[int], total: int) -> str:
  """The message of a NonFiniteLogitsError.

  Args:
    what: whose logits, e.g. "Evaluation" or "The served model".
    episodes: indices of the episodes with non-finite logits.
    total: the number of episodes of the evaluation.

  Returns:
    str: one line naming the episodes and the likely causes.
  """
  shown = ", ".join(str(i) for i in episodes[:5])
  more = f" and {len(episodes) - 5} more" if len(episodes) > 5 else ""
  return (
    f"{what}: non-finite logits (NaN or inf) in {len(episodes)} episode(s) "
    f"(episode {shown}{more} of {total}); no class can be read from them. "
    f"Likely causes: T not finite (a t_final beyond the range of the "
    f"model's dtype), fewer than 2 ways, or non-finite weights."
  )


def check_ways(ways: int) -> int:
  """`ways` as an int, checked to be an integer >= 2.

  A 1-way episode has nothing to classify: every query is right by
  construction (and COMLN's adapted classifier needs N >= 2 rows).

  Raises:
    ValueError: `ways` is not an integer >= 2; the message says why 2.
  """
  try:
    return _validation.integer("ways", ways, 2)
  except ValueError:
    raise ValueError(
      f"ways must be an integer >= 2 (an episode needs 2 or more classes "
      f"to classify among); got {ways!r}"
    ) from None


class ProgressLog:
  """Log lines of a long loop over episodes: done / total, accuracy so far.

  A line each time another `fraction` of the episodes is done, whenever
  `interval` seconds passed since the last line, and at the end.
  """

  def __init__(
    self,
    what: str,
    total: int,
    *,
    enabled: bool = True,
    fraction: float = PROGRESS_FRACTION,
    interval: float = PROGRESS_INTERVAL,
  ):
    """Starts the clock.

    Args:
      what: the line's first words, e.g. "Evaluation".
      total: the number of episodes.
      enabled: False logs nothing.
      fraction: a line every this fraction of `total`.
      interval: and at least every this many seconds.
    """
    self._what, self._total, self._enabled = what, total, enabled
    self._step = max(1, math.ceil(fraction * total))
    self._interval = interval
    self._done, self._correct = 0, 0.0
    self._start = self._last = time.monotonic()
    self._next = self._step

  def update(self, accuracies: Sequence[float] | np.ndarray) -> None:
    """Counts the accuracies of more episodes; logs a line when due."""
    self._done += len(accuracies)
    self._correct += float(np.sum(accuracies))
    now = time.monotonic()
    due = (
      self._done >= self._next
      or now - self._last >= self._interval
      or self._done >= self._total
    )
    if not (self._enabled and due):
      return
    while self._next <= self._done:
      self._next += self._step
    self._last = now
    elapsed = now - self._start
    if self._done >= self._total:
      timing = f"done in {datetime.timedelta(seconds=round(elapsed))}"
    else:
      left = elapsed * (self._total - self._done) / self._done
      timing = (
        f"{datetime.timedelta(seconds=round(elapsed))} elapsed, about "
        f"{datetime.timedelta(seconds=round(left))} left"
      )
    _LOG.info(
      "%s: %d/%d episodes (%d%%), accuracy so far %.2f%%, %s.",
      self._what,
      self._done,
      self._total,
      100 * self._done // max(self._total, 1),
      100 * self._correct / self._done,
      timing,
    )


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


class Predictions(NamedTuple):
  """What a classifier made of episodes' queries (numpy, episodes in order).

  Attributes:
    accuracies: float64 [n], the fraction of each episode's queries
      classified correctly, NaN for an episode whose logits are not all
      finite.
    classes: int32 [n, Q], each query's predicted class (its largest logit).
    margins: float32 [n, Q], each query's two largest logits' difference
      (near 0: a near-tie, which rounding may order either way).
  """

  accuracies: np.ndarray
  classes: np.ndarray
  margins: np.ndarray


def prediction_function(
  model: keras.Model, classifier: str = "comln"
) -> Callable[[Mapping[str, tf.Tensor]], tuple[tf.Tensor, ...]]:
  """A compiled function: meta-batch of episodes -> `Predictions` (tensors).

  Args:
    model: a COMLN.
    classifier: "comln" (the model's adapted classifier) or "prototypes"
      (`prototype_logits` on the model's embeddings).

  Returns:
    tf.function taking an episode dict with a task axis (see
    `comln_tf.data.meta_batches`) and returning `Predictions` of tensors
    for its B episodes. No class is read from non-finite logits (argmax
    would make NaN rows class 0): such an episode's accuracy is NaN. The
    adaptation uses the plain solve (`training=False`).

  Raises:
    ValueError: unknown `classifier`.
  """
  check_classifier(classifier)

  @tf.function(reduce_retracing=True)
  def predictions(episodes):
    if classifier == "comln":
      logits = model(episodes, training=False)
    else:
      support, query = model.embed_episode(episodes, training=False)
      logits = prototype_logits(
        support, tf.cast(episodes["support_labels"], tf.int32), query
      )
    classes = tf.argmax(logits, axis=-1, output_type=tf.int32)
    correct = tf.equal(classes, tf.cast(episodes["query_labels"], tf.int32))
    accuracy = tf.reduce_mean(tf.cast(correct, tf.float64), axis=-1)
    finite = tf.reduce_all(tf.math.is_finite(logits), axis=[-2, -1])
    top2 = tf.math.top_k(logits, k=2).values
    return Predictions(
      tf.where(finite, accuracy, tf.constant(math.nan, tf.float64)),
      classes,
      tf.cast(top2[..., 0] - top2[..., 1], tf.float32),
    )

  return predictions


def episode_predictions(
  prediction_fn: Callable[[Mapping[str, tf.Tensor]], tuple[tf.Tensor, ...]],
  episodes: tf.data.Dataset,
  batch_size: int,
  *,
  progress: bool = False,
  what: str = "Evaluation",
) -> Predictions:
  """Runs `prediction_fn` over a finite set of episodes.

  A last batch shorter than the others is padded with copies of its last
  episode (each episode is classified on its own), so that `prediction_fn`
  is traced for one batch shape only.

  Args:
    prediction_fn: from `prediction_function`.
    episodes: tf.data.Dataset of single (unbatched) episodes, e.g. from
      `comln_tf.data.eval_episodes`.
    batch_size: episodes per call.
    progress: log progress lines (see `ProgressLog`).
    what: the first words of the progress lines and errors.

  Returns:
    `Predictions` of the n episodes, numpy arrays in order.

  Raises:
    NonFiniteLogitsError: at the first call with non-finite logits.
  """
  total = int(episodes.cardinality())
  progress = progress and total > 0
  log = ProgressLog(what, total, enabled=progress)
  if progress:
    _LOG.info(
      "%s: %d episodes, %d per call (the first call also traces the model).",
      what,
      total,
      batch_size,
    )
  results = []
  done = 0
  for batch in episodes.batch(batch_size):
    size = int(batch["query_labels"].shape[0])
    if done and size < batch_size:
      batch = {
        key: tf.concat([value, tf.repeat(value[-1:], batch_size - size, 0)], 0)
        for key, value in batch.items()
      }
    predictions = Predictions(
      *(value.numpy()[:size] for value in prediction_fn(batch))
    )
    bad = np.flatnonzero(np.isnan(predictions.accuracies))
    if bad.size:
      raise NonFiniteLogitsError(
        non_finite_message(what, list(done + bad), max(total, 0))
      )
    done += size
    results.append(predictions)
    log.update(predictions.accuracies)
  return Predictions(*(np.concatenate(field) for field in zip(*results)))


def summarize(accuracies: Sequence[float] | np.ndarray) -> dict[str, Any]:
  """Mean and 95% confidence interval of per-episode accuracies.

  The interval is 1.96 * std / sqrt(n), with the population standard
  deviation (numpy's default, as in the few-shot literature's code).

  Args:
    accuracies: float array [n], n >= 1.

  Returns:
    dict: "accuracy" (mean, in [0, 1]), "ci95" (half-width of the
    interval), "episodes" (n).
  """
  values = np.asarray(accuracies, np.float64)
  n = values.size
  return {
    "accuracy": float(np.mean(values)),
    "ci95": float(1.96 * np.std(values) / math.sqrt(n)),
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
  progress: bool = True,
) -> dict[str, Any]:
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
    classifier: "comln" or "prototypes" (see `prediction_function`).
    class_sampling: how the episodes draw their classes
      (`data.CLASS_SAMPLING`; "within_alphabet": all from one alphabet).
    progress: log progress lines (comln_tf.evaluation's logger, INFO).

  Returns:
    dict of `summarize` plus ways, shots, queries, seed, split,
    rotate_classes, classifier, class_sampling and "predictions" (the
    `Predictions` of every episode).

  Raises:
    ValueError: ways < 2, the class set cannot make such episodes, or
      unknown `classifier`.
    NonFiniteLogitsError: the model gave NaN or infinite logits.
  """
  ways = check_ways(ways)
  check_classifier(classifier)
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
  predictions = episode_predictions(
    prediction_function(model, classifier),
    episodes,
    batch_size,
    progress=progress,
    what=f"Evaluation on {class_set.split} episodes",
  )
  return {
    **summarize(predictions.accuracies),
    "ways": ways,
    "shots": shots,
    "queries": queries,
    "seed": seed,
    "split": class_set.split,
    "rotate_classes": rotate_classes,
    "classifier": classifier,
    "class_sampling": class_sampling,
    "predictions": predictions,
  }


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path`, atomically (see `_write_atomically`).

  Args:
    path: str, the output file; its directory is created if needed.
    value: JSON-serializable value.
  """
  text = json.dumps(value, indent=2, sort_keys=True) + "\n"
  _write_atomically(path, "w", lambda f: f.write(text))


def predictions_path(result_path: str) -> str:
  """Where the predictions of the evaluation result JSON `result_path` go:
  its name with ".predictions.npz" for ".json"."""
  return result_path.removesuffix(".json") + ".predictions.npz"


def write_predictions(path: str, predictions: Predictions) -> None:
  """Writes `predictions` to `path` (.npz), atomically.

  Args:
    path: str, the output file; its directory is created if needed.
    predictions: numpy `Predictions`.
  """
  buffer = io.BytesIO()
  np.savez(buffer, **predictions._asdict())
  _write_atomically(path, "wb", lambda f: f.write(buffer.getvalue()))


def read_predictions(path: str) -> Predictions:
  """The `Predictions` that `write_predictions` wrote to `path`.

  Raises:
    OSError or tf.errors.OpError: the file cannot be read.
    ValueError: it is not such a file.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    contents = io.BytesIO(f.read())
  try:
    with np.load(contents) as arrays:
      return Predictions(*(arrays[name] for name in Predictions._fields))
  except (KeyError, OSError, EOFError, ValueError) as error:
    raise ValueError(f"{path} holds no evaluation predictions") from error


def _write_atomically(path, mode, write):
  """Calls `write(file)` on a temporary file, then renames it to `path`.

  A reader, or a run killed mid-write, never sees half a file.

  Args:
    path: str, the output file; its directory is created if needed.
    mode: "w" (text) or "wb" (bytes).
    write: callable writing the contents to the open file.
  """
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  partial = f"{path}.tmp-{os.getpid()}"
  try:
    with tf.io.gfile.GFile(partial, mode) as f:
      write(f)
    tf.io.gfile.rename(partial, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(partial):
      tf.io.gfile.remove(partial)


def check_writable(path: str) -> None:
  """Checks that `write_json(path, ...)` can write, by writing beside it.

  Creates the directory if needed, then writes and removes the temporary
  file `write_json` would write.

  Args:
    path: str, the output file.

  Raises:
    OSError or tf.errors.OpError: the file cannot be written there.
  """
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  probe = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(probe, "w") as f:
    f.write("")
  tf.io.gfile.remove(probe)


# Keys every evaluation result JSON has (`evaluate`'s).
_RESULT_KEYS = frozenset({"accuracy", "ci95", "episodes", "ways", "split"})


def read_result(path: str) -> dict[str, Any]:
  """The evaluation result JSON at `path` (written by `write_json`).

  Raises:
    ValueError: `path` cannot be read or holds no evaluation result.
  """
  try:
    with tf.io.gfile.GFile(path) as f:
      value = json.load(f)
  except (OSError, tf.errors.OpError, ValueError) as error:
    raise ValueError(f"{path} cannot be read as JSON: {error}") from error
  if not (isinstance(value, dict) and set(value) >= _RESULT_KEYS):
    raise ValueError(f"{path} holds no evaluation result")
  return value


def is_evaluation_result(path: str) -> bool:
  """Whether `path` holds an evaluation result JSON (`evaluate`'s keys)."""
  try:
    read_result(path)
  except ValueError:
    return False
  return True
