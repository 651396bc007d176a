"""Evaluating a trained run from its model_dir (the test protocol)."""

import math
import os

import tensorflow as tf

from comln_tf import evaluation
from comln_tf.training import _loop
from comln_tf.training import _models
from comln_tf.training._config import ConfigError
from comln_tf.training._config import load_config

SPLITS = ("test", "validation")


def default_output(model_dir, which, split, ways, shots, queries,
                   t_final=None, rotate_classes=False, classifier="comln"):
  """model_dir/evaluation_<split>_<which>_<ways>w<shots>s<queries>q.json.

  With t_final, "_t<t_final>" before ".json"; then with rotate_classes,
  "_rotated"; then with classifier="prototypes", "_prototypes".
  """
  suffix = "" if t_final is None else f"_t{t_final:g}"
  suffix += "_rotated" if rotate_classes else ""
  suffix += "" if classifier == "comln" else f"_{classifier}"
  return os.path.join(
      model_dir,
      f"evaluation_{split}_{which}_{ways}w{shots}s{queries}q{suffix}.json")


def evaluate_run(model_dir, *, which="best", split="test", num_episodes=1000,
                 seed=evaluation.TEST_SEED, ways=None, shots=None,
                 queries=None, batch_size=None, data_dir=None, output=None,
                 t_final=None, rotate_classes=False, classifier="comln"):
  """Evaluates a run's checkpoint on fixed episodes and writes the JSON.

  Args:
    model_dir: str, the run's directory.
    which: "best" or "latest" checkpoint.
    split: "test" or "validation" classes.
    num_episodes: number of episodes (1,000 in the paper).
    seed: seed of the episodes; the default gives the standard test set,
      the same for every run and machine.
    ways, shots, queries: the episodes' N, k and queries per class (default:
      the training run's). Other ways need a run with tied initial rows.
    batch_size: episodes per model call (default: the run's meta-batch).
    data_dir: where the dataset is (default: the run's).
    output: JSON file (default: `default_output(...)` in model_dir).
    t_final: adapt up to this T instead of the checkpoint's learned T (None:
      the learned one), e.g. a T chosen on the validation split.
    rotate_classes: rotate each class of an episode by a random multiple of
      90 degrees (MAML's Omniglot evaluation; square images only).
    classifier: "comln" (the run's adapted classifier) or "prototypes"
      (the nearest class mean on the run's embeddings, a baseline; no T).

  Returns:
    dict: "accuracy" and "ci95" (fractions), "episodes", "ways", "shots",
    "queries", "seed", "split", "rotate_classes", "classifier",
    "checkpoint" (its path), "step", "t_final" (the T used; None with
    prototypes) and "output" (where the JSON was written).

  Raises:
    ConfigError: naming the flag: no run or no such checkpoint in
      model_dir, ways the model cannot classify, episodes the split cannot
      make, bad split or episode count.
  """
  if split not in SPLITS:
    raise ConfigError(f"--split must be one of {', '.join(SPLITS)}; got "
                      f"{split!r}.")
  if which not in ("best", "latest"):
    raise ConfigError(f"--checkpoint must be best or latest; got {which!r}.")
  for name, value in (("episodes", num_episodes), ("batch_size", batch_size)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ConfigError(f"--{name} must be an integer >= 1; got {value!r}.")
  if t_final is not None and (
      isinstance(t_final, bool) or not isinstance(t_final, (int, float)) or
      not 0 < t_final < math.inf):
    raise ConfigError(f"--t_final must be a number > 0; got {t_final!r}.")
  try:
    evaluation.check_classifier(classifier)
  except ValueError as error:
    raise ConfigError(f"--{error}.") from error
  if t_final is not None and classifier != "comln":
    raise ConfigError(f"--t_final is the adaptation time of COMLN's "
                      f"classifier; --classifier={classifier} has none.")
  try:
    config = load_config(model_dir)
    path = _models.checkpoint_path(model_dir, which)
    # At once: a live run may replace its best or old checkpoints.
    step = _models.checkpoint_step(path)
    model = _models.model_from_checkpoint(
        config, path, jit_compile=config["jit_compile"])
  except (FileNotFoundError, ValueError, tf.errors.NotFoundError) as error:
    raise ConfigError(f"--model_dir={model_dir} --checkpoint={which}: "
                      f"{error}") from error
  if t_final is not None:
    model.classifier.assign_t_final(t_final)
  ways = ways or config["ways"]
  shots = shots or config["shots"]
  queries = queries or config["queries"]
  if ways != config["ways"] and not config["tie_init_rows"]:
    raise ConfigError(
        f"--ways={ways}: the run was trained with --ways={config['ways']} "
        f"and without --tie_init_rows, so its W0 has {config['ways']} rows.")
  if data_dir is not None:
    config = {**config, "data_dir": data_dir}
  class_set = getattr(_loop.load_splits(config), split)
  _loop.check_episodes(class_set, ways, shots, queries)
  if rotate_classes:
    try:
      class_set.check_square_images("rotate_classes")
    except ValueError as error:
      raise ConfigError(f"--rotate_classes: {error}") from error
  results = evaluation.evaluate(
      model, class_set, ways=ways, shots=shots, queries=queries,
      num_episodes=num_episodes, seed=seed,
      batch_size=batch_size or config["meta_batch_size"],
      rotate_classes=rotate_classes, classifier=classifier)
  if not output:
    output = default_output(model_dir, which, split, ways, shots, queries,
                            t_final, rotate_classes, classifier)
  t_used = float(model.classifier.t_final) if classifier == "comln" else None
  results.update(checkpoint=path, step=step, model_dir=model_dir,
                 t_final=t_used, output=output)
  evaluation.write_json(output, results)
  return results
