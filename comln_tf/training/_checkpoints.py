"""A run's checkpoints: writing, finding, checking and restoring them.

Checkpoints are `make_checkpoint(model, optimizer=..., step=...,
best_accuracy=...)`: the latest ones in model_dir, the best one (of the
validation accuracy) in model_dir/best, each written by a
tf.train.CheckpointManager (`Saver`).

Resuming reads the newest checkpoint that is intact: its index and every
data shard present and readable (every tensor read back). A damaged or
partly missing one (deleted `ckpt-N.index`, truncated data, a `checkpoint`
state file that is gone or names missing files) is set aside with a
warning naming its files, and the run resumes from the newest intact one;
with checkpoints but none intact it stops with an error. The state file is
then rewritten to list the intact checkpoints only, so the
CheckpointManager's pruning (max_to_keep) never spends a slot on a damaged
one, and never deletes an intact one because of it.
"""

from collections.abc import Callable, Sequence
import dataclasses
import errno
import glob
import logging
import os
import re
from typing import Any

import ml_collections
import tensorflow as tf

from comln_tf.config import ConfigError
from comln_tf.config import get_field
from comln_tf.model import COMLN
from comln_tf.training import _distribute
from comln_tf.training._config import load_config
from comln_tf.training._models import build_model

_LOG = logging.getLogger(__name__)

STATE_FILE = "checkpoint"
DAMAGED_SUFFIX = ".damaged"
BEST_DIR = "best"
# Which checkpoint of a run: "best" (validation), "latest", or "auto": the
# best if the run has one, else the latest (evaluation and export default
# to it, so that what is evaluated is what is served).
CHECKPOINTS = ("auto", "best", "latest")

_CHECKPOINT_FILE = re.compile(r"^(ckpt-(\d+))\.(index|data-\d+-of-(\d+))$")


class CheckpointError(ConfigError):
  """No intact checkpoint to resume from, though checkpoints exist."""


class DiskFullError(RuntimeError):
  """A checkpoint could not be written: no space left on its device."""


def make_checkpoint(model: COMLN, **objects: Any) -> tf.train.Checkpoint:
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


# Checking the checkpoints of a directory.


@dataclasses.dataclass(frozen=True)
class Found:
  """A checkpoint on disk: its step, prefix and files."""

  step: int
  prefix: str
  files: tuple[str, ...]


def _on_disk(directory: str) -> list[Found]:
  """Checkpoints `ckpt-<step>.*` in `directory`, newest first."""
  files: dict[int, list[str]] = {}
  for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*")):
    match = _CHECKPOINT_FILE.match(os.path.basename(path))
    if match:
      files.setdefault(int(match.group(2)), []).append(path)
  return [
    Found(step, os.path.join(directory, f"ckpt-{step}"), tuple(sorted(paths)))
    for step, paths in sorted(files.items(), reverse=True)
  ]


def problems(prefix: str) -> list[str]:
  """What is wrong with checkpoint `prefix`: [] when it is intact.

  Intact: the index exists, every data shard it needs exists, and every
  tensor reads back (a truncated data file fails there).

  Args:
    prefix: a checkpoint prefix, e.g. model_dir/ckpt-100.

  Returns:
    List of messages, each naming a file.
  """
  index = f"{prefix}.index"
  found = []
  if not os.path.isfile(index):
    found.append(f"{index} is missing")
  shards = glob.glob(f"{glob.escape(prefix)}.data-*-of-*")
  if not shards:
    found.append(f"{prefix}.data-* is missing")
  else:
    total = int(shards[0].rsplit("-of-", 1)[1])
    for shard in range(total):
      name = f"{prefix}.data-{shard:05d}-of-{total:05d}"
      if not os.path.isfile(name):
        found.append(f"{name} is missing")
  if found:
    return found
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as error:  # pylint: disable=broad-except
    # Truncated or corrupted files fail in many ways (IndexError,
    # DataLossError, OutOfRangeError...): any is damage.
    first_line = str(error).strip().splitlines() or [type(error).__name__]
    return [
      f"{prefix}.{{index,data-*}} cannot be read "
      f"({type(error).__name__}: {first_line[0][:200]})"
    ]
  return []


