"""The meta-training loop: distributed steps, checkpoints, validation, logs.

Resume-exactness: the state that determines the rest of a run is the model,
the optimizer (slots and iteration count) and the step, all in the
checkpoint; episode i of the training stream is a pure function of
(seed, i), so a run resumed at step k reads the meta-batches an
uninterrupted run reads from step k on.
"""

import dataclasses
import datetime
import errno
import logging
import math
import os
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
import tqdm

from comln_tf import data
from comln_tf import evaluation
from comln_tf.training import _checkpoints
from comln_tf.training import _config
from comln_tf.training import _distribute
from comln_tf.training import _models
from comln_tf.training._config import ConfigError

_LOG = logging.getLogger(__name__)


def load_splits(config):
  """The class splits of the configured dataset.

  Args:
    config: a configuration (its data group).

  Returns:
    data.Splits.

  Raises:
    ConfigError: the data cannot be loaded (unknown dataset, missing data
      directory, files in the wrong format...).
  """
  try:
    return data.load_splits(
      config.data.dataset,
      config.data.data_dir,
      config.data.image_size,
      rotations=config.data.rotations,
      train_on_validation=config.data.train_on_validation,
    )
  except ValueError as error:
    fields = ", ".join(
      f"config.data.{name}={config.data[name]!r}"
      for name in (
        "dataset",
        "data_dir",
        "image_size",
        "rotations",
        "train_on_validation",
      )
    )
    raise ConfigError(f"{fields}: {error}") from error


def check_episodes(
  class_set, ways, shots, queries, class_sampling="uniform", prefix=""
):
  """Raises ConfigError unless the episodes fit the set.

  The message names the values as `prefix` + their name (e.g.
  prefix="config.data." for a configuration's).
  """
  try:
    data.check_episode_args(class_set, ways, shots, queries, class_sampling)
  except ValueError as error:
    values = {
      "ways": ways,
      "shots": shots,
      "queries": queries,
      "class_sampling": class_sampling,
    }
    raise ConfigError(
      ", ".join(f"{prefix}{name}={value!r}" for name, value in values.items())
      + f": {error}"
    ) from error


def load_data(config):
  """Loads the run's class splits and checks that its episodes fit them.

  Args:
    config: a configuration.

  Returns:
    (data.Splits, example_shape list: [H, W, C] or [d]).

  Raises:
    ConfigError: the data cannot be loaded, the train (or validation) split
      has too few classes or examples for the episodes, or the backbone
      does not fit the examples.
  """
  splits = load_splits(config)
  class_sets = [splits.train] + (
    [splits.validation] if config.schedule.validate_every else []
  )
  for class_set in class_sets:
    check_episodes(
      class_set,
      config.data.ways,
      config.data.shots,
      config.data.queries,
      config.data.class_sampling,
      prefix="config.data.",
    )
  example_shape = list(splits.train.example_shape)
  if (len(example_shape) == 3) != (config.model.backbone != "identity"):
    raise ConfigError(
      f"config.model.backbone={config.model.backbone!r} does not fit the "
      f"examples of config.data.dataset={config.data.dataset!r} (shape "
      f"{example_shape}): use conv4 or "
      f"resnet12 for images, identity for feature vectors."
    )
  return splits, example_shape


def prepare_run(config, model_dir, strategy):
  """Validates a run before any training: fields, saved run, data.

  On the chief, writes the configuration (with `example_shape`) to
  model_dir/config.json.

  Args:
    config: a configuration.
    model_dir: str, the run's directory (new, or a run to resume).
    strategy: the run's tf.distribute.Strategy.

  Returns:
    (configuration with example_shape, data.Splits).

  Raises:
    ConfigError: a bad field, or fields that differ from the saved run's.
  """
  # Validated; fields the config lacks get their defaults.
  config = _config.make_config(base=config)
  replicas = strategy.num_replicas_in_sync
  if config.data.meta_batch_size % replicas:
    raise ConfigError(
      f"config.data.meta_batch_size="
      f"{config.data.meta_batch_size} must be "
      f"divisible by the number of replicas ({replicas})."
    )
  saved = None
  if tf.io.gfile.exists(os.path.join(model_dir, _config.CONFIG_FILE)):
    saved = _config.load_config(model_dir)
    # Before loading data, so that a mismatch fails at once.
    _config.check_resume(saved, config, model_dir)
  elif tf.train.latest_checkpoint(model_dir):
    raise ConfigError(
      f"model_dir {model_dir!r} holds checkpoints but no "
      f"{_config.CONFIG_FILE}; use a new model_dir."
    )
  splits, example_shape = load_data(config)
  config = _config.updated(config, {"data.example_shape": example_shape})
  if saved is not None:
    _config.check_resume(saved, config, model_dir)
  if config.run.init_from is not None:
    _models.init_checkpoint(config)
  if _distribute.is_chief(strategy):
    _config.save_config(model_dir, config)
  return config, splits


