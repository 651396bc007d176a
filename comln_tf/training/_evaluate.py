"""Evaluating a trained run from its model_dir (the test protocol)."""

import math
import os

import ml_collections
import numpy as np
import tensorflow as tf

from comln_tf import _validation
from comln_tf import evaluation
from comln_tf.config import CONFIG_FILE
from comln_tf.config import ConfigError
from comln_tf.config import updated
from comln_tf.model import COMLN
from comln_tf.training import _checkpoints
from comln_tf.training import _loop
from comln_tf.training._config import load_config

SPLITS = ("test", "validation")


DEFAULT_EPISODES = 1000


def default_output(
  model_dir: str,
  which: str,
  split: str,
  ways: int,
  shots: int,
  queries: int,
  t_final: float | None = None,
  rotate_classes: bool = False,
  classifier: str = "comln",
  class_sampling: str = "uniform",
  seed: int = evaluation.TEST_SEED,
  num_episodes: int = DEFAULT_EPISODES,
) -> str:
  """model_dir/evaluation_<split>_<which>_<ways>w<shots>s<queries>q.json.

  With class_sampling="within_alphabet", "_within_alphabet" before
  ".json"; then with t_final, "_t<t_final>"; then with rotate_classes,
  "_rotated"; then with classifier="prototypes", "_prototypes"; then with
  another seed than the standard test set's, "_seed<seed>"; then with
  another number of episodes than 1,000, "_<num_episodes>ep". So an
  evaluation on other episodes never overwrites the standard result.
  """
  suffix = "" if class_sampling == "uniform" else f"_{class_sampling}"
  suffix += "" if t_final is None else f"_t{t_final:g}"
  suffix += "_rotated" if rotate_classes else ""
  suffix += "" if classifier == "comln" else f"_{classifier}"
  suffix += "" if seed == evaluation.TEST_SEED else f"_seed{seed}"
  suffix += "" if num_episodes == DEFAULT_EPISODES else f"_{num_episodes}ep"
  return os.path.join(
    model_dir,
    f"evaluation_{split}_{which}_{ways}w{shots}s{queries}q{suffix}.json",
  )


def evaluation_model(
  model_dir: str, which: str = "auto"
) -> tuple[COMLN, ml_collections.ConfigDict, str, str, int]:
  """The model `evaluate_run` evaluates, restored from a run's checkpoint.

  Args:
    model_dir: str, the run's directory.
    which: "auto", "best" or "latest" (see `checkpoint_path`).

  Returns:
    (COMLN, the run's configuration, checkpoint path, "best" or "latest":
    the checkpoint used, its step).

  Raises:
    ConfigError: naming model_dir and which: no run, no such checkpoint,
      or a checkpoint not written by training.
  """
  if which not in _checkpoints.CHECKPOINTS:
    raise ConfigError(
      f"which (the checkpoint) must be one of "
      f"{', '.join(_checkpoints.CHECKPOINTS)}; got {which!r}."
    )
  try:
    config = load_config(model_dir)
    path = _checkpoints.checkpoint_path(model_dir, which)
    # At once: a live run may replace its best or old checkpoints.
    step = _checkpoints.checkpoint_step(path)
    model = _checkpoints.model_from_checkpoint(
      config, path, jit_compile=config.adaptation.jit_compile
    )
  except (FileNotFoundError, ValueError, tf.errors.NotFoundError) as error:
    raise ConfigError(
      f"model_dir={model_dir!r}, which={which!r}: {error}"
    ) from error
  kind = (
    "best"
    if os.path.normpath(os.path.dirname(path))
    == os.path.normpath(os.path.join(model_dir, _checkpoints.BEST_DIR))
    else "latest"
  )
  return model, config, path, kind, step


def check_output(output: str) -> None:
  """Raises ConfigError unless the evaluation may write its JSON to `output`.

  The rule: a path ending in ".json", not named config.json (a run's
  configuration), not an existing directory, and, if the file exists, an
  earlier evaluation result, and the same for its predictions file
  (`evaluation.predictions_path`), so a run's configuration, checkpoints and
  other files are never replaced. Its directory is created if needed
  and a temporary file written and removed there, so an unwritable place
  fails now rather than after the episodes.

  Args:
    output: str, the JSON file.
  """
  name = os.path.basename(output)
  if not name.endswith(".json") or name == ".json":
    reason = "must be a file name ending in .json"
  elif name == CONFIG_FILE:
    reason = f"is named {CONFIG_FILE}, a run's configuration"
  elif tf.io.gfile.isdir(output):
    reason = "is a directory"
  elif tf.io.gfile.exists(output) and not evaluation.is_evaluation_result(
    output
  ):
    reason = "exists and is not an earlier evaluation result"
  elif not _replaceable_predictions(evaluation.predictions_path(output)):
    reason = (
      f"would replace {evaluation.predictions_path(output)}, which is not "
      f"an earlier evaluation's predictions"
    )
  else:
    try:
      evaluation.check_writable(output)
      return
    except (OSError, tf.errors.OpError) as error:
      reason = f"cannot be written: {_first_line(error)}"
  raise ConfigError(f"output={output!r} {reason}.")


