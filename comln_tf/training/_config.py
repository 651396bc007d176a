"""Run configurations: the schema, validation, saving and resume checks.

A configuration is an `ml_collections.ConfigDict` whose groups follow the
architecture:

  data: the dataset and its episodes (N ways, k shots, queries, meta-batch,
    how classes are drawn, distortions of training images).
  model: the backbone and the classifier's starting point (W0, T).
  adaptation: the ODE solve of each task and its meta-gradient.
  optim: the meta-optimizer.
  schedule: steps, validation, logs and checkpoints.
  run: seed, initialization from another run, distribution.

`default_config()` is the schema with its defaults; the experiment files in
`configs/` start from it. Training adds `data.example_shape` once the data
is loaded and saves the resolved configuration as `model_dir/config.json`,
so that a run can be rebuilt, evaluated or resumed from its model_dir alone.

Each choice is checked by the component that owns it (the data sources,
backbones, gradient methods and solvers check their own names and values):
`validate_config` builds the components without weights, and names the
configuration fields behind any error.
"""

import json
import math
import os
import re
from typing import Any, Mapping, Optional

import keras
import ml_collections
from ml_collections import config_dict
import tensorflow as tf

from comln_tf import backbones
from comln_tf import data
from comln_tf import evaluation
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN

CONFIG_FILE = "config.json"

# The meta-optimizers `build_optimizer` makes, and the tf.distribute
# strategies `make_strategy` makes (both read these).
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# Fields that do not change what a run computes, so a resumed run may change
# them (more steps; another strategy: replicas give the same result; XLA or
# not, tasks solved in groups or not: the same computation, carried out
# differently).
RESUMABLE_FIELDS = frozenset(
  {
    "schedule.steps",
    "schedule.log_every",
    "schedule.checkpoint_every",
    "schedule.keep_checkpoints",
    "run.strategy",
    "run.devices",
    "run.tpu",
    "adaptation.jit_compile",
    "adaptation.tasks_per_solve",
  }
)

# Set by training from the data, not by the user.
DERIVED_FIELDS = frozenset({"data.example_shape"})


class ConfigError(ValueError):
  """A bad configuration; the message names the field(s) at fault."""


