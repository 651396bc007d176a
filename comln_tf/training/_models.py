"""Building a COMLN model and its optimizer from a configuration; restoring."""

import os
from typing import Tuple

import keras
import ml_collections
import tensorflow as tf

from comln_tf.model import COMLN
from comln_tf.training import _config
from comln_tf.training._config import ConfigError
from comln_tf.training._config import load_config

BEST_DIR = "best"
# Which checkpoint of a run: "best" (validation), "latest", or "auto": the
# best if the run has one, else the latest (evaluation and export default
# to it, so that what is evaluated is what is served).
CHECKPOINTS = ("auto", "best", "latest")


def build_model(
  config: ml_collections.ConfigDict, jit_compile: bool = False
) -> COMLN:
  """A built COMLN model, with fresh weights, ready to train or restore.

  The weights are drawn from Keras' global random state: call
  `keras.utils.set_random_seed` first for reproducible ones.

  Args:
    config: a configuration with `data.example_shape` (the shape of one
      image, [H, W, C], or of one feature vector, [d]), as saved by
      training.
    jit_compile: XLA-compile the adaptation (see `GradientFlowClassifier`).
      Off for models that are exported.

  Returns:
    A built `COMLN`.
  """
  model = _config.make_comln(config, jit_compile=jit_compile)
  model.build(
    {"support_images": (None, None) + tuple(config.data.example_shape)}
  )
  return model


def build_optimizer(
  config: ml_collections.ConfigDict, model: COMLN
) -> keras.optimizers.Optimizer:
  """The configured Keras optimizer, built for the model's trainable weights.

  It is built here, not at the first step, so that a checkpoint restores
  its slots (e.g. momentum) before training resumes.

  Args:
    config: a configuration (optim group).
    model: the built COMLN.

  Returns:
    keras.optimizers.SGD (momentum, Nesterov per config) or Adam, with a
    constant learning rate or a cosine decay (optim.lr_decay_steps).
  """
  optim = config.optim
  learning_rate = optim.learning_rate
  if optim.lr_decay_steps:
    # Driven by optimizer.iterations, which checkpoints hold: a resumed run
    # continues the schedule where it stopped.
    learning_rate = keras.optimizers.schedules.CosineDecay(
      learning_rate, optim.lr_decay_steps
    )
  make = {
    "sgd": lambda: keras.optimizers.SGD(
      learning_rate, momentum=optim.momentum, nesterov=optim.nesterov
    ),
    "adam": lambda: keras.optimizers.Adam(learning_rate),
  }
  assert set(make) == set(_config.OPTIMIZERS)
  optimizer = make[optim.optimizer]()
  optimizer.build(model.trainable_variables)
  return optimizer


def make_checkpoint(model, **objects):
  """The tf.train.Checkpoint that training writes and restoring reads.

  Holds `model`, the flat list of the model's variables, and `objects`
  (training adds optimizer, step and best_accuracy). Keras 3 does not make
  layers kept in a list (such as the backbones' blocks) checkpoint
  dependencies of their owner, so `model` alone would miss their weights;
  the list, in the model's deterministic variable order, holds them all.

  Args:
    model: a built COMLN.
    **objects: other trackable objects to save with it.

  Returns:
    tf.train.Checkpoint.
  """
  return tf.train.Checkpoint(
    model=model, model_variables=list(model.variables), **objects
  )


def checkpoint_path(model_dir: str, which: str = "latest") -> str:
  """The path of a run's best, latest or "auto" checkpoint.

  Args:
    model_dir: str, a run's directory.
    which: "latest" (model_dir's CheckpointManager), "best" (the best
      validation accuracy, in model_dir/best) or "auto" (the best if the
      run has one, else the latest: a run that does not validate, or not
      yet).

  Returns:
    str, a checkpoint prefix for `tf.train.Checkpoint.restore`.

  Raises:
    ValueError: `which` is not one of CHECKPOINTS.
    FileNotFoundError: there is no such checkpoint.
  """
  if which not in CHECKPOINTS:
    raise ValueError(
      f"which must be one of {', '.join(CHECKPOINTS)}; got {which!r}."
    )
  if which == "auto":
    best = tf.train.latest_checkpoint(os.path.join(model_dir, BEST_DIR))
    return best or checkpoint_path(model_dir, "latest")
  directory = (
    model_dir if which == "latest" else os.path.join(model_dir, BEST_DIR)
  )
  path = tf.train.latest_checkpoint(directory)
  if path is None:
    raise FileNotFoundError(
      f"No {which} checkpoint in model_dir {model_dir!r}"
      + (
        ""
        if which == "latest"
        else " (the best checkpoint is written at validation, every "
        "config.schedule.validate_every steps)"
      )
      + "."
    )
  return path


