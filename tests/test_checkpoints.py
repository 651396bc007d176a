"""Tests of a run's checkpoints (comln_tf/training/_checkpoints.py):
damaged ones set aside, the best model never trained over, a full disk, a
SIGTERM that saves the current step."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

import cli_helpers
from cli_helpers import REPO
from comln_tf import training
from comln_tf.training import _lock

# Tiny Omniglot runs: Conv-4, 5-way 1-shot, 2 episodes of 2 queries a class
# a step; checkpoints every 2 steps, 3 kept; validation every 4 steps, on 4
# episodes (whole meta-batches: one trace of the validation function).
_TINY_RUN = {
  "data.ways": 5,
  "data.shots": 1,
  "data.queries": 2,
  "data.meta_batch_size": 2,
  "schedule.validation_episodes": 4,
  "schedule.log_every": 2,
  "schedule.checkpoint_every": 2,
  "schedule.validate_every": 4,
  "schedule.keep_checkpoints": 3,
  "run.seed": 3,
}


def _train(model_dir, steps):
  return training.train(
    training.make_config({**_TINY_RUN, "schedule.steps": steps}),
    str(model_dir),
    progress=False,
  )


def _steps_on_disk(model_dir):
  return sorted(
    int(path.name[len("ckpt-") : -len(".index")])
    for path in pathlib.Path(model_dir).glob("ckpt-*.index")
  )


def _values(prefix):
  values = cli_helpers.checkpoint_values(prefix)
  values.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE")
  return values


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """model_dir of a tiny run of 10 steps, and a run stopped at step 8.

  The stopped run is a copy of the reference run's files as they stood once
  its checkpoint of step 8 was written (as a run killed then leaves them,
  without its lock): one training makes both.
  """
  reference = tmp_path_factory.mktemp("reference") / "run"
  stopped = tmp_path_factory.mktemp("stopped") / "run"
  save = tf.train.CheckpointManager.save

  def save_and_copy_at_step_8(manager, *args, **kwargs):
    path = save(manager, *args, **kwargs)
    if path == str(reference / "ckpt-8"):
      shutil.copytree(
        reference, stopped, ignore=shutil.ignore_patterns(_lock.LOCK_FILE)
      )
    return path

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tf.train.CheckpointManager, "save", save_and_copy_at_step_8)
    _train(reference, 10)
  assert _steps_on_disk(stopped) == [4, 6, 8]
  assert cli_helpers.latest_step(stopped) == 8
  return reference, stopped


def _damage(model_dir, how):
  if how == "deleted index":
    (model_dir / "ckpt-8.index").unlink()
    return "ckpt-8.index is missing"
  if how == "deleted state file":
    (model_dir / "checkpoint").unlink()
    return None
  if how == "truncated data":
    [data_file] = model_dir.glob("ckpt-8.data-*")
    data_file.write_bytes(data_file.read_bytes()[:100])
    return "ckpt-8.{index,data-*} cannot be read"
  raise ValueError(how)


@pytest.mark.parametrize(
  "how", ["deleted index", "deleted state file", "truncated data"]
)
def test_a_damaged_latest_checkpoint_falls_back_and_loses_nothing(
  tmp_path, uninterrupted, how, caplog
):
  reference, stopped = uninterrupted
  model_dir = tmp_path / "run"
  shutil.copytree(stopped, model_dir)
  best_before = _values(training.checkpoint_path(str(model_dir), "best"))
  damaged = _damage(model_dir, how)
  with caplog.at_level("INFO"):
    _train(model_dir, 10)
  resumed_from = 8 if damaged is None else 6
  assert f"Resumed from {model_dir}/ckpt-{resumed_from}" in caplog.text
  if damaged is not None:
    assert damaged in caplog.text
    assert list(model_dir.glob("ckpt-8.*.damaged"))
  # Every checkpoint an uninterrupted run keeps, with its values: nothing
  # restarted from step 0, no intact checkpoint deleted for a damaged one.
  assert _steps_on_disk(model_dir) == _steps_on_disk(reference) == [6, 8, 10]
  for step in (6, 8, 10):
    cli_helpers.assert_same_values(
      _values(model_dir / f"ckpt-{step}"), _values(reference / f"ckpt-{step}")
    )
  best = training.checkpoint_path(str(model_dir), "best")
  cli_helpers.assert_same_values(
    _values(best), _values(training.checkpoint_path(str(reference), "best"))
  )
  assert (
    _values(best)["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
    >= best_before["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
  )


def test_no_intact_checkpoint_stops_with_a_clear_error(tmp_path, uninterrupted):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  for index in model_dir.glob("ckpt-*.index"):
    index.unlink()
  with pytest.raises(
    training.ConfigError,
    match="No intact checkpoint .*/ckpt-8.index is missing",
  ):
    _train(model_dir, 10)
  # Nothing was trained from step 0 over the damaged run, and a rerun
  # stops again: the damaged files are left where they were.
  assert not list(model_dir.glob("ckpt-*.index"))
  assert len(list(model_dir.glob("ckpt-*.data-*"))) == 3
  with pytest.raises(training.ConfigError, match="No intact checkpoint"):
    _train(model_dir, 10)


def test_after_a_fallback_the_best_checkpoint_keeps_its_record(
  tmp_path, uninterrupted
):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  # A best model better than anything this run will reach again.
  best = tf.train.CheckpointManager(
    tf.train.Checkpoint(best_accuracy=tf.Variable(0.99)),
    str(model_dir / "best"),
    max_to_keep=1,
  )
  best_path = best.save(checkpoint_number=8)
  (model_dir / "ckpt-8.index").unlink()
  result = _train(model_dir, 10)
  assert result["best_accuracy"] == pytest.approx(0.99)
  # Validations at 8 and 10 were worse: best/ still holds that model.
  assert training.checkpoint_path(str(model_dir), "best") == best_path
  assert _values(model_dir / "ckpt-10")[
    "best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"
  ] == pytest.approx(0.99)


def _files(directory):
  return {
    path.name: path.read_bytes()
    for path in pathlib.Path(directory).iterdir()
    if path.is_file()
  }


def test_a_best_checkpoint_without_latest_ones_is_never_trained_over(
  tmp_path, uninterrupted
):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  for path in model_dir.glob("ckpt-*"):
    path.unlink()
  (model_dir / "checkpoint").unlink()
  best_before = _files(model_dir / "best")
  best = training.checkpoint_path(str(model_dir), "best")
  recorded = _values(best)["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
  with pytest.raises(
    training.ConfigError,
    match=(
      rf"holds a best checkpoint \({re.escape(best)}, validation accuracy "
      rf"{recorded:.4f}\) but no checkpoint to resume from.* delete "
      rf"'{re.escape(str(model_dir / 'best'))}' or use a new --model_dir"
    ),
  ):
    _train(model_dir, 10)
  assert _files(model_dir / "best") == best_before
  assert not list(model_dir.glob("ckpt-*"))


class _Killed(Exception):
  """Stands for a SIGKILL at a given point of the loop."""


def test_a_run_killed_after_its_first_best_save_can_resume(
  tmp_path, monkeypatch
):
  # Validation at step 2, checkpoints every 4: the first best model comes
  # before the first checkpoint is due.
  config = training.make_config(
    {
      **_TINY_RUN,
      "schedule.steps": 3,
      "schedule.validate_every": 2,
      "schedule.checkpoint_every": 4,
    }
  )
  model_dir = tmp_path / "run"
  save = tf.train.CheckpointManager.save

  def die_once_best_is_saved(manager, *args, **kwargs):
    path = save(manager, *args, **kwargs)
    if os.path.basename(manager.directory) == "best":
      raise _Killed
    return path

  monkeypatch.setattr(
    tf.train.CheckpointManager, "save", die_once_best_is_saved
  )
  with pytest.raises(_Killed):
    training.train(config, str(model_dir), progress=False)
  monkeypatch.undo()
  assert (
    training.checkpoint_step(training.checkpoint_path(str(model_dir), "best"))
    == 2
  )
  # A checkpoint to resume from was saved with the best model.
  assert (
    training.checkpoint_step(training.checkpoint_path(str(model_dir), "latest"))
    == 2
  )
  assert training.train(config, str(model_dir), progress=False)["step"] == 3
  assert _steps_on_disk(model_dir) == [2, 3]


# Launcher arguments for steps of one episode of one query a class: the
# launcher's runs here are about their checkpoints, not their episodes.
_ONE_EPISODE = ("--config.data.queries=1", "--config.data.meta_batch_size=1")


# A training whose checkpoint of step 2 finds the disk full: the save
# leaves a data file cut short, as a full disk does, and fails as
# TensorFlow's file system reports ENOSPC.
_DISK_FULL_SCRIPT = """
import os
import sys

