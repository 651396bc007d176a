"""Whether a SavedModel serves the model `launch.evaluate` evaluates.

`compare` runs the export's adapt_and_predict_batch signature (each task
served as adapt_and_predict serves it alone; as many tasks per request as
the export's request limits and the run's meta-batch allow) and the Keras
model that `launch.evaluate` restores (same run, same default checkpoint)
on the fixed test episodes of the evaluation protocol. `export.check_served`
is its command line.
"""

import logging

import numpy as np
import tensorflow as tf

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from export import saved_model

# Logit margins below this count as ties: the export's XLA-free solve and
# an XLA-compiled evaluation may order them either way.
TIE_MARGIN = 1e-3

_LOG = logging.getLogger(__name__)


def compare(
  model_dir: str,
  export_dir: str,
  *,
  which: str = "auto",
  num_episodes: int = 1000,
  ways: int | None = None,
  shots: int | None = None,
  queries: int | None = None,
  seed: int = evaluation.TEST_SEED,
  progress: bool = True,
) -> dict:
  """Predictions of an export and of launch.evaluate's model, compared.

  Args:
    model_dir: str, the training run's directory.
    export_dir: str, a SavedModel version folder written by export_model.
    which: the checkpoint launch.evaluate uses ("auto": best, else latest).
    num_episodes, seed: the test episodes (launch.evaluate's defaults).
    ways, shots, queries: the episodes' shape (None: the run's); ways >= 2.
    progress: log a line as each step starts, and progress lines over the
      episodes (episodes done, served accuracy so far).

  Returns:
    dict: "checkpoint" and "step" (launch.evaluate's), "export_checkpoint"
    and "export_step" (the export's metadata), "episodes", "queries" (in
    all), "served_accuracy" and "evaluated_accuracy" (mean over episodes),
    "served_classes" and "evaluated_classes" (int64 [episodes, N*q]),
    "disagreements" (queries classified differently) and "ties" (those of
    them with a top-2 logit margin below TIE_MARGIN).

  Raises:
    training.ConfigError: no such run or checkpoint, bad episode shape.
    evaluation.NonFiniteLogitsError: either model gave NaN or infinite
      logits (no class is read from them).
  """
  if ways is not None:
    try:
      evaluation.check_ways(ways)
    except ValueError as error:
      raise training.ConfigError(f"{error}.") from error
  log = _LOG.info if progress else _LOG.debug
  log("Restoring launch.evaluate's model from %s.", model_dir)
  model, config, path, _, step = training.evaluation_model(model_dir, which)
  metadata = saved_model.read_metadata(export_dir)
  episodes = _test_episodes(config, ways, shots, queries, seed, num_episodes)
  log("Loading the export %s.", export_dir)
  serve = _batch_signature(export_dir)
  tasks = _tasks_per_request(
    metadata, episodes.element_spec, config.data.meta_batch_size
  )
  log(
    "Comparing the two on %d test episodes, %d per request.",
    num_episodes,
    tasks,
  )
  served, evaluated, margins, labels = _classify(
    model, serve, episodes.batch(tasks), num_episodes, progress
  )
  differ = served != evaluated
  return {
    "checkpoint": path,
    "step": step,
    "export_checkpoint": metadata.get("checkpoint"),
    "export_step": metadata.get("step"),
    "episodes": len(served),
    "queries": served.size,
    "served_accuracy": float(np.mean(served == labels, axis=1).mean()),
    "evaluated_accuracy": float(np.mean(evaluated == labels, axis=1).mean()),
    "served_classes": served,
    "evaluated_classes": evaluated,
    "disagreements": int(differ.sum()),
    "ties": int((differ & (margins < TIE_MARGIN)).sum()),
  }


def _batch_signature(export_dir):
  """The export's adapt_and_predict_batch signature.

  Raises:
    training.ConfigError: the export has none (an earlier version's).
  """
  signatures = tf.saved_model.load(export_dir).signatures
  if saved_model.ADAPT_AND_PREDICT_BATCH not in signatures:
    raise training.ConfigError(
      f"the export {export_dir} has no "
      f"{saved_model.ADAPT_AND_PREDICT_BATCH} signature (an earlier "
      "version's export): export the run again."
    )
  return signatures[saved_model.ADAPT_AND_PREDICT_BATCH]