@dataclasses.dataclass
class _State:
  """What a run trains and checkpoints."""

  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  step: tf.Variable  # int64 scalar: meta-training steps done.
  best_accuracy: tf.Variable  # float32 scalar: best validation accuracy.
  checkpoint: tf.train.Checkpoint


def _make_state(config, strategy):
  with strategy.scope():
    keras.utils.set_random_seed(config.run.seed)
    model = _models.build_model(
      config, jit_compile=config.adaptation.jit_compile
    )
    optimizer = _models.build_optimizer(config, model)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    best_accuracy = tf.Variable(
      -1.0, dtype=tf.float32, trainable=False, name="best_accuracy"
    )
  checkpoint = _models.make_checkpoint(
    model, optimizer=optimizer, step=step, best_accuracy=best_accuracy
  )
  return _State(model, optimizer, step, best_accuracy, checkpoint)


# Means over the replicas of one step, summed over the steps of a log window.
_METRICS = ("loss", "accuracy", "num_evals", "grad_norm")


def make_train_step(model, optimizer, step, strategy, totals, clip_norm=None):
  """The compiled meta-training step.

  Each replica adapts to its slice of the meta-batch and contributes its
  part of the meta-gradient (`COMLN.replica_gradients`: 1/R of the
  gradient of its mean query loss plus the L2 term, R replicas). The
  optimizer sums the parts over replicas, so it applies the gradient of
  the mean loss over the global meta-batch (all slices have B/R episodes:
  the mean of the slice means is the global mean) plus the L2 term
  counted once.

  The global norm of that gradient is computed from an all-reduced copy
  (Keras optimizers' own clipnorm/global_clipnorm would clip each
  replica's part before the sum); with `clip_norm`, every part is scaled
  by min(1, clip_norm / norm), so the applied gradient has norm
  <= clip_norm.

  The accuracy of a step whose logits are not all finite is NaN (see
  `COMLN.query_correct`), so that the divergence check stops the run
  instead of logging an accuracy made of argmaxes of NaN.

  Args:
    model: a built COMLN, created under `strategy`.
    optimizer: a built Keras optimizer, created under `strategy`.
    step: int64 tf.Variable, the number of steps done, incremented.
    strategy: the tf.distribute.Strategy.
    totals: dict of float32 tf.Variables: "loss", "accuracy", "num_evals",
      "grad_norm" (before clipping) (each step adds its value, averaged over
      replicas) and "steps".
    clip_norm: float > 0 or None (no clipping).

  Returns:
    tf.function taking an iterator of distributed meta-batches: runs one
    step, updates `step` and `totals`, returns nothing (no host
    round-trip).
  """

  def replica_step(batch):
    loss, logits, stats, gradients = model.replica_gradients(batch)
    grad_norm = tf.linalg.global_norm(
      tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, gradients
      )
    )
    if clip_norm is not None:
      scale = tf.minimum(1.0, clip_norm / grad_norm)
      gradients = [g * scale for g in gradients]
    optimizer.apply(gradients, model.trainable_variables)
    return {
      "loss": loss,
      "accuracy": tf.reduce_mean(
        model.query_correct(batch["query_labels"], logits)
      ),
      "num_evals": tf.cast(stats.num_evals, tf.float32),
      "grad_norm": grad_norm,
    }

  @tf.function
  def train_step(iterator):
    results = strategy.run(replica_step, args=(next(iterator),))
    for name in _METRICS:
      totals[name].assign_add(
        strategy.reduce(tf.distribute.ReduceOp.MEAN, results[name], axis=None)
      )
    totals["steps"].assign_add(1.0)
    step.assign_add(1)

  return train_step


class DiskFullError(RuntimeError):
  """A checkpoint could not be written: no space left on its device."""


# Errors of a write that found no space: TensorFlow reports ENOSPC and
# EDQUOT as ResourceExhaustedError, Python as OSError.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _save_or_explain(manager, step: int) -> str:
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


