"""Tests of the lock of a run's directory (comln_tf/training/_lock.py):
one training at a time, stale locks taken over by exactly one process, and
one-line errors for directories that cannot be used."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import tensorflow as tf

import cli_helpers
from cli_helpers import REPO
from comln_tf import training
from comln_tf.training import _lock


def _run_args(model_dir, steps):
  """A tiny run's launcher arguments: one episode of one query a class a
  step, a checkpoint every 2 steps."""
  return cli_helpers.tiny_run_args(
    model_dir,
    steps,
    "--config.schedule.checkpoint_every=2",
    "--config.data.queries=1",
    "--config.data.meta_batch_size=1",
  )


def test_a_second_training_is_refused_and_a_stale_lock_taken_over(
  tmp_path, processes
):
  model_dir = tmp_path / "run"
  first = processes.start("first", "launch.train", _run_args(model_dir, 1000))
  cli_helpers.wait_until(
    lambda: cli_helpers.latest_step(model_dir) >= 2,
    timeout=240,
    processes=[first],
  )
  # Paused, it still runs (and holds the lock) but spends no CPU on the
  # steps while the second one starts.
  first.send_signal(signal.SIGSTOP)
  lock = json.loads((model_dir / ".lock").read_text())
  assert lock["pid"] == first.pid
  config = (model_dir / "config.json").read_text()
  second = cli_helpers.run(
    "launch.train", _run_args(model_dir, 1000), timeout=120
  )
  assert second.returncode != 0
  assert (
    f"is in use by another training (pid {first.pid} on host {lock['host']}"
  ) in second.stderr
  assert "Traceback" not in second.stderr
  assert (model_dir / "config.json").read_text() == config
  # A crash leaves the lock behind; the next training takes it over.
  first.send_signal(signal.SIGKILL)
  processes.wait(first, 30)
  assert json.loads((model_dir / ".lock").read_text())["pid"] == first.pid
  third = cli_helpers.run("launch.train", _run_args(model_dir, 2), timeout=240)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "Taking over the stale lock" in third.stderr
  assert not (model_dir / ".lock").exists()


def test_lock_of_a_live_process_on_another_host_is_respected(tmp_path):
  (tmp_path / ".lock").write_text(
    json.dumps({"host": "elsewhere.example", "pid": 1, "start": None})
  )
  with (
    pytest.raises(
      training.ConfigError,
      match="in use by another training .pid 1 on host elsewhere.example",
    ),
    _lock.RunLock(str(tmp_path)),
  ):
    pass
  # The same record on this host, of a process that is gone: stale.
  (tmp_path / ".lock").write_text(
    json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "start": None})
  )
  with _lock.RunLock(str(tmp_path)) as taken:
    assert json.loads(pathlib.Path(taken.path).read_text())["pid"] == (
      os.getpid()
    )
  assert not (tmp_path / ".lock").exists()


# Processes forked at once take over a stale lock: each writes "won" (and
# holds the lock until every taker has tried) or "lost". Prints the
# outcomes of each race.
_LOCK_RACE_SCRIPT = """
import json
import os
import socket
import sys
import time

from comln_tf.config import ConfigError
from comln_tf.training import _lock


def write(results, index, outcome):
  path = os.path.join(results, str(index))
  with open(path + ".tmp", "w") as f:
    f.write(outcome)
  os.replace(path + ".tmp", path)


def taker(directory, results, index, takers, start):
  time.sleep(max(0.0, start - time.time()))
  try:
    with _lock.RunLock(directory):
      write(results, index, "won")
      deadline = time.time() + 60
      while len(os.listdir(results)) < takers and time.time() < deadline:
        time.sleep(0.01)
  except ConfigError as error:
    lost = "in use by another training" in str(error)
    write(results, index, "lost" if lost else f"error: {error}")


def race(directory, takers):
  os.makedirs(directory)
  with open(os.path.join(directory, _lock.LOCK_FILE), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": 2**22 + 1}, f)
  results = os.path.join(directory, "results")
  os.makedirs(results)
  start = time.time() + 0.3
  children = []
  for index in range(takers):
    pid = os.fork()
    if pid == 0:
      try:
        taker(directory, results, index, takers, start)
      finally:
        os._exit(0)
    children.append(pid)
  for pid in children:
    os.waitpid(pid, 0)
  return sorted(
    open(os.path.join(results, name)).read() for name in os.listdir(results)
  )


base, races, takers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(json.dumps([race(os.path.join(base, str(i)), takers)
                  for i in range(races)]))
"""


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_processes(
  tmp_path,
):
  races, takers = 5, 12
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _LOCK_RACE_SCRIPT,
      str(tmp_path),
      str(races),
      str(takers),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  assert outcomes == [["lost"] * (takers - 1) + ["won"]] * races, outcomes
  for index in range(races):
    assert not (tmp_path / str(index) / ".lock").exists()


def test_unusable_model_dir_and_export_base_give_one_line_errors(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = cli_helpers.run(
    "launch.train", cli_helpers.tiny_run_args(blocker / "run", 2), timeout=120
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  [line] = [
    line for line in result.stderr.splitlines() if line.startswith("error:")
  ]
  assert f"{blocker / 'run'} cannot be used: Not a directory" in line

  config = training.make_config({"data.example_shape": [28, 28, 1]})
  model_dir = tmp_path / "run"
  training.save_config(str(model_dir), config)
  training.make_checkpoint(
    training.build_model(config), step=tf.Variable(1, dtype=tf.int64)
  ).save(str(model_dir / "ckpt"))
  result = cli_helpers.run(
    "export.export_model",
    [f"--model_dir={model_dir}", f"--export_base={blocker}"],
    timeout=240,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert (
    f"export_model: export_base '{blocker}' is a file, not a directory"
  ) in result.stderr
