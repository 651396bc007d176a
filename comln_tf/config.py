"""Run configurations: the schema, its field checks, merging and resume checks.

A configuration is an `ml_collections.ConfigDict` whose groups follow the
architecture:

  data: the dataset and its episodes (N ways, k shots, queries, meta-batch,
    how classes are drawn, distortions of training images).
  model: the backbone and the classifier's starting point (W0, T).
  adaptation: the ODE solve of each task and its meta-gradient; its fields
    are the arguments of `comln_tf.layers.GradientFlowClassifier` of the
    same names.
  optim: the meta-optimizer.
  schedule: steps, validation, logs and checkpoints.
  run: seed, initialization from another run, distribution.

`default_config()` is the schema with its defaults; the experiment files in
`configs/` start from it. This module imports no TensorFlow, so that
configuration files load without it; `comln_tf.training` builds the
components a configuration names and checks them (`validate_config`).
"""

from collections.abc import Collection, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from comln_tf import _validation

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

# {old field path: its path now}: config.json files saved with the old names
# load with the new ones.
RENAMED_FIELDS = {
  "adaptation.solver_steps": "adaptation.num_steps",
  "adaptation.max_solver_steps": "adaptation.max_steps",
}


class ConfigError(ValueError):
  """A bad configuration; the message names the field(s) at fault."""


def _data_group() -> ml_collections.ConfigDict:
  """The dataset and its episodes."""
  d = ml_collections.ConfigDict()
  d.dataset = "omniglot"  # One of comln_tf.data.available_sources().
  # The dataset's files (for omniglot: a TFDS data dir; default
  # $TFDS_DATA_DIR).
  d.data_dir = config_dict.placeholder(str)
  d.image_size = config_dict.placeholder(int)  # None: the dataset's.
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
  d.example_shape = config_dict.placeholder(list)
  return d


def _model_group() -> ml_collections.ConfigDict:
  """The backbone and the classifier's starting point (W0, T)."""
  m = ml_collections.ConfigDict()
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
  return m


def _adaptation_group() -> ml_collections.ConfigDict:
  """The ODE solve of each task and its meta-gradient.

  Each field is the GradientFlowClassifier argument of the same name.
  """
  a = ml_collections.ConfigDict()
  # Meta-gradients: "auto" picks the cheapest exact method for the solver
  # (comln_tf.Auto); see comln_tf.GradientFlowClassifier for the others.
  a.method = "auto"
  a.solver = "dopri5"  # The ODE solver.
  a.rtol = 1e-5  # Tolerances of the adaptive solvers.
  a.atol = 1e-5
  a.num_steps = config_dict.placeholder(int)  # Of the fixed-step solvers.
  a.max_steps = 10_000  # Most steps of a solve before it fails.
  # XLA-compile the adaptation (training and validation only; exports stay
  # XLA-free so that any TensorFlow Serving build can load them).
  a.jit_compile = False
  # Solve the tasks of a replica's batch in groups (None: all at once).
  a.tasks_per_solve = config_dict.placeholder(int)
  a.label_smoothing = 0.0  # Of the support labels.
  return a


def _optim_group() -> ml_collections.ConfigDict:
  """The meta-optimizer: the authors' SGD, Nesterov momentum 0.9, lr 0.1."""
  o = ml_collections.ConfigDict()
  o.optimizer = "sgd"  # One of OPTIMIZERS.
  o.learning_rate = 0.1
  # Cosine decay of the learning rate to 0 over this many steps (None:
  # constant). Apart from schedule.steps, which a resumed run may change.
  o.lr_decay_steps = config_dict.placeholder(int)
  # Scale the meta-gradient (summed over replicas) down to this global norm
  # when it is larger (None: no clipping).
  o.clip_norm = config_dict.placeholder(float)
  o.momentum = 0.9
  o.nesterov = True
  o.weight_decay = 5e-4  # L2 on the backbone and W0, never on T.
  return o


def _schedule_group() -> ml_collections.ConfigDict:
  """Steps, validation, logs and checkpoints."""
  s = ml_collections.ConfigDict()
  s.steps = 2000  # Meta-training steps in total.
  # Steps between validations, which pick the best checkpoint (0: never).
  s.validate_every = 500
  s.validation_episodes = 200
  s.log_every = 10
  s.checkpoint_every = 100
  s.keep_checkpoints = 3
  return s


def _run_group() -> ml_collections.ConfigDict:
  """Seed, initialization from another run, distribution."""
  r = ml_collections.ConfigDict()
  r.seed = 0  # Of the initial weights and of the training episodes.
  # Start from the model of another run (its model_dir): its best
  # checkpoint, or its latest if it has none; the optimizer, schedule and
  # step start fresh (None: new weights).
  r.init_from = config_dict.placeholder(str)
  r.strategy = "default"  # One of STRATEGIES.
  # Devices of the mirrored strategy, e.g. ["/cpu:0", "/cpu:1"] (None: all
  # local GPUs).
  r.devices = config_dict.placeholder(tuple)
  r.tpu = config_dict.placeholder(str)  # TPU name or address ("local": VM).
  return r