class _Saver:
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

  def __init__(self, checkpoint, model_dir, strategy, keep):
    self._chief = _distribute.is_chief(strategy)
    self._root = _distribute.worker_dir(model_dir, strategy)
    self._latest = tf.train.CheckpointManager(
      checkpoint, self._root, max_to_keep=keep
    )
    self._best = tf.train.CheckpointManager(
      checkpoint, os.path.join(self._root, _models.BEST_DIR), max_to_keep=1
    )
    self.latest_step = None  # The step of the last save_latest of this run.

  def _save(self, manager, step):
    path = _save_or_explain(manager, step)
    if not self._chief:
      tf.io.gfile.rmtree(self._root)
    return path

  def save_latest(self, step):
    path = self._save(self._latest, step)
    self.latest_step = step
    return path

  def save_best(self, step):
    return self._save(self._best, step)


def _restore(state, model_dir, chief=True):
  """Restores the newest intact checkpoint of model_dir; returns the step.

  A resumed run continues from its own checkpoint, whether or not it
  started with run.init_from. Damaged checkpoints are set aside with a
  warning (`_checkpoints.latest_intact`, on the chief); checkpoints of which
  none is intact stop the run (CheckpointError), never a restart from
  step 0.

  best/ is replaced only by a better model: the best accuracy is the one
  recorded with the model in best/ (after a fallback to an older
  checkpoint, the restored record may be lower; after a crash between the
  saves of a step, higher than what best/ holds), and a model_dir with a
  best/ checkpoint but no checkpoint to resume from (ckpt-* deleted) is
  refused rather than trained again from step 0, which would replace the
  best model by the first, worse, one validated. To start over, delete
  best/ or use a new model_dir.

  Call it before creating the run's CheckpointManagers: it may rewrite the
  state files they read.

  Raises:
    CheckpointError: checkpoints of which none is intact, or a best/
      checkpoint without any to resume from.
  """

  def restore(path):
    state.checkpoint.restore(path).assert_consumed()

  best_dir = os.path.join(model_dir, _models.BEST_DIR)
  best = _checkpoints.latest_intact(best_dir, modify=chief)
  path = _checkpoints.latest_intact(model_dir, restore=restore, modify=chief)
  recorded = (
    None if best is None else _checkpoints.recorded_value(best, "best_accuracy")
  )
  if path is None:
    if best is not None:
      raise _checkpoints.CheckpointError(_best_without_latest(model_dir, best))
    return 0
  step = int(state.step.numpy())
  if best is None:
    state.best_accuracy.assign(-1.0)
  elif recorded is not None:
    state.best_accuracy.assign(recorded)
  _LOG.info("Resumed from %s (step %d).", path, step)
  return step


def _best_without_latest(model_dir, best):
  """The message of a model_dir with a best/ checkpoint and no latest one."""
  recorded = _checkpoints.recorded_value(best, "best_accuracy")
  accuracy = "" if recorded is None else f", validation accuracy {recorded:.4f}"
  return (
    f"model_dir {model_dir!r} holds a best checkpoint ({best}{accuracy}) "
    f"but no checkpoint to resume from (ckpt-* and its "
    f"{_checkpoints.STATE_FILE!r} file are gone): training would start "
    f"again from step 0 and replace the best model. To resume, put the "
    f"run's ckpt-* files and {_checkpoints.STATE_FILE!r} back; to start "
    f"over, delete {os.path.join(model_dir, _models.BEST_DIR)!r} or use a "
    f"new --model_dir."
  )


# TensorBoard's scalar-plugin metadata, so that summaries need no
# `tensorboard` package to be written (tf.summary.scalar does).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
  plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
)


def _write_scalars(writer, values, step):
  """Writes float scalars as TensorBoard scalar summaries at `step`."""
  with writer.as_default():
    for name, value in values.items():
      tf.summary.write(
        name,
        tf.constant(value, tf.float32),
        step=step,
        metadata=_SCALAR_METADATA,
      )


