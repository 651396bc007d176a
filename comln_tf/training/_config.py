"""Run configurations: defaults, validation, saving and resume checks.

A configuration is a flat dict whose keys are the flags of
`launch/train.py` (same names, same defaults), plus `example_shape`, which
training adds once the data is loaded. It is saved as `model_dir/config.json`
so that a model can be rebuilt from its model_dir alone.
"""

import json
import math
import os

import tensorflow as tf

from comln_tf import backbones
from comln_tf import data
from comln_tf import evaluation

CONFIG_FILE = "config.json"

DATASETS = data.available_sources()
BACKBONES = ("conv4", "resnet12", "identity")
DOWNSAMPLING = backbones.CONV4_DOWNSAMPLING
METHODS = ("forward", "backprop", "adjoint")
SOLVERS = ("dopri5", "rk4", "euler")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

DEFAULTS = {
    # Data.
    "dataset": "omniglot",
    "data_dir": None,
    "image_size": None,
    "rotations": False,
    # Train on the train and validation classes together (a final training,
    # as Snell et al. 2017); needs validate_every=0.
    "train_on_validation": False,
    "ways": 5,
    "shots": 1,
    "queries": 15,
    "meta_batch_size": 16,
    # Model.
    "backbone": "conv4",
    # Average the backbone's last feature map over space (d = its channels)
    # instead of flattening it.
    "global_pool": False,
    # Conv-4 only: max-pool after the fourth block too. False with
    # global_pool averages its whole map (at 28x28 the pooling keeps the
    # top-left 2x2 of the 3x3 map), as MAML's Omniglot Conv-4 does.
    "pool_last_block": True,
    # Conv-4 only: how each block halves its map, "max_pool" (the paper's)
    # or "stride" (stride-2 convolutions: MAML's Omniglot Conv-4, with
    # global_pool).
    "downsample": "max_pool",
    "initial_t": 1.0,
    # Meta-learn T. False: T stays at initial_t for the whole run, also with
    # init_from (the loaded run's T is replaced).
    "train_t": True,
    "tie_init_rows": False,
    "label_smoothing": 0.0,
    "method": "forward",
    "solver": "dopri5",
    "rtol": 1e-5,
    "atol": 1e-5,
    "solver_steps": None,
    "max_solver_steps": 10_000,
    # XLA-compile the adaptation (training and validation only; exports
    # stay XLA-free so that any TensorFlow Serving build can load them).
    "jit_compile": False,
    # Solve the tasks of a replica's batch in groups (None: all at once).
    "tasks_per_solve": None,
    # Optimization (the authors': SGD, Nesterov momentum 0.9, lr 0.1).
    "optimizer": "sgd",
    "learning_rate": 0.1,
    # Cosine decay of the learning rate to 0 over this many steps (None:
    # constant). Separate from `steps`, which a resumed run may change.
    "lr_decay_steps": None,
    # Scale the meta-gradient down to this global norm when it is larger
    # (None: no clipping).
    "clip_norm": None,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "seed": 0,
    # Start from the model of another run's best checkpoint (its model_dir;
    # the latest if that run did not validate); the optimizer, schedule and
    # step start fresh (None: new weights).
    "init_from": None,
    # Validation (picks the best checkpoint; 0 disables it).
    "validate_every": 500,
    "validation_episodes": 200,
    # How the run is carried out: these may change when a run is resumed.
    "steps": 2000,
    "log_every": 10,
    "checkpoint_every": 100,
    "keep_checkpoints": 3,
    "strategy": "default",
    "devices": None,
    "tpu": None,
}

# Keys that do not change what a run computes, so a resumed run may change
# them (e.g. more steps, another strategy: replicas give the same result;
# XLA or not, tasks solved in groups or not: the same computation, carried
# out differently).
RESUMABLE_KEYS = frozenset({
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "strategy",
    "devices", "tpu", "jit_compile", "tasks_per_solve",
})

_HELP_HINT = ("Pass the flags of the saved run to resume it, or use a new "
              "--model_dir")


class ConfigError(ValueError):
  """A bad configuration; the message names the flag(s) at fault."""


def _check_choice(config, key, choices):
  if config[key] not in choices:
    raise ConfigError(f"--{key} must be one of {', '.join(choices)}; got "
                      f"{config[key]!r}.")


def _check_int(config, key, minimum, optional=False):
  value = config[key]
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"--{key} must be an integer >= {minimum}; got "
                      f"{value!r}.")


def _check_float(config, key, low, high=math.inf, low_open=True):
  value = config[key]
  number = not isinstance(value, bool) and isinstance(value, (int, float))
  if not number or not (value > low if low_open else value >= low) or (
      not value < high):
    interval = f"{'(' if low_open else '['}{low}, {high})"
    raise ConfigError(f"--{key} must be a number in {interval}; got "
                      f"{value!r}.")