def _replaceable_predictions(path):
  """Whether an evaluation may write its predictions to `path`: no file
  there, or an earlier evaluation's predictions."""
  if not tf.io.gfile.exists(path):
    return True
  try:
    evaluation.read_predictions(path)
  except (OSError, tf.errors.OpError, ValueError):
    return False
  return True


def _first_line(error):
  """The first line of an error's message (TensorFlow's run on)."""
  message = getattr(error, "message", None) or str(error)
  return message.strip().splitlines()[0] if message.strip() else repr(error)


def check_t_final(model: COMLN, t_final: float | None = None) -> None:
  """Raises ConfigError unless the model adapts up to a finite T > 0.

  T is what the model computes in its dtype: t_final=1e39 is a finite
  Python float, but infinite in float32, and would make NaN logits.

  Args:
    model: a COMLN, with `t_final` already assigned if given.
    t_final: the T asked for (None: the checkpoint's learned T).
  """
  dtype = tf.as_dtype(model.classifier.log_t.dtype).name
  used = float(model.classifier.t_final)
  with np.errstate(over="ignore", under="ignore"):
    cast = used if t_final is None else float(np.array(float(t_final), dtype))
  if all(math.isfinite(value) and value > 0 for value in (used, cast)):
    return
  if t_final is None:
    raise ConfigError(
      f"the checkpoint's learned T is {used!r}, not a finite number > 0; "
      f"pass t_final to adapt up to another T."
    )
  raise ConfigError(
    f"t_final={t_final!r} is not a finite number > 0 in the model's "
    f"{dtype} (T would be {used!r}; {dtype} holds numbers > 0 from "
    f"{np.finfo(dtype).smallest_subnormal:.2g} to {np.finfo(dtype).max:.2g})."
  )


def evaluate_run(
  model_dir: str,
  *,
  which: str = "auto",
  split: str = "test",
  num_episodes: int = DEFAULT_EPISODES,
  seed: int = evaluation.TEST_SEED,
  ways: int | None = None,
  shots: int | None = None,
  queries: int | None = None,
  batch_size: int | None = None,
  data_dir: str | None = None,
  output: str | None = None,
  t_final: float | None = None,
  rotate_classes: bool = False,
  classifier: str = "comln",
  class_sampling: str | None = None,
  progress: bool = True,
) -> dict:
  """Evaluates a run's checkpoint on fixed episodes and writes the JSON.

  Every argument, the output file included, is checked before the first
  episode.

  Args:
    model_dir: str, the run's directory.
    which: "auto" (the best checkpoint if the run has one, else the
      latest: the one `export_model` exports by default), "best" or
      "latest".
    split: "test" or "validation" classes.
    num_episodes: number of episodes (1,000 in the paper).
    seed: seed of the episodes; the default gives the standard test set,
      the same for every run and machine.
    ways, shots, queries: the episodes' N, k and queries per class (None:
      the training run's); ways >= 2. Other ways need a run with tied
      initial rows.
    batch_size: episodes per model call (default: the run's meta-batch).
    data_dir: where the dataset is (default: the run's).
    output: JSON file (default: `default_output(...)` in model_dir); see
      `check_output` for the files it may replace.
    t_final: adapt up to this T instead of the checkpoint's learned T (None:
      the learned one), e.g. a T chosen on the validation split; finite
      and > 0 in the model's dtype.
    rotate_classes: rotate each class of an episode by a random multiple of
      90 degrees (MAML's Omniglot evaluation; square images only).
    classifier: "comln" (the run's adapted classifier) or "prototypes"
      (the nearest class mean on the run's embeddings, a baseline; no T).
    class_sampling: how episodes draw their classes, one of
      `data.CLASS_SAMPLING` (default: the run's).
    progress: log progress lines (episodes done, accuracy so far).

  Returns:
    dict: "accuracy" and "ci95" (fractions), "episodes", "ways", "shots",
    "queries", "seed", "split", "rotate_classes", "classifier",
    "checkpoint" (its path), "which" ("best" or "latest": the checkpoint
    used), "step", "t_final" (the T used; None with prototypes), "output"
    (where the JSON was written) and "predictions" (where the episodes'
    `evaluation.Predictions` were written, `evaluation.predictions_path`).

  Raises:
    ConfigError: naming the argument: no run or no such checkpoint in
      model_dir, ways the model cannot classify, episodes the split cannot
      make, bad split, count, T or output.
    evaluation.NonFiniteLogitsError: the model gave NaN or infinite logits.
    evaluation.ResultNotWrittenError: the JSON could not be written at the
      end; its `results` holds the results all the same.
  """
  _check_arguments(split, num_episodes, ways, shots, queries, batch_size)
  _check_classifier(classifier, t_final)
  if output:
    check_output(output)
  model, config, path, which, step = _restored(
    model_dir, which, t_final, classifier, data_dir
  )
  episodes = _episodes(config, ways, shots, queries, class_sampling)
  if not output:
    output = default_output(
      model_dir,
      which,
      split,
      **episodes,
      t_final=t_final,
      rotate_classes=rotate_classes,
      classifier=classifier,
      seed=seed,
      num_episodes=num_episodes,
    )
    check_output(output)
  class_set = _class_set(config, split, episodes, rotate_classes)
  results = evaluation.evaluate(
    model,
    class_set,
    **episodes,
    num_episodes=num_episodes,
    seed=seed,
    batch_size=batch_size or config.data.meta_batch_size,
    rotate_classes=rotate_classes,
    classifier=classifier,
    progress=progress,
  )
  t_used = float(model.classifier.t_final) if classifier == "comln" else None
  results.update(checkpoint=path, which=which, step=step, t_final=t_used)
  results.update(model_dir=model_dir, output=output)
  _write_results(results)
  return results