class _Monitor:
  """The run's outputs: summaries, progress, log lines, throughput.

  Metrics are read from the step's accumulators once per log window (the
  only host round-trip of training). On a terminal, progress is a bar with
  an ETA; otherwise (log files, --noprogress) one log line per window. A
  non-chief worker writes nothing.
  """

  def __init__(self, model_dir, config, start, chief, progress):
    self._batch_size = config.data.meta_batch_size
    self._steps = config.schedule.steps
    self._writers = {
      name: (
        tf.summary.create_file_writer(os.path.join(model_dir, name))
        if chief
        else tf.summary.create_noop_writer()
      )
      for name in ("train", "validation")
    }
    use_bar = chief and progress and sys.stderr.isatty()
    self._log_lines = chief and not use_bar
    self._bar = tqdm.tqdm(
      total=self._steps,
      initial=start,
      unit="step",
      disable=not use_bar,
      file=sys.stderr,
      dynamic_ncols=True,
    )
    self._last_step = start
    self._window_time = 0.0
    # Throughput after the first window, which includes tracing.
    self._first_window = True
    self._steady_steps, self._steady_time = 0, 0.0
    self.logs = {}

  def run_step(self, train_step, iterator):
    """Runs one training step, timing it."""
    begin = time.perf_counter()
    train_step(iterator)
    self._window_time += time.perf_counter() - begin
    self._bar.update(1)

  def log_window(self, step, totals, t_final, learning_rate):
    """Writes the means of the window's steps (and zeroes the totals)."""
    count = max(float(totals["steps"].numpy()), 1.0)
    logs = {name: float(totals[name].numpy()) / count for name in _METRICS}
    for variable in totals.values():
      variable.assign(0.0)
    window_steps = step - self._last_step
    seconds_per_step = self._window_time / window_steps
    logs["t_final"] = t_final
    logs["learning_rate"] = learning_rate
    logs["episodes_per_second"] = self._batch_size / seconds_per_step
    if not self._first_window:
      self._steady_steps += window_steps
      self._steady_time += self._window_time
    self._first_window = False
    self._last_step, self._window_time = step, 0.0
    _write_scalars(self._writers["train"], logs, step)
    self._bar.set_postfix(
      loss=f"{logs['loss']:.3f}",
      acc=f"{logs['accuracy']:.3f}",
      T=f"{t_final:.3g}",
      refresh=False,
    )
    if self._log_lines:
      eta = datetime.timedelta(
        seconds=round((self._steps - step) * seconds_per_step)
      )
      _LOG.info(
        "Step %d/%d: loss %.4f, accuracy %.4f, T %.4g, %.4g ODE "
        "evaluations, gradient norm %.3g, %.3g episodes/s, ETA %s.",
        step,
        self._steps,
        logs["loss"],
        logs["accuracy"],
        t_final,
        logs["num_evals"],
        logs["grad_norm"],
        logs["episodes_per_second"],
        eta,
      )
    self.logs = logs

  def log_validation(self, step, summary, improved):
    _write_scalars(
      self._writers["validation"],
      {"accuracy": summary["accuracy"], "ci95": summary["ci95"]},
      step,
    )
    _LOG.info(
      "Step %d: validation accuracy %.4f +- %.4f%s.",
      step,
      summary["accuracy"],
      summary["ci95"],
      " (best so far)" if improved else "",
    )

  @property
  def episodes_per_second(self):
    """Training throughput after the first log window, or None."""
    if not self._steady_steps:
      return None
    return self._steady_steps * self._batch_size / self._steady_time

  def close(self):
    self._bar.close()
    for writer in self._writers.values():
      writer.close()


class DivergedError(RuntimeError):
  """Meta-training stopped: the loss, logits, gradient or T is not finite."""


def _check_finite(totals, model, step, last_checked, model_dir, error=None):
  """Raises DivergedError if a step since `last_checked` was not finite.

  Under XLA the engine's assertions are compiled away and a diverged step
  gives NaN values, not an error; without XLA the step after it fails in
  the engine (e.g. "t_final must be > 0, got nan"). Either way training
  stops here, before a non-finite checkpoint can be written. A step whose
  query logits are not all finite has a NaN accuracy
  (`COMLN.query_correct`), so no accuracy is ever logged from them.

  Args:
    totals: the step accumulators (sums since the last log).
    model: the COMLN being trained.
    step: int, the last step run. last_checked: int, the last step checked.
    model_dir: str, for the message.
    error: the tf.errors.OpError the step raised, if any (re-raised as is
      when the state is finite: it is not a divergence).
  """
  # A step's loss precedes its update: a non-finite gradient is what makes
  # the updated weights non-finite.
  loss = float(totals["loss"].numpy())
  accuracy = float(totals["accuracy"].numpy())
  grad_norm = float(totals["grad_norm"].numpy())
  t_final = float(model.classifier.t_final)
  if all(map(math.isfinite, (loss, accuracy, grad_norm, t_final))):
    if error is not None:
      raise error
    return
  logits = "" if math.isfinite(accuracy) else " (query logits not finite)"
  raise DivergedError(
    f"Meta-training diverged between steps {last_checked + 1} and {step}: "
    f"loss {loss}{logits}, gradient norm {grad_norm}, T {t_final}. Nothing "
    f"after step {last_checked} was saved (latest checkpoints in "
    f"{model_dir!r}, the best in "
    f"{os.path.join(model_dir, _models.BEST_DIR)!r}). Train again in a new "
    f"model_dir with config.optim.clip_norm or a lower "
    f"config.optim.learning_rate."
  ) from error


