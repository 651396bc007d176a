"""The meta-training loop: a run prepared, resumed, stepped and saved.

Resume-exactness: the state that determines the rest of a run is the model,
the optimizer (slots and iteration count) and the step, all in the
checkpoint; episode i of the training stream is a pure function of
(seed, i), so a run resumed at step k reads the meta-batches an
uninterrupted run reads from step k on.

The parts: `_step` (the compiled step, the divergence check),
`_checkpoints` (saving and resuming), `_progress` (summaries, logs,
SIGTERM), `_lock` (one training per model_dir).
"""

from collections.abc import Iterator
import dataclasses
import logging
import os

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from comln_tf import data
from comln_tf import evaluation
from comln_tf.config import CONFIG_FILE
from comln_tf.config import ConfigError
from comln_tf.config import check_resume
from comln_tf.config import updated
from comln_tf.training import _checkpoints
from comln_tf.training import _distribute
from comln_tf.training import _lock
from comln_tf.training import _models
from comln_tf.training import _progress
from comln_tf.training._config import distortion
from comln_tf.training._config import load_config
from comln_tf.training._config import make_config
from comln_tf.training._config import save_config
from comln_tf.training._step import METRICS
from comln_tf.training._step import check_finite
from comln_tf.training._step import make_train_step

_LOG = logging.getLogger(__name__)


def load_splits(config: ml_collections.ConfigDict) -> data.Splits:
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
  class_set: data.ClassSet,
  ways: int,
  shots: int,
  queries: int,
  class_sampling: str = "uniform",
  prefix: str = "",
) -> None:
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


def load_data(
  config: ml_collections.ConfigDict,
) -> tuple[data.Splits, list[int]]:
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


def prepare_run(
  config: ml_collections.ConfigDict,
  model_dir: str,
  strategy: tf.distribute.Strategy,
) -> tuple[ml_collections.ConfigDict, data.Splits]:
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
  config = make_config(base=config)
  replicas = strategy.num_replicas_in_sync
  if config.data.meta_batch_size % replicas:
    raise ConfigError(
      f"config.data.meta_batch_size="
      f"{config.data.meta_batch_size} must be "
      f"divisible by the number of replicas ({replicas})."
    )
  saved = None
  if tf.io.gfile.exists(os.path.join(model_dir, CONFIG_FILE)):
    saved = load_config(model_dir)
    # Before loading data, so that a mismatch fails at once.
    check_resume(saved, config, model_dir)
  elif tf.train.latest_checkpoint(model_dir):
    raise ConfigError(
      f"model_dir {model_dir!r} holds checkpoints but no "
      f"{CONFIG_FILE}; use a new model_dir."
    )
  splits, example_shape = load_data(config)
  config = updated(config, {"data.example_shape": example_shape})
  if saved is not None:
    check_resume(saved, config, model_dir)
  if config.run.init_from is not None:
    _checkpoints.init_checkpoint(config)
  if _distribute.is_chief(strategy):
    save_config(model_dir, config)
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
  checkpoint = _checkpoints.make_checkpoint(
    model, optimizer=optimizer, step=step, best_accuracy=best_accuracy
  )
  return _State(model, optimizer, step, best_accuracy, checkpoint)


def train(
  config: ml_collections.ConfigDict,
  model_dir: str,
  strategy: tf.distribute.Strategy | None = None,
  progress: bool = True,
) -> dict:
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
    _lock.RunLock(model_dir, _lock_name(strategy)),
    _progress.SigtermFlag() as sigterm,
  ):
    return _train(config, model_dir, strategy, progress, sigterm)


def _lock_name(strategy: tf.distribute.Strategy) -> str:
  """The lock file of this worker: one per worker of a multi-worker run."""
  if _distribute.is_chief(strategy) or strategy.cluster_resolver is None:
    return _lock.LOCK_FILE
  return f"{_lock.LOCK_FILE}-worker{strategy.cluster_resolver.task_id}"


def _train(config, model_dir, strategy, progress, sigterm):
  """`train` once model_dir is locked; `sigterm` tells of a SIGTERM."""
  config, splits = prepare_run(config, model_dir, strategy)
  state = _make_state(config, strategy)
  start = _start(state, config, model_dir, _distribute.is_chief(strategy))
  steps = config.schedule.steps
  if start >= steps:
    _LOG.info(
      "Nothing to do: the run is at step %d, schedule.steps=%d.", start, steps
    )
    return {
      "step": start,
      "best_accuracy": float(state.best_accuracy.numpy()),
      "train_episodes_per_second": None,
    }
  loop = _Loop(config, model_dir, strategy, state, splits, start, progress)
  try:
    for step in range(start + 1, steps + 1):
      loop.run(step)
      if sigterm.raised:
        loop.preempt(step)
  finally:
    loop.monitor.close()
  return _result(loop.monitor, state, steps, strategy)


def _start(state, config, model_dir, chief):
  """The step a run starts from: resumed from model_dir, else 0.

  A new run (step 0) with run.init_from starts from that run's model.
  """
  path = _checkpoints.resume(
    state.checkpoint, state.best_accuracy, model_dir, chief
  )
  start = 0
  if path is not None:
    start = int(state.step.numpy())
    _LOG.info("Resumed from %s (step %d).", path, start)
  if not start and config.run.init_from is not None:
    _initialize(state.model, config)
  return start