def _restored(model_dir, which, t_final, classifier, data_dir):
  """`evaluation_model`'s result, its T set to t_final (checked for COMLN).

  The config's data_dir is replaced by `data_dir` if given.
  """
  model, config, path, which, step = evaluation_model(model_dir, which)
  if data_dir is not None:
    config = updated(config, {"data.data_dir": data_dir})
  if t_final is not None:
    model.classifier.assign_t_final(t_final)
  if classifier == "comln":
    check_t_final(model, t_final)
  return model, config, path, which, step


def _episodes(config, ways, shots, queries, class_sampling):
  """{"ways", "shots", "queries", "class_sampling"}: given, or the run's.

  Raises:
    ConfigError: other ways than the run's, for a W0 of the run's rows.
  """
  run = config.data
  ways = run.ways if ways is None else ways
  if ways != run.ways and not config.model.tie_init_rows:
    raise ConfigError(
      f"ways={ways}: the run was trained with config.data.ways={run.ways} "
      f"and without config.model.tie_init_rows, so its W0 has {run.ways} "
      f"rows."
    )
  return {
    "ways": ways,
    "shots": run.shots if shots is None else shots,
    "queries": run.queries if queries is None else queries,
    "class_sampling": class_sampling or run.class_sampling,
  }


def _class_set(config, split, episodes, rotate_classes):
  """The split's classes, checked to make the episodes.

  Raises:
    ConfigError: the data cannot be loaded, cannot make the episodes, or
      cannot be rotated (rotate_classes on images that are not square).
  """
  class_set = getattr(_loop.load_splits(config), split)
  _loop.check_episodes(class_set, **episodes)
  if rotate_classes:
    try:
      class_set.check_square_images("rotate_classes")
    except ValueError as error:
      raise ConfigError(f"rotate_classes: {error}") from error
  return class_set


def _write_results(results):
  """Writes the results' predictions, then their JSON, which names them.

  results["predictions"], `evaluation.Predictions`, becomes the path they
  are written to (`evaluation.predictions_path` of results["output"]).

  Raises:
    evaluation.ResultNotWrittenError: either could not be written; it holds
      the results all the same.
  """
  output = results["output"]
  predictions = results["predictions"]
  results["predictions"] = evaluation.predictions_path(output)
  try:
    evaluation.write_predictions(results["predictions"], predictions)
    evaluation.write_json(output, results)
  except (OSError, tf.errors.OpError) as error:
    raise evaluation.ResultNotWrittenError(
      f"output={output!r}: the result could not be written: "
      f"{_first_line(error)}",
      results,
    ) from error


def _check_arguments(split, num_episodes, ways, shots, queries, batch_size):
  """Raises ConfigError naming the first bad split or count."""
  _validation.one_of("split", split, SPLITS, error=ConfigError)
  for name, value in (
    ("num_episodes", num_episodes),
    ("ways", ways),
    ("shots", shots),
    ("queries", queries),
    ("batch_size", batch_size),
  ):
    # 0 is an error, not "the run's value": None is.
    if value is not None:
      _validation.integer(name, value, 1, error=ConfigError)
  if ways is not None:
    try:
      evaluation.check_ways(ways)
    except ValueError as error:
      raise ConfigError(f"{error}.") from error


def _check_classifier(classifier, t_final):
  """Raises ConfigError on an unknown classifier or a bad t_final for it."""
  try:
    evaluation.check_classifier(classifier)
  except ValueError as error:
    raise ConfigError(f"{error}.") from error
  if t_final is None:
    return
  if classifier != "comln":
    raise ConfigError(
      f"t_final is the adaptation time of COMLN's "
      f"classifier; classifier={classifier!r} has none."
    )
  if (
    isinstance(t_final, bool)
    or not isinstance(t_final, (int, float))
    or not 0 < t_final < math.inf
  ):
    raise ConfigError(f"t_final must be a number > 0; got {t_final!r}.")