def default_config() -> ml_collections.ConfigDict:
  """The configuration schema with its default values (locked: no new keys).

  Fields whose default is None are typed placeholders, so that they can be
  set from the command line (`--config.optim.clip_norm=2`).
  """
  config = ml_collections.ConfigDict()
  config.data = _data_group()
  config.model = _model_group()
  config.adaptation = _adaptation_group()
  config.optim = _optim_group()
  config.schedule = _schedule_group()
  config.run = _run_group()
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


def field_text(config: ml_collections.ConfigDict, path: str) -> str:
  """The text "config.group.field=value" by which errors name a field."""
  return f"config.{path}={get_field(config, path)!r}"


# The checks of single fields: {path: minimum} of the integers, the optional
# integers (None or >= 1), and the finite numbers > 0.
_INTEGERS = {
  "data.ways": 2,
  "data.shots": 1,
  "data.queries": 1,
  "data.meta_batch_size": 1,
  "adaptation.max_steps": 1,
  "run.seed": 0,
  "schedule.steps": 1,
  "schedule.validate_every": 0,
  "schedule.validation_episodes": 1,
  "schedule.log_every": 1,
  "schedule.checkpoint_every": 1,
  "schedule.keep_checkpoints": 1,
}
_OPTIONAL_INTEGERS = (
  "data.image_size",
  "adaptation.num_steps",
  "adaptation.tasks_per_solve",
  "optim.lr_decay_steps",
)
_POSITIVE = {"optim.learning_rate": False, "optim.clip_norm": True}


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """The integer and positive fields, and optim.momentum in [0, 1]."""
  for path, minimum in _INTEGERS.items():
    _validation.integer(
      f"config.{path}", get_field(config, path), minimum, error=ConfigError
    )
  for path in _OPTIONAL_INTEGERS:
    _validation.integer(
      f"config.{path}",
      get_field(config, path),
      1,
      optional=True,
      error=ConfigError,
    )
  for path, optional in _POSITIVE.items():
    _validation.positive(
      f"config.{path}",
      get_field(config, path),
      optional=optional,
      error=ConfigError,
    )
  _validation.in_range(
    "config.optim.momentum", config.optim.momentum, 0, 1, error=ConfigError
  )


def _check_combinations(config: ml_collections.ConfigDict) -> None:
  """The fields that depend on others, and run.init_from."""
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


def check_fields(
  config: ml_collections.ConfigDict,
  choices: Mapping[str, Collection[str]] | None = None,
) -> None:
  """Checks the fields of `config`: names, choices, numbers, combinations.

  The components a configuration names (backbones, solvers, ...) check
  their own arguments when `comln_tf.training.validate_config` builds them.

  Args:
    config: a configuration.
    choices: {path: the names it may take} of fields whose names live
      elsewhere (e.g. the datasets of comln_tf.data), checked first.

  Raises:
    ConfigError: naming the field(s) of the first bad value.
  """
  unknown = sorted(set(flatten(config)) ^ set(flatten(default_config())))
  if unknown:
    raise ConfigError(
      f"Unknown or missing configuration fields: {', '.join(unknown)}."
    )
  choices = {
    **(choices or {}),
    "optim.optimizer": OPTIMIZERS,
    "run.strategy": STRATEGIES,
  }
  for path, names in choices.items():
    _validation.one_of(
      f"config.{path}", get_field(config, path), names, error=ConfigError
    )
  _check_numbers(config)
  _check_combinations(config)


def merged(
  values: Mapping[str, Any], config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """`config` (default: the defaults) with the flat `values` set.

  Raises:
    ConfigError: a field the schema does not have, or a value of the wrong
      type.
  """
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


def updated(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields {"group.field": value} set.

  Not validated (e.g. for data.example_shape, which training sets).
  """
  return merged({**flatten(config), **values})


def _flat_file_paths() -> dict:
  """{key of a flat config.json: field path}: "ways": "data.ways",
  "affine_shear": "data.affine.shear", "solver_steps":
  "adaptation.num_steps"."""
  paths = [*flatten(default_config()), *RENAMED_FIELDS]
  return {
    path.split(".", 1)[1].replace(".", "_"): RENAMED_FIELDS.get(path, path)
    for path in paths
  }


def from_json(value: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The configuration of a config.json's content (not validated).

  Fields missing from it (added to the schema after the run was saved) get
  their defaults, which are what the run used. Fields of RENAMED_FIELDS are
  read under their new names, and flat files (keys named as the fields,
  without their group) are read too.

  Raises:
    ConfigError: a field the schema does not have.
  """
  if value and not any(isinstance(item, Mapping) for item in value.values()):
    paths = _flat_file_paths()
    unknown = sorted(set(value) - set(paths))
    if unknown:
      raise ConfigError(f"Unknown configuration keys: {', '.join(unknown)}.")
    return merged({paths[key]: item for key, item in value.items()})
  return merged(
    {
      RENAMED_FIELDS.get(path, path): item
      for path, item in flatten(value).items()
    }
  )


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
    f"{field_text(config, path)} (saved run: {saved_values[path]!r})"
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
