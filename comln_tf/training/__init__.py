"""Meta-training of COMLN: configurations, strategies, the training loop.

Public API:
  train: meta-train (or resume) a run in a model_dir; DivergedError: it
    stopped because the loss, query logits, gradient norm or T became
    non-finite; DiskFullError: a checkpoint found no space to be written.
  default_config, make_config, validate_config, ConfigError: run
    configurations (ml_collections ConfigDicts in groups data, model,
    adaptation, optim, schedule, run; the schema is `comln_tf.config`,
    which needs no TensorFlow, re-exported here with flatten, get_field,
    updated, from_json, CONFIG_FILE, OPTIMIZERS, STRATEGIES and
    DERIVED_FIELDS).
  load_config, save_config, check_resume, RESUMABLE_FIELDS:
    model_dir/config.json and what a resumed run may change.
  process_runs: whether a process still runs (the model_dir lock's test).
  make_backbone, make_classifier, make_comln, build_model, build_optimizer:
    the components of a config (unbuilt), a built COMLN and its optimizer.
  restore_model, model_from_checkpoint, checkpoint_path, checkpoint_step,
    make_checkpoint, CHECKPOINTS: a trained model from a model_dir (best,
    latest, or "auto": the best if the run has one, else the latest).
  evaluate_run, evaluation_model: the test protocol on a model_dir
    (accuracy, 95% interval, JSON), and the model it evaluates.
  make_strategy, is_chief: tf.distribute set-up.
  load_splits, check_episodes, load_data, prepare_run, make_train_step:
    the parts of `train`.

Checkpoints are `make_checkpoint(model, optimizer=optimizer, step=step,
best_accuracy=best_accuracy)`, i.e. tf.train.Checkpoint(model=model,
model_variables=list(model.variables), ...): the latest ones in model_dir
(tf.train.CheckpointManager), the best one in model_dir/best. Restore a
model with `restore_model` (or `make_checkpoint(model).restore(path)`):
`tf.train.Checkpoint(model=model)` alone misses the backbone's weights.

Example:
  config = make_config({"data.ways": 5, "data.rotations": True,
                        "schedule.steps": 1000})
  train(config, "runs/omniglot_5w1s")
  model, config = restore_model("runs/omniglot_5w1s", which="auto")
"""

from comln_tf.config import CONFIG_FILE
from comln_tf.config import ConfigError
from comln_tf.config import DERIVED_FIELDS
from comln_tf.config import OPTIMIZERS
from comln_tf.config import RESUMABLE_FIELDS
from comln_tf.config import STRATEGIES
from comln_tf.config import check_resume
from comln_tf.config import default_config
from comln_tf.config import flatten
from comln_tf.config import from_json
from comln_tf.config import get_field
from comln_tf.config import updated
from comln_tf.training._checkpoints import BEST_DIR
from comln_tf.training._checkpoints import CHECKPOINTS
from comln_tf.training._checkpoints import DiskFullError
from comln_tf.training._checkpoints import checkpoint_path
from comln_tf.training._checkpoints import checkpoint_step
from comln_tf.training._checkpoints import make_checkpoint
from comln_tf.training._checkpoints import model_from_checkpoint
from comln_tf.training._checkpoints import restore_model
from comln_tf.training._config import load_config
from comln_tf.training._config import make_backbone
from comln_tf.training._config import make_classifier
from comln_tf.training._config import make_comln
from comln_tf.training._config import make_config
from comln_tf.training._config import save_config
from comln_tf.training._config import validate_config
from comln_tf.training._distribute import is_chief
from comln_tf.training._distribute import make_strategy
from comln_tf.training._evaluate import evaluate_run
from comln_tf.training._evaluate import evaluation_model
from comln_tf.training._lock import process_runs
from comln_tf.training._loop import check_episodes
from comln_tf.training._loop import load_data
from comln_tf.training._loop import load_splits
from comln_tf.training._loop import prepare_run
from comln_tf.training._loop import train
from comln_tf.training._models import build_model
from comln_tf.training._models import build_optimizer
from comln_tf.training._step import DivergedError
from comln_tf.training._step import make_train_step

__all__ = [
  "BEST_DIR",
  "CHECKPOINTS",
  "CONFIG_FILE",
  "ConfigError",
  "DERIVED_FIELDS",
  "DiskFullError",
  "DivergedError",
  "OPTIMIZERS",
  "RESUMABLE_FIELDS",
  "STRATEGIES",
  "build_model",
  "build_optimizer",
  "check_episodes",
  "check_resume",
  "checkpoint_path",
  "checkpoint_step",
  "default_config",
  "evaluate_run",
  "evaluation_model",
  "flatten",
  "from_json",
  "get_field",
  "is_chief",
  "load_config",
  "load_data",
  "load_splits",
  "make_backbone",
  "make_checkpoint",
  "make_classifier",
  "make_comln",
  "make_config",
  "make_strategy",
  "make_train_step",
  "model_from_checkpoint",
  "prepare_run",
  "process_runs",
  "restore_model",
  "save_config",
  "train",
  "updated",
  "validate_config",
]
