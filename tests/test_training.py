"""Tests of comln_tf.training and launch/train.py on tiny Omniglot runs."""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from comln_tf.training import _loop
from comln_tf.training import _step

STEPS = 16
LR_DECAY_STEPS = 32
# Validation in whole meta-batches (8 episodes): one trace of its function.
RUN_ARGS = tuple(
  arg
  for arg in cli_helpers.TINY_ARGS
  if not arg.startswith("--config.schedule.validation_episodes=")
) + (
  "--config.schedule.validation_episodes=8",
  f"--config.schedule.steps={STEPS}",
  "--config.schedule.log_every=4",
  "--config.schedule.checkpoint_every=2",
  "--config.schedule.validate_every=8",
  "--config.run.seed=3",
  f"--config.optim.lr_decay_steps={LR_DECAY_STEPS}",
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """model_dir of an uninterrupted tiny run of the training launcher.

  Its log is model_dir/../train.log.
  """
  model_dir = tmp_path_factory.mktemp("reference") / "run"
  result = cli_helpers.run(
    "launch.train", (f"--model_dir={model_dir}",) + RUN_ARGS, timeout=240
  )
  (model_dir.parent / "train.log").write_text(result.stderr)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def test_train_on_validation_reaches_the_training_data():
  config = training.make_config(
    {
      "data.dataset": "omniglot_characters",
      "data.rotations": True,
      "data.train_on_validation": True,
      "schedule.validate_every": 0,
    }
  )
  splits = _loop.load_splits(config)
  plain = data.load_splits("omniglot_characters")
  assert splits.train.num_classes == 4 * (
    plain.train.num_classes + plain.validation.num_classes
  )
  assert {f"{name}/rot0" for name in plain.validation.class_names} <= set(
    splits.train.class_names
  )


def test_smoke_training_loss_falls_and_beats_chance(reference_run):
  config = training.load_config(reference_run)
  assert list(config.data.example_shape) == [28, 28, 1]
  assert config.schedule.steps == STEPS and config.data.ways == 5
  scalars = cli_helpers.scalars(reference_run / "train")
  assert set(scalars) == {
    "loss",
    "accuracy",
    "t_final",
    "num_evals",
    "grad_norm",
    "episodes_per_second",
    "learning_rate",
  }
  assert [step for step, _ in scalars["loss"]] == [4, 8, 12, 16]
  # Cosine decay from 0.1: the rate the next step will use.
  for step, value in scalars["learning_rate"]:
    np.testing.assert_allclose(
      value, 0.05 * (1 + np.cos(np.pi * step / LR_DECAY_STEPS)), rtol=1e-6
    )
  losses = [value for _, value in scalars["loss"]]
  assert losses[-1] < losses[0] - 0.3, losses
  assert all(value > 0 for _, value in scalars["num_evals"])
  # Off a terminal, progress is one log line per window, with an ETA.
  log = (reference_run.parent / "train.log").read_text()
  assert re.search(
    r"Step 4/16: loss [\d.]+, accuracy [\d.]+, .* ETA "
    r"\d+:\d\d:\d\d",
    log,
  ), log[-3000:]
  assert [
    step
    for step, _ in cli_helpers.scalars(reference_run / "validation")["accuracy"]
  ] == [8, 16]
  assert training.checkpoint_step(training.checkpoint_path(reference_run)) == (
    STEPS
  )

  model, _ = training.restore_model(reference_run, which="best")
  splits = data.load_splits("omniglot")
  results = evaluation.evaluate(
    model,
    splits.test,
    ways=5,
    shots=1,
    queries=5,
    num_episodes=20,
    batch_size=10,
  )
  # Chance is 0.2; over 500 queries its standard deviation is 0.018.
  assert results["accuracy"] > 0.3, results


@pytest.mark.parametrize("clip_fraction", [None, 0.25])
def test_train_step_logs_the_gradient_norm_and_clips_it(clip_fraction):
  # Plain SGD with lr 1: a step moves the variables by -(clipped gradient).
  config = training.make_config(
    {
      "data.ways": 3,
      "data.shots": 1,
      "data.queries": 2,
      "optim.optimizer": "sgd",
      "optim.momentum": 0.0,
      "optim.learning_rate": 1.0,
      "optim.weight_decay": 0.0,
      "data.example_shape": [28, 28, 1],
    }
  )
  splits = data.load_splits("omniglot")
  batch = next(
    iter(
      data.eval_episodes(
        splits.validation, ways=3, shots=1, queries=2, seed=0, num_episodes=2
      ).batch(2)
    )
  )
  model = training.build_model(config)
  optimizer = training.build_optimizer(config, model)
  variables = model.trainable_variables
  # The reference gradient: the mean query loss, taped directly.
  with tf.GradientTape() as tape:
    loss = model.query_loss(batch["query_labels"], model(batch, training=True))
  gradients = tape.gradient(loss, variables)
  norm = float(tf.linalg.global_norm(gradients))
  clip_norm = None if clip_fraction is None else clip_fraction * norm
  before = [v.numpy() for v in variables]
  totals = {
    name: tf.Variable(0.0)
    for name in ("loss", "accuracy", "num_evals", "grad_norm", "steps")
  }
  step = tf.Variable(0, dtype=tf.int64)
  train_step = training.make_train_step(
    model,
    optimizer,
    step,
    tf.distribute.get_strategy(),
    totals,
    clip_norm=clip_norm,
  )
  train_step(iter(tf.data.Dataset.from_tensors(batch)))
  np.testing.assert_allclose(totals["grad_norm"].numpy(), norm, rtol=1e-5)
  scale = 1.0 if clip_fraction is None else clip_fraction
  for value, old, gradient in zip(variables, before, gradients):
    expected = scale * gradient.numpy()
    # Relative to the whole update: float32 traced and eager gradients
    # differ by ~1e-6 relative, elementwise more where they cancel.
    assert np.linalg.norm(old - value.numpy() - expected) <= (
      1e-4 * np.linalg.norm(expected)
    ), value.name


def test_restore_model_restores_every_weight(reference_run):
  path = training.checkpoint_path(str(reference_run))
  saved = cli_helpers.checkpoint_values(path)
  model, _ = training.restore_model(str(reference_run))
  # Conv-4: 4 x (kernel, gamma, beta), then W0 and tau.
  assert len(model.variables) == 14
  for i, variable in enumerate(model.variables):
    np.testing.assert_array_equal(
      variable.numpy(), saved[f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"]
    )


def test_restore_model_errors_name_the_model_dir(tmp_path, reference_run):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    training.restore_model(str(tmp_path))
  training.save_config(str(tmp_path), training.load_config(reference_run))
  with pytest.raises(FileNotFoundError, match="No best checkpoint"):
    training.restore_model(str(tmp_path), which="best")


def test_restart_after_sigkill_ends_like_an_uninterrupted_run(
  tmp_path, reference_run, processes
):
  model_dir = tmp_path / "killed"
  args = (f"--model_dir={model_dir}",) + RUN_ARGS
  first = processes.start("first", "launch.train", args)
  cli_helpers.wait_until(
    lambda: cli_helpers.latest_step(model_dir) >= 4,
    timeout=180,
    processes=[first],
  )
  first.send_signal(signal.SIGKILL)
  assert processes.wait(first, 30) == -signal.SIGKILL
  killed_at = cli_helpers.latest_step(model_dir)
  assert 4 <= killed_at < STEPS

  second = processes.start("second", "launch.train", args)
  assert processes.wait(second, 240) == 0, processes.log(second)[-3000:]
  assert f"Resumed from {model_dir}/ckpt-{killed_at}" in processes.log(second)
  for which in ("latest", "best"):
    path = training.checkpoint_path(str(model_dir), which)
    expected = training.checkpoint_path(str(reference_run), which)
    assert path.rsplit("/", 1)[1] == expected.rsplit("/", 1)[1]
    # Every variable: model, optimizer slots and iterations, step, best.
    actual, reference = map(cli_helpers.checkpoint_values, (path, expected))
    actual.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    reference.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    cli_helpers.assert_same_values(actual, reference)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.data.dataset=mnist"], "config.data.dataset must be one of"),
    (
      ["--config.data.data_dir=/nonexistent/omniglot"],
      "config.data.data_dir='/nonexistent/omniglot'",
    ),
    (["--config.data.ways=1000"], "config.data.ways=1000"),
    (
      ["--config.data.shots=10", "--config.data.queries=15"],
      "config.data.queries=15",
    ),
    (["--config.adaptation.solver=rk4"], "config.adaptation.num_steps"),
    (["--config.data.wayz=5"], "unknown config field 'wayz'"),
  ],
)
def test_cli_rejects_bad_config_before_training(tmp_path, args, message):
  model_dir = tmp_path / "run"
  result = cli_helpers.run(
    "launch.train",
    [f"--model_dir={model_dir}", "--config=configs/base.py", "--noprogress"]
    + args,
    timeout=120,
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (model_dir / "config.json").exists()


def test_cli_stops_a_diverging_run_before_saving_it(tmp_path):
  # Under XLA the engine's assertions are compiled away: without the
  # training loop's check, a diverged run would go on with NaN weights.
  # The first update at a learning rate of 1e4 makes T infinite, whatever
  # the solver: two Euler steps keep XLA's compilation small.
  model_dir = tmp_path / "run"
  result = cli_helpers.run(
    "launch.train",
    (f"--model_dir={model_dir}",)
    + cli_helpers.TINY_ARGS
    + (
      "--config.schedule.steps=4",
      "--config.schedule.log_every=1",
      "--config.schedule.checkpoint_every=1",
      "--config.optim.learning_rate=1e4",
      "--config.adaptation.solver=euler",
      "--config.adaptation.num_steps=2",
      "--config.adaptation.jit_compile=True",
    ),
    timeout=240,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "error: Meta-training diverged between steps 1 and 1" in (
    result.stderr
  ), result.stderr[-3000:]
  assert "config.optim.clip_norm" in result.stderr
  assert tf.train.latest_checkpoint(str(model_dir)) is None


def test_cli_refuses_to_resume_with_other_config(reference_run):
  before = (reference_run / "config.json").read_text()
  args = (
    [f"--model_dir={reference_run}"]
    + [arg for arg in RUN_ARGS if not arg.startswith("--config.data.ways")]
    + ["--config.data.ways=4"]
  )
  result = cli_helpers.run("launch.train", args, timeout=120)
  assert result.returncode != 0
  assert "config.data.ways=4 (saved run: 5)" in result.stderr
  assert "Traceback" not in result.stderr
  assert (reference_run / "config.json").read_text() == before
  assert json.loads(before)["data"]["ways"] == 5


def test_cli_resumes_from_the_saved_config_alone(reference_run):
  # No --config: the run's config.json, read back, is the configuration.
  result = cli_helpers.run(
    "launch.train", [f"--model_dir={reference_run}"], timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Nothing to do: the run is at step {STEPS}" in result.stderr
  dry = cli_helpers.run(
    "launch.train",
    ["--config=configs/base.py", "--config.data.ways=7", "--dry_run"],
    timeout=120,
  )
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert json.loads(dry.stdout)["data"]["ways"] == 7


def test_cli_overrides_apply_to_the_saved_config_without_config(
  reference_run,
):
  # --config.<field> with --model_dir alone: the run's config, overridden
  # (here its step count, to extend it); a changed model is still refused.
  saved = json.loads((reference_run / "config.json").read_text())
  dry = cli_helpers.run(
    "launch.train",
    [f"--model_dir={reference_run}", "--config.schedule.steps=99", "--dry_run"],
    timeout=120,
  )
  assert dry.returncode == 0, dry.stderr[-3000:]
  extended = json.loads(dry.stdout)
  assert extended["schedule"]["steps"] == 99
  extended["schedule"]["steps"] = saved["schedule"]["steps"]
  assert training.flatten(extended) == training.flatten(
    training.make_config(base=training.from_json(saved))
  )
  refused = cli_helpers.run(
    "launch.train",
    [f"--model_dir={reference_run}", "--config.data.ways=4"],
    timeout=120,
  )
  assert refused.returncode != 0
  assert "config.data.ways=4 (saved run: 5)" in refused.stderr
  for args, message in [
    (["--config.schedule.steps=9", "--dry_run"], "overrides need --config"),
    (
      ["--model_dir=/nonexistent", "--config.schedule.steps=9"],
      "No config.json in model_dir '/nonexistent'",
    ),
  ]:
    failed = cli_helpers.run("launch.train", args, timeout=120)
    assert failed.returncode != 0 and message in failed.stderr
    assert "Traceback" not in failed.stderr


@contextlib.contextmanager
def _comln_log():
  """The messages comln_tf logs at INFO and above while the block runs."""
  messages = []
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger("comln_tf")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield messages
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _warm_config(init_from, steps, **overrides):
  """A tiny config of `steps` steps without validation, from `init_from`.

  The architecture of the reference run (Conv-4, 5 ways, 28x28), with one
  episode of one query a class per step: init_from is the subject here, not
  the episodes.
  """
  return training.make_config(
    {
      "data.ways": 5,
      "data.shots": 1,
      "data.queries": 1,
      "data.meta_batch_size": 1,
      "run.init_from": str(init_from),
      "schedule.steps": steps,
      "schedule.validate_every": 0,
      **overrides,
    }
  )


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, reference_run):
  """A run initialized from the reference run: (model_dir, its log).

  One step at a learning rate of 1e-12, trained in-process (init_from is
  the subject, not the launcher), without validation: it has no best
  checkpoint.
  """
  model_dir = tmp_path_factory.mktemp("warm") / "run"
  config = _warm_config(
    reference_run, 1, **{"optim.learning_rate": 1e-12, "run.seed": 3}
  )
  with _comln_log() as log:
    training.train(config, str(model_dir), progress=False)
  return model_dir, "\n".join(log)


def test_init_from_starts_from_the_best_model_with_a_fresh_optimizer(
  warm_run, reference_run
):
  # One step at a learning rate of 1e-12 leaves the float32 weights where
  # they started: those of the reference run's best checkpoint, not the
  # seed's initial weights (the same seed as the reference run).
  model_dir, log = warm_run
  best = training.checkpoint_path(str(reference_run), "best")
  assert f"Initialized the model from {best}" in log
  assert training.load_config(model_dir).run.init_from == str(reference_run)
  actual = cli_helpers.model_values(training.checkpoint_path(str(model_dir)))
  expected = cli_helpers.model_values(best)
  assert actual.pop("step/.ATTRIBUTES/VARIABLE_VALUE") == 1
  expected.pop("step/.ATTRIBUTES/VARIABLE_VALUE")
  cli_helpers.assert_same_values(actual, expected, rtol=1e-6)
  iterations = [
    value
    for name, value in cli_helpers.checkpoint_values(
      training.checkpoint_path(str(model_dir))
    ).items()
    if name.startswith("optimizer/_iterations")
  ]
  assert iterations == [1]


def test_init_from_errors_name_the_field(tmp_path, reference_run):
  # In-process: the launcher turns a ConfigError into a one-line error
  # (test_cli_rejects_bad_config_before_training).
  for overrides, message in [
    (
      {"run.init_from": f"{tmp_path}/nothing"},
      f"config.run.init_from='{tmp_path}/nothing': No config.json",
    ),
    (
      {"run.init_from": str(reference_run), "data.ways": 4},
      f"config.run.init_from='{reference_run}' holds a model of another "
      f"architecture: config.data.ways=4 (there: 5)",
    ),
    (
      {
        "run.init_from": str(reference_run),
        "model.global_pool": True,
        "model.pool_last_block": False,
      },
      "config.model.global_pool=True (there: False); "
      "config.model.pool_last_block=False (there: True)",
    ),
  ]:
    model_dir = tmp_path / "run"
    config = training.make_config({"data.ways": 5, **overrides})
    with pytest.raises(training.ConfigError) as error:
      training.train(config, str(model_dir), progress=False)
    assert message in str(error.value)
    assert not (model_dir / "config.json").exists()


def test_notrain_t_keeps_t_at_initial_t_with_init_from(
  tmp_path, warm_run, caplog
):
  # The warm run holds the T the reference run learned from 1; this run
  # starts from its model but must hold T at exactly 2.5 while the other
  # weights train. The warm run has no best checkpoint: a run initialized
  # from it starts from its latest.
  warm_dir, _ = warm_run
  model_dir = tmp_path / "fixed_t"
  config = _warm_config(
    warm_dir,
    2,
    **{
      "model.train_t": False,
      "model.initial_t": 2.5,
      "run.seed": 3,
    },
  )
  with caplog.at_level("INFO"):
    training.train(config, str(model_dir), progress=False)
  latest = training.checkpoint_path(str(warm_dir), "latest")
  assert f"Initialized the model from {latest} (T 2.5, fixed)" in caplog.text
  reference = cli_helpers.model_values(latest)
  actual = cli_helpers.model_values(training.checkpoint_path(str(model_dir)))
  # The only scalar of the model is log T.
  [log_t] = [
    name
    for name, value in reference.items()
    if np.shape(value) == () and name.startswith("model_variables")
  ]
  assert abs(np.exp(reference[log_t]) - 2.5) > 1e-3
  assert actual[log_t] == np.float32(np.log(2.5))
  trained = [
    name
    for name in reference
    if name != log_t and np.any(actual[name] != reference[name])
  ]
  assert trained, "no weight changed in two steps"


def test_train_step_reports_no_accuracy_from_nan_logits():
  # Logits that are NaN (as under XLA, where the engine's assertions are
  # compiled away) with a finite loss and gradient: only the accuracy can
  # tell. The argmax of NaN logits is class 0, the label of a third of
  # these queries.
  config = training.make_config(
    {
      "data.ways": 3,
      "data.shots": 1,
      "data.queries": 2,
      "data.example_shape": [28, 28, 1],
    }
  )
  splits = data.load_splits("omniglot")
  batch = next(
    iter(
      data.eval_episodes(
        splits.validation, ways=3, shots=1, queries=2, seed=0, num_episodes=2
      ).batch(2)
    )
  )
  assert np.mean(batch["query_labels"].numpy() == 0) == pytest.approx(1 / 3)
  model = training.build_model(config)
  replica_gradients = model.replica_gradients

  def with_nan_logits(episodes):
    loss, logits, stats, gradients = replica_gradients(episodes)
    return loss, logits + float("nan"), stats, gradients

  model.replica_gradients = with_nan_logits
  totals = {
    name: tf.Variable(0.0)
    for name in ("loss", "accuracy", "num_evals", "grad_norm", "steps")
  }
  train_step = training.make_train_step(
    model,
    training.build_optimizer(config, model),
    tf.Variable(0, dtype=tf.int64),
    tf.distribute.get_strategy(),
    totals,
  )
  train_step(iter(tf.data.Dataset.from_tensors(batch)))
  assert np.isfinite(totals["loss"].numpy())
  assert np.isfinite(totals["grad_norm"].numpy())
  assert np.isnan(totals["accuracy"].numpy())
  with pytest.raises(
    training.DivergedError,
    match=r"diverged between steps 1 and 1: loss [\d.]+ \(query logits not "
    r"finite\)",
  ):
    _step.check_finite(totals, model, 1, 0, "run")


def test_a_run_refused_before_training_leaves_no_model_dir(tmp_path):
  config = training.make_config({"data.ways": 100000})
  model_dir = tmp_path / "new" / "run"
  with pytest.raises(training.ConfigError, match="config.data.ways=100000"):
    training.train(config, str(model_dir), progress=False)
  assert not (tmp_path / "new").exists()
  # A directory that existed before is left, as it was.
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(training.ConfigError, match="config.data.ways=100000"):
    training.train(config, str(existing), progress=False)
  assert existing.is_dir() and not list(existing.iterdir())


# `python -m launch.train`, with the resource usage of each training step
# (`resource.getrusage` around `Monitor.run_step`) printed as a JSON line.
_STEP_USAGE_SCRIPT = """
import json
import resource
import sys

from absl import app

from launch import train
from comln_tf.training import _progress

run_step = _progress.Monitor.run_step


def measured_run_step(self, *args):
  before = resource.getrusage(resource.RUSAGE_SELF)
  run_step(self, *args)
  after = resource.getrusage(resource.RUSAGE_SELF)
  print(json.dumps({name: getattr(after, name) - getattr(before, name)
                    for name in ("ru_utime", "ru_stime", "ru_minflt")}),
        flush=True)


_progress.Monitor.run_step = measured_run_step
app.run(train.main, flags_parser=train._parse_flags, argv=sys.argv)
"""

# A short training on the peers' episodes (5-way 1-shot, 15 queries), 4
# episodes a step.
_USAGE_STEPS = 6
_USAGE_TASKS, _USAGE_IMAGES_PER_TASK = 4, 5 * (1 + 15)


def _training_usage(tmp_path, env):
  """Resource usage of a short training, and of each of its steps.

  Returns:
    (`resource.struct_rusage` of the launcher's process, [{"ru_utime",
    "ru_stime", "ru_minflt": the step's usage}] in step order).
  """
  args = (
    [f"--model_dir={tmp_path / 'run'}"]
    + list(cli_helpers.TINY_ARGS)
    + [
      "--config.data.queries=15",
      f"--config.data.meta_batch_size={_USAGE_TASKS}",
      f"--config.schedule.steps={_USAGE_STEPS}",
      "--config.schedule.validate_every=0",
      "--config.schedule.checkpoint_every=100",
    ]
  )
  with (
    open(tmp_path / "stdout", "w") as stdout,
    open(tmp_path / "stderr", "w") as stderr,
  ):
    process = subprocess.Popen(
      [sys.executable, "-c", _STEP_USAGE_SCRIPT, *args],
      cwd=cli_helpers.REPO,
      env=env,
      stdout=stdout,
      stderr=stderr,
    )
  try:
    _, status, usage = os.wait4(process.pid, 0)
  finally:
    process.kill()
  assert os.waitstatus_to_exitcode(status) == 0, (
    tmp_path / "stderr"
  ).read_text()[-2000:]
  steps = [
    json.loads(line) for line in (tmp_path / "stdout").read_text().splitlines()
  ]
  assert len(steps) == _USAGE_STEPS, steps
  return usage, steps


@pytest.mark.slow
def test_system_time_stays_a_small_share_of_training(tmp_path):
  # TensorFlow's default CPU allocator returns large buffers to the
  # operating system every step and page-faults them back. The project
  # chooses the BFC allocator (comln_tf/_process_defaults.py), so that a
  # user gets arithmetic, not page faults, without setting anything; the
  # bounds leave room for a busy machine.
  env = cli_helpers.environment()
  env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
  usage, steps = _training_usage(tmp_path, env)
  assert usage.ru_minflt <= 2_000_000, usage.ru_minflt
  assert usage.ru_stime <= 0.4 * usage.ru_utime, usage
  # The steps after the first (which traces) and the second (during which
  # BFC's pool grows to its size). The default allocator hands the step's
  # large buffers back to the system and faults them in again every step;
  # BFC reuses the pages it faulted in before.
  # The bound: half the pages of the first block's outputs of a step, 64
  # float32 channels of 28 x 28 for each image.
  steady = steps[2:]
  pages = _USAGE_TASKS * _USAGE_IMAGES_PER_TASK * 64 * 28 * 28 * 4 // 4096
  faults = sum(step["ru_minflt"] for step in steady) / len(steady)
  assert faults <= pages / 2, (faults, pages, steps)
  user, system = (
    sum(step[name] for step in steady) for name in ("ru_utime", "ru_stime")
  )
  assert system <= 0.4 * user, steps
