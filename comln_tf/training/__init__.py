"""Meta-training of COMLN: configurations, strategies, the training loop.

Public API:
  train: meta-train (or resume) a run in a model_dir; DivergedError: it
    stopped because the loss, gradient norm or T became non-finite.
  make_config, validate_config, DEFAULTS, ConfigError: run configurations
    (flat dicts keyed by the flags of launch/train.py).
  load_config, save_config: model_dir/config.json.
  build_model, build_optimizer: a COMLN and its optimizer from a config.
  restore_model, model_from_checkpoint, checkpoint_path, checkpoint_step,
    make_checkpoint: a trained model from a model_dir (latest or best
    checkpoint).
  evaluate_run: the test protocol on a model_dir (accuracy, 95% interval,
    JSON).
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
  config = make_config(ways=5, shots=1, steps=1000, rotations=True)
  train(config, "runs/omniglot_5w1s")
  model, config = restore_model("runs/omniglot_5w1s", which="best")
"""

from comln_tf.training._config import BACKBONES
from comln_tf.training._config import CONFIG_FILE
from comln_tf.training._config import ConfigError
from comln_tf.training._config import DATASETS
from comln_tf.training._config import DEFAULTS
from comln_tf.training._config import DOWNSAMPLING
from comln_tf.training._config import METHODS
from comln_tf.training._config import OPTIMIZERS
from comln_tf.training._config import RESUMABLE_KEYS
from comln_tf.training._config import SOLVERS
from comln_tf.training._config import STRATEGIES
from comln_tf.training._config import check_resume
from comln_tf.training._config import load_config
from comln_tf.training._config import make_config
from comln_tf.training._config import save_config
from comln_tf.training._config import validate_config
from comln_tf.training._distribute import is_chief
from comln_tf.training._distribute import make_strategy
from comln_tf.training._evaluate import evaluate_run
from comln_tf.training._loop import DivergedError
from comln_tf.training._loop import check_episodes
from comln_tf.training._loop import load_data
from comln_tf.training._loop import load_splits
from comln_tf.training._loop import make_train_step
from comln_tf.training._loop import prepare_run
from comln_tf.training._loop import train
from comln_tf.training._models import BEST_DIR
from comln_tf.training._models import build_model
from comln_tf.training._models import build_optimizer
from comln_tf.training._models import checkpoint_path
from comln_tf.training._models import checkpoint_step
from comln_tf.training._models import make_checkpoint
from comln_tf.training._models import model_from_checkpoint
from comln_tf.training._models import restore_model

__all__ = [
    "BACKBONES", "BEST_DIR", "CONFIG_FILE", "ConfigError", "DATASETS",
    "DEFAULTS", "DOWNSAMPLING", "DivergedError", "METHODS", "OPTIMIZERS",
    "RESUMABLE_KEYS", "SOLVERS",
    "STRATEGIES", "build_model", "build_optimizer", "check_resume",
    "check_episodes", "checkpoint_path", "checkpoint_step", "evaluate_run",
    "is_chief", "load_config", "load_data", "load_splits", "make_checkpoint",
    "make_config",
    "make_strategy", "make_train_step", "model_from_checkpoint",
    "prepare_run", "restore_model", "save_config", "train",
    "validate_config",
]