def _due(step, every, last):
  return step % every == 0 or step == last


def train(config, model_dir, strategy=None, progress=True):
  """Meta-trains COMLN, or resumes the run saved in model_dir.

  Writes into model_dir: config.json, checkpoints (latest; best validation
  accuracy under best/) and TensorBoard summaries (train/: loss, accuracy,
  t_final, num_evals, episodes_per_second; validation/: accuracy, ci95).
  Training stops after config.schedule.steps meta-training steps in total.

  A model_dir is resumed from its latest intact checkpoint. One that holds
  a best/ checkpoint but no latest one to resume from (ckpt-* deleted) is
  refused, never trained again from step 0 over its best model: delete
  best/ or use a new model_dir to start over. best/ is only ever replaced
  by a model of higher validation accuracy. A run refused before training
  (bad configuration or data) leaves no model_dir behind that it created.

  Args:
    config: a configuration (see `make_config`).
    model_dir: str, the run's directory.
    strategy: a tf.distribute.Strategy (default: the current one), e.g.
      from `make_strategy`.
    progress: show a progress bar (on the chief).

  Returns:
    dict: "step", the last log window's "loss", "accuracy", "num_evals",
    "t_final" and "episodes_per_second" (if any step ran), "best_accuracy"
    (-1 if never validated) and "train_episodes_per_second" (after the
    first log window, which includes tracing; None without a second one).

  Raises:
    ConfigError: bad configuration (before any training), a model_dir that
      cannot be written or is in use by another training (a lock file,
      taken over when its process is gone), checkpoints of which none is
      intact, or a best/ checkpoint without any to resume from
      (CheckpointError).
    DivergedError: the loss, the query logits, the gradient or T became
      non-finite (no checkpoint of a non-finite state is written).
    DiskFullError: a checkpoint could not be written for lack of space
      (rerun once space is freed: the run resumes from its last intact
      checkpoint).
    Preempted: SIGTERM arrived; a checkpoint of the current step was written
      (a SystemExit: the process exits with its message).
  """
  strategy = strategy or tf.distribute.get_strategy()
  with (
    _checkpoints.RunLock(model_dir, _lock_name(strategy)),
    _SigtermFlag() as sigterm,
  ):
    return _train(config, model_dir, strategy, progress, sigterm)


def _lock_name(strategy):
  """The lock file of this worker: one per worker of a multi-worker run."""
  if _distribute.is_chief(strategy) or strategy.cluster_resolver is None:
    return _checkpoints.LOCK_FILE
  return f"{_checkpoints.LOCK_FILE}-worker{strategy.cluster_resolver.task_id}"


class Preempted(SystemExit):
  """Training stopped on SIGTERM after saving a checkpoint of its step."""