def _set_aside(found: Found) -> list[str]:
  """Renames a damaged checkpoint's files to *.damaged; returns the new names.

  Kept, not deleted: they are evidence, and a later save of the same step
  must not mix with them.
  """
  moved = []
  for path in found.files:
    target = path + DAMAGED_SUFFIX
    os.replace(path, target)
    moved.append(target)
  return moved


def _state_paths(directory: str) -> list[str]:
  """Checkpoint prefixes the state file lists (all_model_checkpoint_paths)."""
  try:
    state = tf.train.get_checkpoint_state(directory)
  except Exception:  # pylint: disable=broad-except
    return []  # An unreadable state file is rebuilt from the files on disk.
  if state is None:
    return []
  paths = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
    paths.append(state.model_checkpoint_path)
  return [
    path if os.path.isabs(path) else os.path.join(directory, path)
    for path in paths
  ]


def _first_intact(
  on_disk: Sequence[Found], restore: Callable[[str], None] | None
) -> tuple[Found | None, list[Found], list[str]]:
  """The newest intact checkpoint, the damaged ones newer, their problems."""
  bad: list[Found] = []
  damaged: list[str] = []
  for found in on_disk:
    issues = problems(found.prefix)
    if not issues and restore is not None:
      try:
        restore(found.prefix)
      except Exception as error:  # pylint: disable=broad-except
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        issues = [
          f"{found.prefix} does not restore "
          f"({type(error).__name__}: {first_line})"
        ]
    if not issues:
      return found, bad, damaged
    damaged.extend(issues)
    bad.append(found)
  return None, bad, damaged


def _rewrite_state(
  directory: str, on_disk: Sequence[Found], chosen: Found
) -> None:
  """Makes the state file list the intact checkpoints up to `chosen`.

  The CheckpointManager created next prunes (max_to_keep) from this list,
  and must not count a damaged checkpoint in it. With their times: the
  manager prunes only checkpoints younger than last_preserved_timestamp
  (without times, it would keep them forever).
  """
  intact = [
    found.prefix for found in reversed(on_disk) if found.step <= chosen.step
  ]
  times = [os.path.getmtime(f"{prefix}.index") for prefix in intact]
  tf.compat.v1.train.update_checkpoint_state(
    directory,
    chosen.prefix,
    all_model_checkpoint_paths=intact,
    all_model_checkpoint_timestamps=times,
    last_preserved_timestamp=min(times) - 1.0,
  )


def latest_intact(
  directory: str,
  restore: Callable[[str], None] | None = None,
  modify: bool = True,
) -> str | None:
  """The newest intact checkpoint of `directory`, damaged ones set aside.

  Candidates are the checkpoints on disk and those the state file lists.
  Each damaged one, newer than the one chosen, is renamed to *.damaged and
  named in a warning. The state file is rewritten to list the intact
  checkpoints up to the chosen one.

  Args:
    directory: where a CheckpointManager writes (model_dir, or model_dir/
      best).
    restore: optional callable(prefix) that restores the checkpoint into
      the run's objects; raising counts as damage and the next older one is
      tried.
    modify: set damaged checkpoints aside and rewrite the state file (the
      chief); False only reads (the other workers of a multi-worker run,
      which must pick the same checkpoint but not touch the chief's files).

  Returns:
    The prefix of the checkpoint restored (or to restore), or None if the
    directory holds no checkpoint at all.

  Raises:
    CheckpointError: checkpoints exist but none is intact.
  """
  if not os.path.isdir(directory):
    return None
  on_disk = _on_disk(directory)
  known = {found.prefix for found in on_disk}
  damaged = [
    f"{prefix}: listed in {os.path.join(directory, STATE_FILE)}"
    f" but no file is left"
    for prefix in sorted(set(_state_paths(directory)) - known)
  ]
  chosen, bad, issues = _first_intact(on_disk, restore)
  damaged.extend(issues)
  if damaged and chosen is None:
    # Left in place: set aside, they would look like no checkpoint at
    # all, and a rerun would start from step 0.
    raise CheckpointError(
      f"No intact checkpoint in {directory!r} to resume from: "
      f"{'; '.join(damaged)}. Restore the files from a backup, or train "
      f"in a new model_dir."
    )
  if chosen is None:
    return None
  if damaged:
    if modify:
      for found in bad:
        damaged.append(f"set aside as {', '.join(_set_aside(found))}")
    _LOG.warning(
      "Damaged checkpoints in %s: %s. Resuming from the newest "
      "intact one, %s (step %d).",
      directory,
      "; ".join(damaged),
      chosen.prefix,
      chosen.step,
    )
  if modify and (
    damaged or not os.path.isfile(os.path.join(directory, STATE_FILE))
  ):
    _rewrite_state(directory, on_disk, chosen)
  return chosen.prefix