def default_config() -> ml_collections.ConfigDict:
  """The configuration schema with its default values (locked: no new keys).

  Fields whose default is None are typed placeholders, so that they can be
  set from the command line (`--config.optim.clip_norm=2`).
  """
  placeholder = config_dict.placeholder
  config = ml_collections.ConfigDict()

  config.data = d = ml_collections.ConfigDict()
  d.dataset = "omniglot"  # One of comln_tf.data.available_sources().
  # The dataset's files (for omniglot: a TFDS data dir; default
  # $TFDS_DATA_DIR).
  d.data_dir = placeholder(str)
  d.image_size = placeholder(int)  # None: the dataset's (28 for omniglot).
  # Add the 90/180/270-degree rotations of every training class as classes.
  d.rotations = False
  # Train on the train and validation classes together (a final training,
  # as Snell et al. 2017); needs schedule.validate_every=0.
  d.train_on_validation = False
  d.ways = 5
  d.shots = 1
  d.queries = 15  # Per class.
  d.meta_batch_size = 16  # Episodes per step, over all replicas.
  # How episodes (training and validation) draw their classes: one of
  # comln_tf.data.CLASS_SAMPLING.
  d.class_sampling = "uniform"
  # Random affine distortions of training images (0: none); see
  # comln_tf.data.AffineDistortion.
  d.affine = ml_collections.ConfigDict()
  d.affine.rotation_degrees = 0.0
  d.affine.shear = 0.0
  d.affine.scale = 0.0
  d.affine.translation_pixels = 0.0
  # Shape of one example, [H, W, C] or [d]: set by training.
  d.example_shape = placeholder(list)

  config.model = m = ml_collections.ConfigDict()
  m.backbone = "conv4"  # One of the names of comln_tf.backbones.
  # Average the backbone's last feature map over space (d = its channels)
  # instead of flattening it.
  m.global_pool = False
  # Conv-4: max-pool after the fourth block too. False with global_pool
  # averages its whole map (at 28x28 the pooling keeps the top-left 2x2 of
  # the 3x3 map), as MAML's Omniglot Conv-4 does.
  m.pool_last_block = True
  # Conv-4: how each block halves its map, "max_pool" (the paper's) or
  # "stride" (with global_pool: MAML's Omniglot Conv-4).
  m.downsample = "max_pool"
  m.initial_t = 1.0
  # Meta-learn T. False: T stays at initial_t for the whole run, also with
  # run.init_from (the loaded run's T is replaced).
  m.train_t = True
  # One shared initial row of W0: the model adapts to any number of ways.
  m.tie_init_rows = False

  config.adaptation = a = ml_collections.ConfigDict()
  # Meta-gradients: "auto" picks the cheapest exact method for the solver
  # (comln_tf.Auto); see comln_tf.GradientFlowClassifier for the others.
  a.method = "auto"
  a.solver = "dopri5"  # The ODE solver.
  a.rtol = 1e-5  # Tolerances of the adaptive solvers.
  a.atol = 1e-5
  a.solver_steps = placeholder(int)  # Steps of the fixed-step solvers.
  a.max_solver_steps = 10_000  # Most steps of a solve before it fails.
  # XLA-compile the adaptation (training and validation only; exports stay
  # XLA-free so that any TensorFlow Serving build can load them).
  a.jit_compile = False
  # Solve the tasks of a replica's batch in groups (None: all at once).
  a.tasks_per_solve = placeholder(int)
  a.label_smoothing = 0.0  # Of the support labels.

  # The authors' optimizer: SGD, Nesterov momentum 0.9, lr 0.1.
  config.optim = o = ml_collections.ConfigDict()
  o.optimizer = "sgd"  # One of OPTIMIZERS.
  o.learning_rate = 0.1
  # Cosine decay of the learning rate to 0 over this many steps (None:
  # constant). Apart from schedule.steps, which a resumed run may change.
  o.lr_decay_steps = placeholder(int)
  # Scale the meta-gradient (summed over replicas) down to this global norm
  # when it is larger (None: no clipping).
  o.clip_norm = placeholder(float)
  o.momentum = 0.9
  o.nesterov = True
  o.weight_decay = 5e-4  # L2 on the backbone and W0, never on T.

  config.schedule = s = ml_collections.ConfigDict()
  s.steps = 2000  # Meta-training steps in total.
  # Steps between validations, which pick the best checkpoint (0: never).
  s.validate_every = 500
  s.validation_episodes = 200
  s.log_every = 10
  s.checkpoint_every = 100
  s.keep_checkpoints = 3

  config.run = r = ml_collections.ConfigDict()
  r.seed = 0  # Of the initial weights and of the training episodes.
  # Start from the model of another run (its model_dir): its best
  # checkpoint, or its latest if it has none; the optimizer, schedule and
  # step start fresh (None: new weights).
  r.init_from = placeholder(str)
  r.strategy = "default"  # One of STRATEGIES.
  # Devices of the mirrored strategy, e.g. ["/cpu:0", "/cpu:1"] (None: all
  # local GPUs).
  r.devices = placeholder(tuple)
  r.tpu = placeholder(str)  # TPU name or address ("local" on a TPU VM).
  config.lock()
  return config


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict:
  """{"group.field": value} of a (nested) configuration."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value of field `path` ("group.field") of `config`."""
  for key in path.split("."):
    config = config[key]
  return config


def _field(path, value):
  return f"config.{path}={value!r}"


def _check_int(config, path, minimum, optional=False):
  value = get_field(config, path)
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(
      f"config.{path} must be an integer >= {minimum}"
      f"{' or None' if optional else ''}; got {value!r}."
    )


def _check_positive(config, path, optional=False):
  value = get_field(config, path)
  if optional and value is None:
    return
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float))
    or not 0 < value < math.inf
  ):
    raise ConfigError(
      f"config.{path} must be a finite number > 0"
      f"{' or None' if optional else ''}; got {value!r}."
    )


def _check_choice(config, path, choices):
  value = get_field(config, path)
  if value not in choices:
    raise ConfigError(
      f"config.{path} must be one of {', '.join(choices)}; got {value!r}."
    )