def validate_config(config):
  """Checks every value of a configuration.

  Args:
    config: dict with the keys of DEFAULTS (and optionally example_shape).

  Raises:
    ConfigError: naming the flag of the first bad value.
  """
  for key, choices in (("dataset", DATASETS), ("backbone", BACKBONES),
                       ("downsample", DOWNSAMPLING), ("method", METHODS),
                       ("solver", SOLVERS), ("optimizer", OPTIMIZERS),
                       ("strategy", STRATEGIES)):
    _check_choice(config, key, choices)
  for key, minimum in (("ways", 2), ("shots", 1), ("queries", 1),
                       ("meta_batch_size", 1), ("max_solver_steps", 1),
                       ("seed", 0), ("validate_every", 0),
                       ("validation_episodes", 1), ("steps", 1),
                       ("log_every", 1), ("checkpoint_every", 1),
                       ("keep_checkpoints", 1)):
    _check_int(config, key, minimum)
  _check_int(config, "image_size", 1, optional=True)
  _check_int(config, "solver_steps", 1, optional=True)
  _check_int(config, "tasks_per_solve", 1, optional=True)
  _check_int(config, "lr_decay_steps", 1, optional=True)
  if config["solver"] != "dopri5" and config["solver_steps"] is None:
    raise ConfigError(f"--solver={config['solver']} is a fixed-step solver: "
                      f"it needs --solver_steps.")
  for key in ("initial_t", "rtol", "atol", "learning_rate"):
    _check_float(config, key, 0.0)
  if config.get("clip_norm") is not None:
    _check_float(config, "clip_norm", 0.0)
  _check_float(config, "momentum", 0.0, 1.0, low_open=False)
  _check_float(config, "weight_decay", 0.0, low_open=False)
  _check_float(config, "label_smoothing", 0.0, 1.0, low_open=False)
  if config["backbone"] == "identity" and config["global_pool"]:
    raise ConfigError("--global_pool needs --backbone=conv4 or resnet12 (the "
                      "identity backbone has no feature map to pool).")
  if config["backbone"] != "conv4" and not config["pool_last_block"]:
    raise ConfigError(f"--nopool_last_block is for --backbone=conv4 only; got "
                      f"--backbone={config['backbone']}.")
  if config["downsample"] != "max_pool" and config["backbone"] != "conv4":
    raise ConfigError(f"--downsample is for --backbone=conv4 only; got "
                      f"--backbone={config['backbone']}.")
  if config["downsample"] == "stride" and not config["pool_last_block"]:
    raise ConfigError("--nopool_last_block is for --downsample=max_pool "
                      "(strided blocks do not pool).")
  if config["jit_compile"] and config["method"] == "backprop":
    raise ConfigError("--jit_compile needs --method=forward or adjoint (the "
                      "gradient of --method=backprop runs back through the "
                      "solver loop, which cannot leave an XLA function).")
  if config["jit_compile"] and config["tasks_per_solve"] is not None:
    raise ConfigError("--jit_compile and --tasks_per_solve cannot be combined "
                      "(the gradient of the grouped solve cannot leave an XLA "
                      "function); use one of them.")
  if config["init_from"] is not None and not (
      isinstance(config["init_from"], str) and config["init_from"]):
    raise ConfigError(f"--init_from must be the model_dir of a training run; "
                      f"got {config['init_from']!r}.")
  if config["train_on_validation"] and config["validate_every"]:
    raise ConfigError(
        f"--train_on_validation trains on the validation classes, so "
        f"validation cannot pick the best checkpoint: use --validate_every=0 "
        f"(got {config['validate_every']}) and evaluate the latest "
        f"checkpoint (launch.evaluate --checkpoint=latest).")
  if config["devices"] and config["strategy"] != "mirrored":
    raise ConfigError(f"--devices is for --strategy=mirrored only; got "
                      f"--strategy={config['strategy']}.")
  if config["tpu"] and config["strategy"] != "tpu":
    raise ConfigError(f"--tpu is for --strategy=tpu only; got "
                      f"--strategy={config['strategy']}.")


def make_config(**overrides):
  """A validated configuration: DEFAULTS updated with `overrides`.

  Args:
    **overrides: values of DEFAULTS' keys (and optionally example_shape).

  Returns:
    dict, a new configuration.

  Raises:
    ConfigError: unknown key or bad value.
  """
  unknown = sorted(set(overrides) - set(DEFAULTS) - {"example_shape"})
  if unknown:
    raise ConfigError(f"Unknown configuration keys: {', '.join(unknown)}.")
  config = {**DEFAULTS, **overrides}
  if config["devices"] is not None:
    config["devices"] = list(config["devices"])
  validate_config(config)
  return config


def save_config(model_dir, config):
  """Writes `config` to model_dir/config.json (atomically).

  Args:
    model_dir: str, the run's directory (created if needed).
    config: dict, a configuration (JSON-serializable values).
  """
  evaluation.write_json(os.path.join(model_dir, CONFIG_FILE), config)


def load_config(model_dir):
  """The configuration saved in model_dir/config.json.

  Args:
    model_dir: str, a run's directory.

  Returns:
    dict, the saved configuration; keys added to DEFAULTS after the run was
    saved get their defaults, which are what the run used.

  Raises:
    FileNotFoundError: no config.json in model_dir.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in model_dir {model_dir!r}: "
                            f"not the model_dir of a training run.")
  with tf.io.gfile.GFile(path) as f:
    return {**DEFAULTS, **json.load(f)}


def check_resume(saved, config, model_dir):
  """Raises unless `config` may continue the run saved with `saved`.

  Args:
    saved: dict, the configuration in model_dir/config.json.
    config: dict, the configuration of the new run.
    model_dir: str, for the message.

  Raises:
    ConfigError: naming every flag that differs (except RESUMABLE_KEYS).
  """
  differences = [
      f"--{key}={config.get(key)!r} (saved run: {saved.get(key)!r})"
      for key in sorted(set(saved) | set(config))
      if key not in RESUMABLE_KEYS and key in config and
      saved.get(key) != config.get(key)
  ]
  if differences:
    raise ConfigError(
        f"model_dir {model_dir!r} holds a run with other settings; "
        f"differing flags: {'; '.join(differences)}. {_HELP_HINT}.")
