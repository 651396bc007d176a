"""Configurations made real: their components built, checked, saved, loaded.

The schema and the checks of its fields are `comln_tf.config` (no
TensorFlow). Here each choice is checked by the component that owns it (the
data sources, backbones, gradient methods and solvers check their own names
and values): `validate_config` builds the components without weights, and
names the configuration fields behind any error. Training adds
`data.example_shape` once the data is loaded and saves the resolved
configuration as `model_dir/config.json`, so that a run can be rebuilt,
evaluated or resumed from its model_dir alone.
"""

from collections.abc import Callable, Mapping
import json
import os
import re
from typing import Any

import keras
import ml_collections
import tensorflow as tf

from comln_tf import backbones
from comln_tf import data
from comln_tf import evaluation
from comln_tf.config import CONFIG_FILE
from comln_tf.config import ConfigError
from comln_tf.config import check_fields
from comln_tf.config import default_config
from comln_tf.config import field_text
from comln_tf.config import flatten
from comln_tf.config import from_json
from comln_tf.config import merged
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN

# The fields behind each component's arguments: an error a component raises
# naming an argument is reported with the field it came from. The adaptation
# group's fields are the classifier's arguments of the same names.
_BACKBONE_FIELDS = {
  "backbone": "model.backbone",
  "global_pool": "model.global_pool",
  "pool_last_block": "model.pool_last_block",
  "downsample": "model.downsample",
}
_CLASSIFIER_FIELDS = {
  "num_ways": "data.ways",
  "tie_init_rows": "model.tie_init_rows",
  "initial_t": "model.initial_t",
  "train_t": "model.train_t",
  **{
    name: f"adaptation.{name}"
    for name in (
      "method",
      "solver",
      "rtol",
      "atol",
      "max_steps",
      "num_steps",
      "label_smoothing",
      "jit_compile",
      "tasks_per_solve",
    )
  },
}
_DISTORTION_FIELDS = {
  "rotation_degrees": "data.affine.rotation_degrees",
  "shear": "data.affine.shear",
  "scale": "data.affine.scale",
  "translation_pixels": "data.affine.translation_pixels",
}
_MODEL_FIELDS = {"weight_decay": "optim.weight_decay"}


def _building(
  config: ml_collections.ConfigDict,
  fields: Mapping[str, str],
  build: Callable[[], Any],
) -> Any:
  """`build()`, its ValueError re-raised as a ConfigError naming fields.

  The fields named are those whose component argument the message names
  (all of `fields` if it names none).
  """
  try:
    return build()
  except (ValueError, TypeError) as error:
    named = [
      path
      for argument, path in fields.items()
      if re.search(rf"\b{argument}\b", str(error))
    ] or list(fields.values())
    raise ConfigError(
      f"{', '.join(field_text(config, path) for path in named)}: {error}"
    ) from error


def make_backbone(config: ml_collections.ConfigDict) -> keras.layers.Layer:
  """The configured backbone layer (model group), unbuilt.

  Pooling options are passed only when set away from their defaults, so
  that a backbone without such an option refuses it by name.
  """
  defaults = default_config().model
  options = {
    name: config.model[name]
    for name in ("global_pool", "pool_last_block", "downsample")
    if config.model[name] != defaults[name]
  }
  return _building(
    config,
    _BACKBONE_FIELDS,
    lambda: backbones.get_backbone(config.model.backbone, **options),
  )


def make_classifier(
  config: ml_collections.ConfigDict, jit_compile: bool = False
) -> GradientFlowClassifier:
  """The configured GradientFlowClassifier (model and adaptation), unbuilt.

  Args:
    config: a configuration.
    jit_compile: XLA-compile the adaptation (off for exported models); it
      replaces config.adaptation.jit_compile.
  """
  model = config.model
  adaptation = {**config.adaptation.to_dict(), "jit_compile": jit_compile}
  return _building(
    config,
    _CLASSIFIER_FIELDS,
    lambda: GradientFlowClassifier(
      # Tied initial rows do not depend on the number of ways, so the model
      # can adapt to tasks with any number of ways.
      num_ways=None if model.tie_init_rows else config.data.ways,
      initial_t=model.initial_t,
      train_t=model.train_t,
      tie_init_rows=model.tie_init_rows,
      **adaptation,
    ),
  )