def checkpoint_step(path):
  """The training step at which checkpoint `path` was written (int)."""
  return int(
    tf.train.load_checkpoint(path).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
  )


def model_from_checkpoint(
  config: ml_collections.ConfigDict, path: str, jit_compile: bool = False
) -> COMLN:
  """A model of `config` with the weights of checkpoint `path`.

  Args:
    config: the run's configuration.
    path: str, a checkpoint prefix written by training.
    jit_compile: XLA-compile the adaptation (see `build_model`).

  Returns:
    The built, restored COMLN.

  Raises:
    ValueError: the checkpoint was not written by `make_checkpoint`.
  """
  saved = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  if not any(name.startswith("model_variables/") for name in saved):
    raise ValueError(
      f"Checkpoint {path} has no model_variables: it was not written with "
      f"comln_tf.training.make_checkpoint, and tf.train.Checkpoint("
      f"model=model) alone does not save the backbone's weights (Keras 3 "
      f"does not track layers kept in lists)."
    )
  model = build_model(config, jit_compile=jit_compile)
  # Only the model: the optimizer and step in the checkpoint are not needed.
  initialize_from(model, path)
  return model


# What a model is: the shapes of its variables and the function they compute.
_ARCHITECTURE_FIELDS = (
  "model.backbone",
  "model.global_pool",
  "model.pool_last_block",
  "model.downsample",
  "data.example_shape",
  "model.tie_init_rows",
)


def init_checkpoint(config: ml_collections.ConfigDict) -> str:
  """The checkpoint that initializes a run with run.init_from, checked.

  Args:
    config: a configuration with data.example_shape and run.init_from (a
      model_dir).

  Returns:
    str, the "auto" checkpoint of config.run.init_from: its best, or its
    latest if it has no best (a run trained with validate_every=0, as with
    train_on_validation: its model is then its last one).

  Raises:
    ConfigError: naming config.run.init_from: no run or no checkpoint
      there, or a model of another architecture (backbone, example shape,
      tied rows; the number of ways unless the rows are tied).
  """
  init_from = config.run.init_from
  try:
    saved = load_config(init_from)
    path = checkpoint_path(init_from, "auto")
  except FileNotFoundError as error:
    raise ConfigError(f"config.run.init_from={init_from!r}: {error}") from (
      error
    )
  paths = _ARCHITECTURE_FIELDS + (
    () if config.model.tie_init_rows else ("data.ways",)
  )
  differences = [
    f"config.{path}={_config.get_field(config, path)!r} (there: "
    f"{_config.get_field(saved, path)!r})"
    for path in paths
    if _config.get_field(saved, path) != _config.get_field(config, path)
  ]
  if differences:
    raise ConfigError(
      f"config.run.init_from={init_from!r} holds a model of "
      f"another architecture: {'; '.join(differences)}."
    )
  return path


def initialize_from(model, path):
  """Sets the model's weights to those of checkpoint `path` (model only)."""
  status = make_checkpoint(model).restore(path)
  status.expect_partial().assert_existing_objects_matched()


def restore_model(
  model_dir: str, which: str = "latest"
) -> Tuple[COMLN, ml_collections.ConfigDict]:
  """Rebuilds a trained model from its model_dir.

  Args:
    model_dir: str, a run's directory (config.json and checkpoints).
    which: "latest", "best" or "auto" (see `checkpoint_path`).

  Returns:
    (COMLN with the checkpoint's weights, the run's configuration).

  Raises:
    FileNotFoundError: no config.json or no such checkpoint in model_dir.
  """
  config = load_config(model_dir)
  path = checkpoint_path(model_dir, which)
  return model_from_checkpoint(config, path), config
