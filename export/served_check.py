"""Whether a SavedModel serves the model `launch.evaluate` evaluated.

`compare` replays the episodes of an evaluation result (the JSON
`launch.evaluate` writes, and the predictions it records beside it)
through the export's adapt_and_predict_batch signature (each task served
as adapt_and_predict serves it alone; as many tasks per request as the
export's request limits and the run's meta-batch allow), and compares
the served classes with the recorded ones. `export.check_served` is its
command line.
"""

import logging
import os

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
  evaluation_file: str, export_dir: str, *, progress: bool = True
) -> dict:
  """An export's predictions against those of an evaluation result.

  Args:
    evaluation_file: str, the result JSON of `launch.evaluate` (COMLN's
      classifier), with its predictions file beside it.
    export_dir: str, a SavedModel version folder written by export_model.
    progress: log a line as each step starts, and progress lines over the
      episodes (episodes done, served accuracy so far).

  Returns:
    dict: "checkpoint" and "step" (the evaluation's), "export_checkpoint"
    and "export_step" (the export's metadata), "episodes", "queries" (in
    all), "served_accuracy" and "evaluated_accuracy" (mean over episodes),
    "served_classes" and "evaluated_classes" (int [episodes, N*q]),
    "disagreements" (queries classified differently) and "ties" (those of
    them whose evaluated top-2 logit margin is below TIE_MARGIN).

  Raises:
    training.ConfigError: naming the file: no evaluation result or
      predictions, another classifier or T than the export's, no run at
      its model_dir, episodes the run's classes cannot make.
    evaluation.NonFiniteLogitsError: the export gave NaN or infinite
      logits (no class is read from them).
  """
  log = _LOG.info if progress else _LOG.debug
  log("Reading the evaluation %s.", evaluation_file)
  result, recorded = _evaluation(evaluation_file)
  metadata = saved_model.read_metadata(export_dir)
  _check_t_final(result, metadata, evaluation_file, export_dir)
  config = _run_config(result, evaluation_file)
  episodes = _episodes(config, result)
  log("Loading the export %s.", export_dir)
  serve = _batch_signature(export_dir)
  tasks = _tasks_per_request(
    metadata, episodes.element_spec, config.data.meta_batch_size
  )
  log("Serving its %d episodes, %d per request.", result["episodes"], tasks)
  served, labels = _serve(
    serve, episodes.batch(tasks), result["episodes"], progress
  )
  evaluated = recorded.classes
  differ = served != evaluated
  return {
    "checkpoint": result["checkpoint"],
    "step": result["step"],
    "export_checkpoint": metadata.get("checkpoint"),
    "export_step": metadata.get("step"),
    "episodes": len(served),
    "queries": served.size,
    "served_accuracy": float(np.mean(served == labels, axis=1).mean()),
    "evaluated_accuracy": float(np.mean(evaluated == labels, axis=1).mean()),
    "served_classes": served,
    "evaluated_classes": evaluated,
    "disagreements": int(differ.sum()),
    "ties": int((differ & (recorded.margins < TIE_MARGIN)).sum()),
  }


def _evaluation(path):
  """(result dict, its `evaluation.Predictions`) of an evaluation of COMLN.

  Raises:
    training.ConfigError: naming `path`: no such result, one of another
      classifier, or its predictions missing or of other episodes.
  """
  try:
    result = evaluation.read_result(path)
  except ValueError as error:
    raise training.ConfigError(f"{error}.") from error
  if result.get("classifier") != "comln":
    raise training.ConfigError(
      f"{path} evaluates the classifier {result.get('classifier')!r}; an "
      f"export serves COMLN's adapted classifier (launch.evaluate "
      f"--classifier=comln)."
    )
  # Beside the JSON, wherever the two were moved together.
  predictions_file = evaluation.predictions_path(path)
  try:
    predictions = evaluation.read_predictions(predictions_file)
  except (OSError, tf.errors.OpError, ValueError) as error:
    raise training.ConfigError(
      f"{path}: its predictions {predictions_file} cannot be read "
      f"({error}); run launch.evaluate again to record them."
    ) from error
  if len(predictions.classes) != result["episodes"]:
    raise training.ConfigError(
      f"{path}: its predictions {predictions_file} hold "
      f"{len(predictions.classes)} episodes, not {result['episodes']}: "
      f"run launch.evaluate again."
    )
  return result, predictions


def _run_config(result, evaluation_file):
  """The configuration of the evaluated run, from its recorded model_dir.

  Raises:
    training.ConfigError: naming the file: its model_dir holds no run (a
      relative model_dir is read from the working directory).
  """
  model_dir = result["model_dir"]
  try:
    return training.load_config(model_dir)
  except FileNotFoundError as error:
    raise training.ConfigError(
      f"{evaluation_file} evaluates the run in model_dir={model_dir!r}, "
      f"which is not found from {os.getcwd()!r} ({error}): run "
      f"export.check_served from the directory launch.evaluate ran in."
    ) from error


def _check_t_final(result, metadata, evaluation_file, export_dir):
  """Raises ConfigError unless the evaluation adapted up to the export's T."""
  if result["t_final"] != metadata.get("t_final"):
    raise training.ConfigError(
      f"{evaluation_file} adapts up to T = {result['t_final']!r}, the export "
      f"{export_dir} up to T = {metadata.get('t_final')!r}: evaluate "
      f"without --t_final, or export the same T."
    )


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


def _episodes(config, result):
  """The episodes of an evaluation result, checked to fit the run's classes.

  Args:
    config: the run's configuration.
    result: the evaluation result (`evaluation.evaluate`'s keys).

  Returns:
    tf.data.Dataset of single episodes, as `evaluation.evaluate` draws them.

  Raises:
    training.ConfigError: the classes do not fit the episodes.
  """
  shape = {key: result[key] for key in ("ways", "shots", "queries")}
  class_set = getattr(training.load_splits(config), result["split"])
  training.check_episodes(
    class_set, **shape, class_sampling=result["class_sampling"]
  )
  return data.eval_episodes(
    class_set,
    **shape,
    seed=result["seed"],
    num_episodes=result["episodes"],
    rotate_classes=result["rotate_classes"],
    class_sampling=result["class_sampling"],
  )


def _serve(serve, batches, num_episodes, progress):
  """The export's classes of the queries of every episode.

  Args:
    serve: the export's adapt_and_predict_batch signature.
    batches: tf.data.Dataset of batches of episodes.
    num_episodes: the number of episodes in all.
    progress: whether to log progress lines.

  Returns:
    (served, labels): int classes [episodes, N*q] and the true labels.

  Raises:
    evaluation.NonFiniteLogitsError: the export gave non-finite logits.
  """
  progress_log = evaluation.ProgressLog(
    "Served check", num_episodes, enabled=progress
  )
  served, labels = [], []
  done = 0
  for batch in batches:
    outputs = serve(
      support_images=batch["support_images"],
      support_labels=tf.cast(batch["support_labels"], tf.int64),
      query_images=batch["query_images"],
    )
    _check_finite(
      "The served model", outputs["logits"].numpy(), done, num_episodes
    )
    served.append(outputs["classes"].numpy())
    labels.append(batch["query_labels"].numpy())
    done += len(served[-1])
    progress_log.update(np.mean(served[-1] == labels[-1], axis=1))
  return np.concatenate(served), np.concatenate(labels)


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