class _SigtermFlag:
  """Within the block, SIGTERM sets `.raised` instead of killing at once.

  Only in the main thread (where Python handles signals); elsewhere the
  default handling stays.
  """

  def __init__(self):
    self.raised = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *unused_exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _train(config, model_dir, strategy, progress, sigterm):
  """`train` once model_dir is locked; `sigterm` tells of a SIGTERM."""
  config, splits = prepare_run(config, model_dir, strategy)
  state = _make_state(config, strategy)
  start = _restore(state, model_dir, _distribute.is_chief(strategy))
  saver = _Saver(
    state.checkpoint, model_dir, strategy, config.schedule.keep_checkpoints
  )
  if not start and config.run.init_from is not None:
    path = _models.init_checkpoint(config)
    _models.initialize_from(state.model, path)
    if not config.model.train_t:
      state.model.classifier.assign_t_final(config.model.initial_t)
    _LOG.info(
      "Initialized the model from %s (T %.4g%s).",
      path,
      float(state.model.classifier.t_final),
      "" if config.model.train_t else ", fixed",
    )
  steps, batch_size = config.schedule.steps, config.data.meta_batch_size
  if start >= steps:
    _LOG.info(
      "Nothing to do: the run is at step %d, schedule.steps=%d.", start, steps
    )
    return {
      "step": start,
      "best_accuracy": float(state.best_accuracy.numpy()),
      "train_episodes_per_second": None,
    }
  iterator = iter(
    strategy.distribute_datasets_from_function(
      lambda context: data.distributed_meta_batches(
        context,
        splits.train,
        ways=config.data.ways,
        shots=config.data.shots,
        queries=config.data.queries,
        global_batch_size=batch_size,
        seed=config.run.seed,
        start_batch=start,
        class_sampling=config.data.class_sampling,
        distortion=_config.distortion(config),
      )
    )
  )
  totals = {
    name: tf.Variable(0.0, trainable=False) for name in _METRICS + ("steps",)
  }
  train_step = make_train_step(
    state.model,
    state.optimizer,
    state.step,
    strategy,
    totals,
    clip_norm=config.optim.clip_norm,
  )
  if config.schedule.validate_every:
    validation = data.eval_episodes(
      splits.validation,
      ways=config.data.ways,
      shots=config.data.shots,
      queries=config.data.queries,
      seed=evaluation.VALIDATION_SEED,
      num_episodes=config.schedule.validation_episodes,
      class_sampling=config.data.class_sampling,
    )
    accuracy_fn = evaluation.accuracy_function(state.model)

  monitor = _Monitor(
    model_dir, config, start, _distribute.is_chief(strategy), progress
  )
  last_checked = start
  try:
    for step in range(start + 1, steps + 1):
      try:
        monitor.run_step(train_step, iterator)
      except tf.errors.InvalidArgumentError as error:
        _check_finite(totals, state.model, step, last_checked, model_dir, error)
      log_due = _due(step, config.schedule.log_every, steps)
      validate_due = bool(config.schedule.validate_every) and _due(
        step, config.schedule.validate_every, steps
      )
      checkpoint_due = _due(step, config.schedule.checkpoint_every, steps)
      if log_due or validate_due or checkpoint_due:
        _check_finite(totals, state.model, step, last_checked, model_dir)
        last_checked = step
      if log_due:
        monitor.log_window(
          step,
          totals,
          float(state.model.classifier.t_final),
          float(tf.convert_to_tensor(state.optimizer.learning_rate)),
        )
      if validate_due:
        summary = evaluation.summarize(
          evaluation.episode_accuracies(accuracy_fn, validation, batch_size)
        )
        improved = np.float32(summary["accuracy"]) > state.best_accuracy.numpy()
        monitor.log_validation(step, summary, improved)
        if improved:
          state.best_accuracy.assign(summary["accuracy"])
          if not start and saver.latest_step is None:
            # best/ never exists without a checkpoint to resume from (see
            # `_restore`): the first one is saved first.
            saver.save_latest(step)
          saver.save_best(step)
      if checkpoint_due and saver.latest_step != step:
        saver.save_latest(step)
      if sigterm.raised:
        if saver.latest_step != step:
          _check_finite(totals, state.model, step, last_checked, model_dir)
          saver.save_latest(step)
        message = (
          f"Stopped by SIGTERM at step {step}/{steps}; saved "
          f"{os.path.join(model_dir, f'ckpt-{step}')}. Run the same "
          f"command again to resume."
        )
        _LOG.warning(message)
        raise Preempted(message)
  finally:
    monitor.close()

  result = {
    **monitor.logs,
    "step": steps,
    "best_accuracy": float(state.best_accuracy.numpy()),
    "train_episodes_per_second": monitor.episodes_per_second,
  }
  _LOG.info(
    "Done: step %d, %s; throughput after the first log window "
    "(which traces): %s episodes/s with %d replica(s).",
    steps,
    ", ".join(f"{key} {value:.4g}" for key, value in monitor.logs.items()),
    "n/a"
    if result["train_episodes_per_second"] is None
    else f"{result['train_episodes_per_second']:.2f}",
    strategy.num_replicas_in_sync,
  )
  return result