def _initialize(model, config):
  """Sets the model to that of run.init_from (T to initial_t if fixed)."""
  path = _checkpoints.init_checkpoint(config)
  _checkpoints.initialize_from(model, path)
  if not config.model.train_t:
    model.classifier.assign_t_final(config.model.initial_t)
  _LOG.info(
    "Initialized the model from %s (T %.4g%s).",
    path,
    float(model.classifier.t_final),
    "" if config.model.train_t else ", fixed",
  )


def _training_batches(
  config: ml_collections.ConfigDict,
  class_set: data.ClassSet,
  strategy: tf.distribute.Strategy,
  start: int,
) -> Iterator:
  """The distributed meta-batches of the steps after `start`."""
  return iter(
    strategy.distribute_datasets_from_function(
      lambda context: data.distributed_meta_batches(
        context,
        class_set,
        ways=config.data.ways,
        shots=config.data.shots,
        queries=config.data.queries,
        global_batch_size=config.data.meta_batch_size,
        seed=config.run.seed,
        start_batch=start,
        class_sampling=config.data.class_sampling,
        distortion=distortion(config),
      )
    )
  )


def _validation_episodes(
  config: ml_collections.ConfigDict, class_set: data.ClassSet
) -> list:
  """The fixed episodes every validation of the run evaluates."""
  return data.eval_episodes(
    class_set,
    ways=config.data.ways,
    shots=config.data.shots,
    queries=config.data.queries,
    seed=evaluation.VALIDATION_SEED,
    num_episodes=config.schedule.validation_episodes,
    class_sampling=config.data.class_sampling,
  )


def _due(step, every, last):
  return step % every == 0 or step == last


class _Loop:
  """The steps of a training: run, check, log, validate, checkpoint."""

  def __init__(
    self, config, model_dir, strategy, state, splits, start, progress
  ):
    self._config, self._model_dir, self._state = config, model_dir, state
    self._start = start
    self._saver = _checkpoints.Saver(
      state.checkpoint, model_dir, strategy, config.schedule.keep_checkpoints
    )
    self._iterator = _training_batches(config, splits.train, strategy, start)
    self._totals = {
      name: tf.Variable(0.0, trainable=False) for name in METRICS + ("steps",)
    }
    self._train_step = make_train_step(
      state.model,
      state.optimizer,
      state.step,
      strategy,
      self._totals,
      clip_norm=config.optim.clip_norm,
    )
    if config.schedule.validate_every:
      self._validation = _validation_episodes(config, splits.validation)
      self._prediction_fn = evaluation.prediction_function(state.model)
    self.monitor = _progress.Monitor(
      model_dir, config, start, _distribute.is_chief(strategy), progress
    )
    self._last_checked = start

  def _check(self, step, error=None):
    """Raises DivergedError if a step since the last check was not finite."""
    check_finite(
      self._totals,
      self._state.model,
      step,
      self._last_checked,
      self._model_dir,
      error,
    )

  def run(self, step: int) -> None:
    """Runs step `step`, then what is due after it."""
    try:
      self.monitor.run_step(self._train_step, self._iterator)
    except tf.errors.InvalidArgumentError as error:
      self._check(step, error)
    schedule = self._config.schedule
    log_due = _due(step, schedule.log_every, schedule.steps)
    validate_due = bool(schedule.validate_every) and _due(
      step, schedule.validate_every, schedule.steps
    )
    checkpoint_due = _due(step, schedule.checkpoint_every, schedule.steps)
    if log_due or validate_due or checkpoint_due:
      self._check(step)
      self._last_checked = step
    if log_due:
      self.monitor.log_window(
        step,
        self._totals,
        float(self._state.model.classifier.t_final),
        float(tf.convert_to_tensor(self._state.optimizer.learning_rate)),
      )
    if validate_due:
      self._validate(step)
    if checkpoint_due and self._saver.latest_step != step:
      self._saver.save_latest(step)

  def _validate(self, step):
    """Validates the model; saves it as the best if it is better."""
    summary = evaluation.summarize(
      evaluation.episode_predictions(
        self._prediction_fn,
        self._validation,
        self._config.data.meta_batch_size,
      ).accuracies
    )
    best_accuracy = self._state.best_accuracy
    improved = np.float32(summary["accuracy"]) > best_accuracy.numpy()
    self.monitor.log_validation(step, summary, improved)
    if improved:
      best_accuracy.assign(summary["accuracy"])
      if not self._start and self._saver.latest_step is None:
        # best/ never exists without a checkpoint to resume from (see
        # `_checkpoints.resume`): the first one is saved first.
        self._saver.save_latest(step)
      self._saver.save_best(step)

  def preempt(self, step: int) -> None:
    """Saves step `step` (unless saved) and raises Preempted."""
    if self._saver.latest_step != step:
      self._check(step)
      self._saver.save_latest(step)
    message = (
      f"Stopped by SIGTERM at step {step}/{self._config.schedule.steps}; "
      f"saved {os.path.join(self._model_dir, f'ckpt-{step}')}. Run the same "
      f"command again to resume."
    )
    _LOG.warning(message)
    raise _progress.Preempted(message)


def _result(monitor, state, steps, strategy):
  """`train`'s result after its last step, logged."""
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