def _tasks_per_request(metadata, episode_spec, meta_batch_size):
  """Tasks per request: the meta-batch size, within the export's limits.

  Args:
    metadata: the export's metadata (its max_serving_support and
      max_serving_queries bound the images of a request in all).
    episode_spec: element_spec of one episode (static M and Q).
    meta_batch_size: the run's meta-batch size.

  Returns:
    int >= 1.
  """
  support = episode_spec["support_images"].shape[0]
  queries = episode_spec["query_images"].shape[0]
  return max(
    1,
    min(
      meta_batch_size,
      metadata["max_serving_support"] // support,
      metadata["max_serving_queries"] // queries,
    ),
  )


def _test_episodes(config, ways, shots, queries, seed, num_episodes):
  """The fixed test episodes of the run's test classes, checked to fit.

  Args:
    config: the run's configuration.
    ways, shots, queries: the episodes' shape (None: the run's).
    seed, num_episodes: which episodes.

  Returns:
    tf.data.Dataset of single episodes, as `data.eval_episodes`.

  Raises:
    training.ConfigError: the test classes do not fit the episodes.
  """
  ways = config.data.ways if ways is None else ways
  shots = config.data.shots if shots is None else shots
  queries = config.data.queries if queries is None else queries
  class_set = training.load_splits(config).test
  training.check_episodes(
    class_set, ways, shots, queries, config.data.class_sampling
  )
  return data.eval_episodes(
    class_set,
    ways=ways,
    shots=shots,
    queries=queries,
    seed=seed,
    num_episodes=num_episodes,
    class_sampling=config.data.class_sampling,
  )


def _classify(model, serve, batches, num_episodes, progress):
  """The classes of the queries of every episode, by both models.

  Args:
    model: launch.evaluate's Keras model.
    serve: the export's adapt_and_predict_batch signature.
    batches: tf.data.Dataset of batches of episodes.
    num_episodes: the number of episodes in all.
    progress: whether to log progress lines.

  Returns:
    (served, evaluated, margins, labels): int64 classes [episodes, N*q] of
    the export and of the Keras model, float top-2 logit margins of the
    Keras model and the true labels, of the same shape.

  Raises:
    evaluation.NonFiniteLogitsError: either model gave non-finite logits.
  """
  progress_log = evaluation.ProgressLog(
    "Served check", num_episodes, enabled=progress
  )
  # Compiled, as launch.evaluate runs the model.
  evaluate = tf.function(
    lambda batch: model(batch, training=False), reduce_retracing=True
  )
  served, evaluated, margins, labels = [], [], [], []
  done = 0
  for batch in batches:
    logits = evaluate(batch).numpy()
    _check_finite("launch.evaluate's model", logits, done, num_episodes)
    evaluated.append(logits.argmax(-1))
    top2 = np.sort(logits, axis=-1)[..., -2:]
    margins.append(top2[..., 1] - top2[..., 0])
    labels.append(batch["query_labels"].numpy())
    outputs = serve(
      support_images=batch["support_images"],
      support_labels=tf.cast(batch["support_labels"], tf.int64),
      query_images=batch["query_images"],
    )
    _check_finite(
      "The served model", outputs["logits"].numpy(), done, num_episodes
    )
    served.append(outputs["classes"].numpy())
    done += len(logits)
    progress_log.update(np.mean(served[-1] == labels[-1], axis=1))
  return (
    np.concatenate(served),
    np.concatenate(evaluated),
    np.concatenate(margins),
    np.concatenate(labels),
  )


def _check_finite(whose, logits, first_episode, num_episodes):
  """Raises NonFiniteLogitsError if any of the episodes' logits is not finite.

  Args:
    whose: the model, for the message.
    logits: float [B, Q, N], the logits of episodes first_episode, ...
    first_episode: index of the first of them.
    num_episodes: the number of episodes of the comparison.
  """
  finite = np.all(np.isfinite(logits), axis=(1, 2))
  if not finite.all():
    raise evaluation.NonFiniteLogitsError(
      evaluation.non_finite_message(
        whose,
        [first_episode + i for i in np.flatnonzero(~finite)],
        num_episodes,
      )
    )
