"""Building a COMLN model and its optimizer from a configuration; restoring."""

import os

import keras
import tensorflow as tf

from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN
from comln_tf.training._config import ConfigError
from comln_tf.training._config import load_config

BEST_DIR = "best"


def build_model(config, jit_compile=False):
  """A built COMLN model, with fresh weights, ready to train or restore.

  The weights are drawn from Keras' global random state: call
  `keras.utils.set_random_seed` first for reproducible ones.

  Args:
    config: a configuration with `example_shape` (the shape of one image,
      [H, W, C], or of one feature vector, [d]), as saved by training.
    jit_compile: XLA-compile the adaptation (see `GradientFlowClassifier`).
      Off for models that are exported.

  Returns:
    A built `COMLN`.
  """
  classifier = GradientFlowClassifier(
      # Tied initial rows do not depend on the number of ways, so the model
      # can adapt to tasks with any number of ways.
      num_ways=None if config["tie_init_rows"] else config["ways"],
      initial_t=config["initial_t"],
      train_t=config["train_t"],
      method=config["method"],
      solver=config["solver"],
      rtol=config["rtol"],
      atol=config["atol"],
      max_steps=config["max_solver_steps"],
      num_steps=config["solver_steps"],
      label_smoothing=config["label_smoothing"],
      tie_init_rows=config["tie_init_rows"],
      jit_compile=jit_compile,
      tasks_per_solve=config.get("tasks_per_solve"))
  model = COMLN(_backbone(config), classifier,
                weight_decay=config["weight_decay"])
  model.build({"support_images": (None, None) + tuple(config["example_shape"])})
  return model


def _backbone(config):
  """The configured backbone layer (with its pooling options)."""
  options = {}
  if config["backbone"] != "identity":
    options["global_pool"] = config["global_pool"]
  if config["backbone"] == "conv4":
    options["pool_last_block"] = config["pool_last_block"]
    options["downsample"] = config["downsample"]
  return backbones.get_backbone(config["backbone"], **options)


def build_optimizer(config, model):
  """The configured Keras optimizer, built for the model's trainable weights.

  It is built here, not at the first step, so that a checkpoint restores
  its slots (e.g. momentum) before training resumes.

  Args:
    config: a configuration.
    model: the built COMLN.

  Returns:
    keras.optimizers.SGD (momentum, Nesterov per config) or Adam, with a
    constant learning rate or a cosine decay (config lr_decay_steps).
  """
  learning_rate = config["learning_rate"]
  if config.get("lr_decay_steps"):
    # Driven by optimizer.iterations, which checkpoints hold: a resumed run
    # continues the schedule where it stopped.
    learning_rate = keras.optimizers.schedules.CosineDecay(
        learning_rate, config["lr_decay_steps"])
  if config["optimizer"] == "sgd":
    optimizer = keras.optimizers.SGD(learning_rate,
                                     momentum=config["momentum"],
                                     nesterov=config["nesterov"])
  else:
    optimizer = keras.optimizers.Adam(learning_rate)
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
  return tf.train.Checkpoint(model=model, model_variables=list(model.variables),
                             **objects)


def checkpoint_path(model_dir, which="latest"):
  """The path of a run's latest or best checkpoint.

  Args:
    model_dir: str, a run's directory.
    which: "latest" (model_dir's CheckpointManager) or "best" (the best
      validation accuracy, in model_dir/best).

  Returns:
    str, a checkpoint prefix for `tf.train.Checkpoint.restore`.

  Raises:
    ValueError: `which` is neither "latest" nor "best".
    FileNotFoundError: there is no such checkpoint.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}.")
  directory = model_dir if which == "latest" else os.path.join(model_dir,
                                                               BEST_DIR)
  path = tf.train.latest_checkpoint(directory)
  if path is None:
    raise FileNotFoundError(
        f"No {which} checkpoint in model_dir {model_dir!r}"
        + ("" if which == "latest" else
           " (the best checkpoint is written at validation, every "
           "--validate_every steps)") + ".")
  return path


def checkpoint_step(path):
  """The training step at which checkpoint `path` was written (int)."""
  return int(tf.train.load_checkpoint(path).get_tensor(
      "step/.ATTRIBUTES/VARIABLE_VALUE"))


def model_from_checkpoint(config, path, jit_compile=False):
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
        f"does not track layers kept in lists).")
  model = build_model(config, jit_compile=jit_compile)
  # Only the model: the optimizer and step in the checkpoint are not needed.
  initialize_from(model, path)
  return model


# What a model is: the shapes of its variables and the function they compute.
_ARCHITECTURE_KEYS = ("backbone", "global_pool", "pool_last_block",
                      "downsample", "example_shape", "tie_init_rows")


def init_checkpoint(config):
  """The checkpoint that initializes a run with --init_from, checked.

  Args:
    config: a configuration with example_shape and init_from (a model_dir).

  Returns:
    str, the best checkpoint of config["init_from"], or its latest if that
    run did not validate (--validate_every=0, as with
    --train_on_validation): its model is then its last one.

  Raises:
    ConfigError: naming --init_from: no run or no such checkpoint there, or
      a model of another architecture (backbone, example shape, tied rows;
      the number of ways unless the rows are tied).
  """
  init_from = config["init_from"]
  try:
    saved = load_config(init_from)
    path = checkpoint_path(init_from,
                           "best" if saved["validate_every"] else "latest")
  except FileNotFoundError as error:
    raise ConfigError(f"--init_from={init_from}: {error}") from error
  keys = _ARCHITECTURE_KEYS + (() if config["tie_init_rows"] else ("ways",))
  differences = [f"--{key}={config[key]!r} (there: {saved.get(key)!r})"
                 for key in keys if saved.get(key) != config[key]]
  if differences:
    raise ConfigError(f"--init_from={init_from} holds a model of another "
                      f"architecture: {'; '.join(differences)}.")
  return path


def initialize_from(model, path):
  """Sets the model's weights to those of checkpoint `path` (model only)."""
  status = make_checkpoint(model).restore(path)
  status.expect_partial().assert_existing_objects_matched()


def restore_model(model_dir, which="latest"):
  """Rebuilds a trained model from its model_dir.

  Args:
    model_dir: str, a run's directory (config.json and checkpoints).
    which: "latest" or "best" (see `checkpoint_path`).

  Returns:
    (COMLN with the checkpoint's weights, the run's configuration dict).

  Raises:
    FileNotFoundError: no config.json or no such checkpoint in model_dir.
  """
  config = load_config(model_dir)
  path = checkpoint_path(model_dir, which)
  return model_from_checkpoint(config, path), config