# The fields behind each component's arguments: an error a component raises
# naming an argument is reported with the field it came from.
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
  "method": "adaptation.method",
  "solver": "adaptation.solver",
  "rtol": "adaptation.rtol",
  "atol": "adaptation.atol",
  "max_steps": "adaptation.max_solver_steps",
  "num_steps": "adaptation.solver_steps",
  "label_smoothing": "adaptation.label_smoothing",
  "jit_compile": "adaptation.jit_compile",
  "tasks_per_solve": "adaptation.tasks_per_solve",
}
_DISTORTION_FIELDS = {
  "rotation_degrees": "data.affine.rotation_degrees",
  "shear": "data.affine.shear",
  "scale": "data.affine.scale",
  "translation_pixels": "data.affine.translation_pixels",
}
_MODEL_FIELDS = {"weight_decay": "optim.weight_decay"}


def _building(config, fields, build):
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
      f"{', '.join(_field(path, get_field(config, path)) for path in named)}"
      f": {error}"
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
    jit_compile: XLA-compile the adaptation (off for exported models).
  """
  model, adaptation = config.model, config.adaptation
  return _building(
    config,
    _CLASSIFIER_FIELDS,
    lambda: GradientFlowClassifier(
      # Tied initial rows do not depend on the number of ways, so the model
      # can adapt to tasks with any number of ways.
      num_ways=None if model.tie_init_rows else config.data.ways,
      initial_t=model.initial_t,
      train_t=model.train_t,
      method=adaptation.method,
      solver=adaptation.solver,
      rtol=adaptation.rtol,
      atol=adaptation.atol,
      max_steps=adaptation.max_solver_steps,
      num_steps=adaptation.solver_steps,
      label_smoothing=adaptation.label_smoothing,
      tie_init_rows=model.tie_init_rows,
      jit_compile=jit_compile,
      tasks_per_solve=adaptation.tasks_per_solve,
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
  unknown = sorted(set(flatten(config)) ^ set(flatten(default_config())))
  if unknown:
    raise ConfigError(
      f"Unknown or missing configuration fields: {', '.join(unknown)}."
    )
  _check_choice(config, "data.dataset", data.available_sources())
  _check_choice(config, "data.class_sampling", data.CLASS_SAMPLING)
  _check_choice(config, "optim.optimizer", OPTIMIZERS)
  _check_choice(config, "run.strategy", STRATEGIES)
  for path, minimum in (
    ("data.ways", 2),
    ("data.shots", 1),
    ("data.queries", 1),
    ("data.meta_batch_size", 1),
    ("adaptation.max_solver_steps", 1),
    ("run.seed", 0),
    ("schedule.steps", 1),
    ("schedule.validate_every", 0),
    ("schedule.validation_episodes", 1),
    ("schedule.log_every", 1),
    ("schedule.checkpoint_every", 1),
    ("schedule.keep_checkpoints", 1),
  ):
    _check_int(config, path, minimum)
  for path in (
    "data.image_size",
    "adaptation.solver_steps",
    "adaptation.tasks_per_solve",
    "optim.lr_decay_steps",
  ):
    _check_int(config, path, 1, optional=True)
  _check_positive(config, "optim.learning_rate")
  _check_positive(config, "optim.clip_norm", optional=True)
  momentum = config.optim.momentum
  if isinstance(momentum, bool) or not 0 <= momentum <= 1:
    raise ConfigError(
      f"config.optim.momentum must be a number in [0, 1]; got {momentum!r}."
    )
  init_from = config.run.init_from
  if init_from is not None and not (isinstance(init_from, str) and init_from):
    raise ConfigError(
      f"config.run.init_from must be the model_dir of a "
      f"training run or None; got {init_from!r}."
    )
  if config.data.train_on_validation and config.schedule.validate_every:
    raise ConfigError(
      f"config.data.train_on_validation trains on the validation classes, "
      f"so validation cannot pick the best checkpoint: set "
      f"config.schedule.validate_every=0 (got "
      f"{config.schedule.validate_every}); the latest checkpoint is the "
      f"run's model."
    )
  if config.run.devices and config.run.strategy != "mirrored":
    raise ConfigError(
      f"config.run.devices is for config.run.strategy="
      f"'mirrored' only; got {config.run.strategy!r}."
    )
  if config.run.tpu and config.run.strategy != "tpu":
    raise ConfigError(
      f"config.run.tpu is for config.run.strategy='tpu' "
      f"only; got {config.run.strategy!r}."
    )
  distortion(config)
  make_comln(config, jit_compile=config.adaptation.jit_compile)


def _merged(
  values: Mapping[str, Any], config: Optional[ml_collections.ConfigDict] = None
) -> ml_collections.ConfigDict:
  """`config` (default: the defaults) with the flat `values` set."""
  config = default_config() if config is None else config
  for path, value in values.items():
    parent, _, key = path.rpartition(".")
    try:
      group = get_field(config, parent) if parent else config
      if not isinstance(group, ml_collections.ConfigDict) or key not in group:
        raise KeyError(path)
      group[key] = value
    except KeyError as error:
      raise ConfigError(f"Unknown configuration field config.{path}.") from (
        error
      )
    except TypeError as error:
      raise ConfigError(f"config.{path}={value!r}: {error}") from error
  return config


def make_config(
  overrides: Optional[Mapping[str, Any]] = None,
  base: Optional[Mapping[str, Any]] = None,
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
  config = _merged({**flatten(base or {}), **(overrides or {})})
  validate_config(config)
  return config


def save_config(model_dir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` to model_dir/config.json as nested JSON (atomically)."""
  evaluation.write_json(os.path.join(model_dir, CONFIG_FILE), config.to_dict())