from absl import app
import tensorflow as tf

save = tf.train.CheckpointManager.save


def save_on_a_full_disk(self, checkpoint_number=None, **kwargs):
  if checkpoint_number != 2:
    return save(self, checkpoint_number=checkpoint_number, **kwargs)
  prefix = os.path.join(self.directory, "ckpt-2")
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.write(bytes(100))
  raise tf.errors.ResourceExhaustedError(
      None, None, prefix + ".data-00000-of-00001; No space left on device")


tf.train.CheckpointManager.save = save_on_a_full_disk
from launch import train

app.run(train.main, flags_parser=train._parse_flags, argv=sys.argv)
"""


def test_a_full_disk_while_checkpointing_is_one_line_and_a_rerun_resumes(
  tmp_path, caplog
):
  model_dir = tmp_path / "run"
  args = cli_helpers.tiny_run_args(
    model_dir, 3, "--config.schedule.checkpoint_every=1", *_ONE_EPISODE
  )
  full = subprocess.run(
    [sys.executable, "-c", _DISK_FULL_SCRIPT, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    check=False,
  )
  assert full.returncode == 1, full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  [line] = [
    line for line in full.stderr.splitlines() if line.startswith("error:")
  ]
  assert line.startswith(
    f"error: Disk full at {model_dir}: the checkpoint of step 2 could not "
    f"be written ("
  ), line
  assert line.endswith(
    "Free space and rerun with the same --model_dir: training resumes from "
    "the last intact checkpoint."
  ), line
  assert cli_helpers.latest_step(model_dir) == 1

  # The rerun in-process, with the run's saved config: the one-line error
  # above is the launcher's part.
  with caplog.at_level("INFO"):
    training.train(
      training.load_config(model_dir), str(model_dir), progress=False
    )
  assert f"Resumed from {model_dir}/ckpt-1 (step 1)" in caplog.text
  assert list(model_dir.glob("ckpt-2.data-*.damaged"))
  assert cli_helpers.latest_step(model_dir) == 3


def test_sigterm_saves_the_current_step_and_exits_with_a_message(
  tmp_path, processes
):
  model_dir = tmp_path / "run"
  # Checkpoints only at the end: the one SIGTERM writes is the only one.
  run = processes.start(
    "run",
    "launch.train",
    cli_helpers.tiny_run_args(
      model_dir, 1000, "--config.schedule.checkpoint_every=1000", *_ONE_EPISODE
    ),
  )
  cli_helpers.wait_until(
    lambda: "Step 3/1000" in processes.log(run), timeout=240, processes=[run]
  )
  assert cli_helpers.latest_step(model_dir) == -1
  run.send_signal(signal.SIGTERM)
  assert processes.wait(run, 120) != 0
  log = processes.log(run)
  match = re.search(
    r"Stopped by SIGTERM at step (\d+)/1000; saved (\S+)\. "
    r"Run the same command again to resume\.",
    log,
  )
  assert match, log[-3000:]
  step = int(match.group(1))
  assert step >= 3 and match.group(2) == f"{model_dir}/ckpt-{step}"
  assert cli_helpers.latest_step(model_dir) == step
  assert training.checkpoint_step(str(model_dir / f"ckpt-{step}")) == step
  assert "Traceback" not in log
  assert not (model_dir / ".lock").exists()