# Finding a run's checkpoints.


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


def checkpoint_step(path: str) -> int:
  """The training step at which checkpoint `path` was written."""
  return int(
    tf.train.load_checkpoint(path).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
  )


def recorded_value(prefix: str, name: str) -> float | None:
  """A scalar variable of a checkpoint (e.g. best_accuracy), or None."""
  try:
    return float(
      tf.train.load_checkpoint(prefix).get_tensor(
        f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
      )
    )
  except Exception:  # pylint: disable=broad-except
    return None


# Models from checkpoints.


def initialize_from(model: COMLN, path: str) -> None:
  """Sets the model's weights to those of checkpoint `path` (model only)."""
  status = make_checkpoint(model).restore(path)
  status.expect_partial().assert_existing_objects_matched()


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


def restore_model(
  model_dir: str, which: str = "latest"
) -> tuple[COMLN, ml_collections.ConfigDict]:
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
    f"config.{path}={get_field(config, path)!r} (there: "
    f"{get_field(saved, path)!r})"
    for path in paths
    if get_field(saved, path) != get_field(config, path)
  ]
  if differences:
    raise ConfigError(
      f"config.run.init_from={init_from!r} holds a model of "
      f"another architecture: {'; '.join(differences)}."
    )
  return path


# Saving a run's checkpoints.

# Errors of a write that found no space: TensorFlow reports ENOSPC and
# EDQUOT as ResourceExhaustedError, Python as OSError.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _save_or_explain(manager: tf.train.CheckpointManager, step: int) -> str:
  """`manager.save(checkpoint_number=step)`, with a clear disk-full error.

  Args:
    manager: a tf.train.CheckpointManager.
    step: the checkpoint's number.

  Returns:
    The prefix of the checkpoint written.

  Raises:
    DiskFullError: no space left where the checkpoint is written (naming
      that directory and what to do).
  """
  try:
    return manager.save(checkpoint_number=step)
  except (tf.errors.ResourceExhaustedError, OSError) as error:
    if isinstance(error, OSError) and error.errno not in _NO_SPACE:
      raise
    message = getattr(error, "message", None) or str(error)
    first_line = (message.strip().splitlines() or [type(error).__name__])[0]
    raise DiskFullError(
      f"Disk full at {manager.directory}: the checkpoint of step {step} "
      f"could not be written ({first_line[:200]}). Free space and rerun "
      f"with the same --model_dir: training resumes from the last intact "
      f"checkpoint."
    ) from error