def make_comln(
  config: ml_collections.ConfigDict, jit_compile: bool = False
) -> COMLN:
  """The configured COMLN (backbone, classifier, weight decay), unbuilt."""
  backbone = make_backbone(config)
  classifier = make_classifier(config, jit_compile=jit_compile)
  return _building(
    config,
    _MODEL_FIELDS,
    lambda: COMLN(backbone, classifier, weight_decay=config.optim.weight_decay),
  )


def distortion(config: ml_collections.ConfigDict) -> data.AffineDistortion:
  """The run's data.AffineDistortion of training images (data.affine)."""
  return _building(
    config,
    _DISTORTION_FIELDS,
    lambda: data.AffineDistortion(**config.data.affine.to_dict()),
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a configuration: its fields, and its components built dry.

  Args:
    config: a configuration with the fields of `default_config()`.

  Raises:
    ConfigError: naming the field(s) of the first bad value.
  """
  check_fields(
    config,
    choices={
      "data.dataset": data.available_sources(),
      "data.class_sampling": data.CLASS_SAMPLING,
    },
  )
  distortion(config)
  make_comln(config, jit_compile=config.adaptation.jit_compile)


def make_config(
  overrides: Mapping[str, Any] | None = None,
  base: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """A validated configuration: `base` with `overrides`, over the defaults.

  Args:
    overrides: {"group.field": value}, e.g. {"data.ways": 20}.
    base: a (nested) configuration, e.g. an experiment file's
      `get_config()`; fields it lacks keep their defaults.

  Returns:
    A new, locked ConfigDict with the fields of `default_config()`.

  Raises:
    ConfigError: an unknown field or a bad value, named.
  """
  config = merged({**flatten(base or {}), **(overrides or {})})
  validate_config(config)
  return config


def save_config(model_dir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` to model_dir/config.json as nested JSON (atomically)."""
  evaluation.write_json(os.path.join(model_dir, CONFIG_FILE), config.to_dict())


# The end of the messages of a config.json that cannot be read.
_DAMAGED = (
  "restore it from a backup, or train in a new model_dir (a resumed run "
  "or an export needs its configuration)."
)


def _read_json(path: str) -> Any:
  """The JSON value of file `path`; a ConfigError naming it if not JSON."""
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ConfigError(
      f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
      f"column {error.colno}): {_DAMAGED}"
    ) from error
  except UnicodeDecodeError as error:
    raise ConfigError(
      f"{path} is not valid JSON (not UTF-8 text: {error.reason} at byte "
      f"{error.start}): {_DAMAGED}"
    ) from error


def load_config(model_dir: str) -> ml_collections.ConfigDict:
  """The configuration saved in model_dir/config.json (see `from_json`).

  Raises:
    FileNotFoundError: no config.json in model_dir.
    ConfigError: a config.json that is not a JSON object of configuration
      fields (damaged, cut short, edited by hand), naming the file.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f"No {CONFIG_FILE} in model_dir {model_dir!r}: "
      f"not the model_dir of a training run."
    )
  value = _read_json(path)
  if not isinstance(value, Mapping):
    kind = {list: "an array", str: "a string", bool: "a boolean"}.get(
      type(value), "a number" if isinstance(value, (int, float)) else "null"
    )
    raise ConfigError(
      f"{path} must hold a JSON object of configuration fields, got "
      f"{kind}: {_DAMAGED}"
    )
  try:
    return from_json(value)
  except ConfigError as error:
    raise ConfigError(f"{path}: {error}") from error