def _legacy_paths():
  """{flat key of older config.json files: field path}: "ways": "data.ways",
  "affine_shear": "data.affine.shear"."""
  return {
    path.split(".", 1)[1].replace(".", "_"): path
    for path in flatten(default_config())
  }


def from_json(value: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The configuration of a config.json's content (not validated).

  Fields missing from it (added to the schema after the run was saved) get
  their defaults, which are what the run used. The flat files of older
  versions (keys named as the fields, without their group) are read too.

  Raises:
    ConfigError: a field the schema does not have.
  """
  if value and not any(isinstance(item, Mapping) for item in value.values()):
    legacy = _legacy_paths()
    unknown = sorted(set(value) - set(legacy))
    if unknown:
      raise ConfigError(f"Unknown configuration keys: {', '.join(unknown)}.")
    return _merged({legacy[key]: item for key, item in value.items()})
  return _merged(flatten(value))


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
  damaged = (
    "restore it from a backup, or train in a new model_dir (a resumed run "
    "or an export needs its configuration)."
  )
  try:
    with tf.io.gfile.GFile(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as error:
    raise ConfigError(
      f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
      f"column {error.colno}): {damaged}"
    ) from error
  except UnicodeDecodeError as error:
    raise ConfigError(
      f"{path} is not valid JSON (not UTF-8 text: {error.reason} at byte "
      f"{error.start}): {damaged}"
    ) from error
  if not isinstance(value, Mapping):
    kind = {list: "an array", str: "a string", bool: "a boolean"}.get(
      type(value), "a number" if isinstance(value, (int, float)) else "null"
    )
    raise ConfigError(
      f"{path} must hold a JSON object of configuration fields, got "
      f"{kind}: {damaged}"
    )
  try:
    return from_json(value)
  except ConfigError as error:
    raise ConfigError(f"{path}: {error}") from error


def check_resume(
  saved: ml_collections.ConfigDict,
  config: ml_collections.ConfigDict,
  model_dir: str,
) -> None:
  """Raises unless `config` may continue the run saved with `saved`.

  Fields in RESUMABLE_FIELDS may differ, and DERIVED_FIELDS that `config`
  does not set yet.

  Raises:
    ConfigError: naming every other field that differs.
  """
  saved_values, values = flatten(saved), flatten(config)
  differences = [
    f"{_field(path, values[path])} (saved run: {saved_values[path]!r})"
    for path in sorted(values)
    if path not in RESUMABLE_FIELDS
    and saved_values[path] != values[path]
    and not (path in DERIVED_FIELDS and values[path] is None)
  ]
  if differences:
    raise ConfigError(
      f"model_dir {model_dir!r} holds a run with other settings; "
      f"differing fields: {'; '.join(differences)}. Resume it with its "
      f"saved configuration, or use a new model_dir."
    )


def updated(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields {"group.field": value} set.

  Not validated (e.g. for data.example_shape, which training sets).
  """
  return _merged({**flatten(config), **values})