class Saver:
  """Saves the latest and the best checkpoints, the multi-worker way.

  Every worker saves (TensorFlow's convention: saving may need collective
  ops); the chief into model_dir (latest) and model_dir/best, the others
  into a temporary directory that is deleted at once.

  A CheckpointManager writes a checkpoint completely (data files, then the
  index) before it updates its `checkpoint` state file, and it replaces
  that file atomically (temporary file + rename); old checkpoints are
  deleted only after. So a run killed at any point leaves a state file
  naming only complete checkpoints, for the latest and the best alike. A
  save that finds the disk full raises `DiskFullError`.
  """

  def __init__(
    self,
    checkpoint: tf.train.Checkpoint,
    model_dir: str,
    strategy: tf.distribute.Strategy,
    keep: int,
  ):
    self._chief = _distribute.is_chief(strategy)
    self._root = _distribute.worker_dir(model_dir, strategy)
    self._latest = tf.train.CheckpointManager(
      checkpoint, self._root, max_to_keep=keep
    )
    self._best = tf.train.CheckpointManager(
      checkpoint, os.path.join(self._root, BEST_DIR), max_to_keep=1
    )
    # The step of the last save_latest of this run.
    self.latest_step: int | None = None

  def _save(self, manager, step):
    path = _save_or_explain(manager, step)
    if not self._chief:
      tf.io.gfile.rmtree(self._root)
    return path

  def save_latest(self, step: int) -> str:
    """Saves the latest checkpoint of `step`; returns its prefix."""
    path = self._save(self._latest, step)
    self.latest_step = step
    return path

  def save_best(self, step: int) -> str:
    """Saves the best checkpoint (model_dir/best) of `step`."""
    return self._save(self._best, step)


# Resuming a run.


def _best_without_latest(model_dir: str, best: str) -> str:
  """The message of a model_dir with a best/ checkpoint and no latest one."""
  recorded = recorded_value(best, "best_accuracy")
  accuracy = "" if recorded is None else f", validation accuracy {recorded:.4f}"
  return (
    f"model_dir {model_dir!r} holds a best checkpoint ({best}{accuracy}) "
    f"but no checkpoint to resume from (ckpt-* and its "
    f"{STATE_FILE!r} file are gone): training would start "
    f"again from step 0 and replace the best model. To resume, put the "
    f"run's ckpt-* files and {STATE_FILE!r} back; to start "
    f"over, delete {os.path.join(model_dir, BEST_DIR)!r} or use a "
    f"new --model_dir."
  )


def resume(
  checkpoint: tf.train.Checkpoint,
  best_accuracy: tf.Variable,
  model_dir: str,
  chief: bool = True,
) -> str | None:
  """Restores the newest intact checkpoint of model_dir into `checkpoint`.

  A resumed run continues from its own checkpoint, whether or not it
  started with run.init_from. Damaged checkpoints are set aside with a
  warning (`latest_intact`, on the chief); checkpoints of which none is
  intact stop the run (CheckpointError), never a restart from step 0.

  best/ is replaced only by a better model: the best accuracy is the one
  recorded with the model in best/ (after a fallback to an older
  checkpoint, the restored record may be lower; after a crash between the
  saves of a step, higher than what best/ holds), and a model_dir with a
  best/ checkpoint but no checkpoint to resume from (ckpt-* deleted) is
  refused rather than trained again from step 0, which would replace the
  best model by the first, worse, one validated. To start over, delete
  best/ or use a new model_dir.

  Call it before creating the run's Saver: it may rewrite the state files
  its CheckpointManagers read.

  Args:
    checkpoint: the run's `make_checkpoint(...)`, with its best_accuracy.
    best_accuracy: float32 tf.Variable, the best validation accuracy:
      set to best/'s record (-1 without best/).
    model_dir: str, the run's directory.
    chief: whether this worker may set damaged checkpoints aside.

  Returns:
    The prefix of the checkpoint restored, or None (nothing to resume).

  Raises:
    CheckpointError: checkpoints of which none is intact, or a best/
      checkpoint without any to resume from.
  """

  def restore(path):
    checkpoint.restore(path).assert_consumed()

  best = latest_intact(os.path.join(model_dir, BEST_DIR), modify=chief)
  path = latest_intact(model_dir, restore=restore, modify=chief)
  if path is None:
    if best is not None:
      raise CheckpointError(_best_without_latest(model_dir, best))
    return None
  recorded = None if best is None else recorded_value(best, "best_accuracy")
  if best is None:
    best_accuracy.assign(-1.0)
  elif recorded is not None:
    best_accuracy.assign(recorded)
  return path
