"""Helpers of the launcher tests: bounded subprocesses and checkpoint reads.

Every process these helpers start is bounded by a timeout, and the
`processes` fixture of a test kills whatever is still running at its end.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tiny Omniglot runs: the default config (Conv-4, 5-way 1-shot) with 4
# episodes of 5 queries a class.
TINY_ARGS = (
  "--config=configs/base.py",
  "--config.data.ways=5",
  "--config.data.shots=1",
  "--config.data.queries=5",
  "--config.data.meta_batch_size=4",
  "--config.schedule.validation_episodes=10",
  "--noprogress",
)


def tiny_run_args(model_dir, steps, *extra):
  """Arguments of launch.train for a tiny run of `steps` steps in model_dir.

  A log line every step, no validation, seed 3; `extra` arguments last.
  """
  return (
    (f"--model_dir={model_dir}",)
    + TINY_ARGS
    + (
      f"--config.schedule.steps={steps}",
      "--config.schedule.log_every=1",
      "--config.schedule.validate_every=0",
      "--config.run.seed=3",
    )
    + tuple(extra)
  )


def environment(**extra):
  """The environment of a launcher: the test's, plus `extra` (str values)."""
  env = dict(os.environ)
  env.update(extra)
  return env


def command(module, args):
  return [sys.executable, "-m", module] + [str(arg) for arg in args]


def run(module, args, timeout, env=None):
  """Runs `python -m module args` from the repository root to completion.

  Returns:
    subprocess.CompletedProcess with text stdout and stderr.

  Raises:
    subprocess.TimeoutExpired: after killing the process.
  """
  return subprocess.run(
    command(module, args),
    cwd=REPO,
    env=env or environment(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


class Processes:
  """Starts launchers in the background and kills them at the end."""

  def __init__(self, log_dir):
    self._log_dir = pathlib.Path(log_dir)
    self._started = []

  def start(self, name, module, args, env=None):
    """Starts `python -m module args`; output goes to log_dir/<name>.log."""
    log_path = self._log_dir / f"{name}.log"
    # The child writes into its own copy of the file descriptor.
    with open(log_path, "w") as log:
      process = subprocess.Popen(
        command(module, args),
        cwd=REPO,
        env=env or environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    process.log_path = str(log_path)
    self._started.append(process)
    return process

  @staticmethod
  def log(process):
    return pathlib.Path(process.log_path).read_text()

  def wait(self, process, timeout):
    """Waits for `process` to exit; returns its exit code.

    Raises:
      AssertionError: it did not exit within `timeout` seconds (it is
        killed), with the end of its log.
    """
    try:
      return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      raise AssertionError(
        f"timed out after {timeout} s:\n{self.log(process)[-3000:]}"
      ) from None

  def kill_all(self):
    for process in self._started:
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()


def latest_step(model_dir):
  """Step of the latest checkpoint named by model_dir's state file, or -1."""
  state = pathlib.Path(model_dir) / "checkpoint"
  if not state.exists():
    return -1
  match = re.search(
    r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.MULTILINE
  )
  return int(match.group(1)) if match else -1


def wait_until(condition, timeout, processes=(), interval=0.05):
  """Polls `condition()` until true.

  Raises:
    AssertionError: `timeout` seconds passed, or one of `processes` exited
      before the condition held.
  """
  deadline = time.monotonic() + timeout
  while not condition():
    for process in processes:
      if process.poll() is not None:
        raise AssertionError(
          f"process exited with {process.returncode} before the condition held"
        )
    if time.monotonic() > deadline:
      raise AssertionError(f"condition not met within {timeout} s")
    time.sleep(interval)


def free_ports(count):
  """`count` distinct free TCP ports on 127.0.0.1."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def scalars(event_dir):
  """{tag: [(step, value)]} of the summaries in an event directory."""
  values = {}
  for path in sorted(pathlib.Path(event_dir).glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"
        values.setdefault(value.tag, []).append(
          (event.step, float(tf.make_ndarray(value.tensor)))
        )
  return values


def checkpoint_values(path):
  """{name: numpy value} of every variable of a checkpoint."""
  reader = tf.train.load_checkpoint(str(path))
  return {
    name: reader.get_tensor(name)
    for name in reader.get_variable_to_shape_map()
    if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
  }


def model_values(path):
  """{name: value} of the model's variables (and the step) of a checkpoint.

  Leaves out the optimizer, which holds its own references to the model's
  variables, and the checkpoint's save counter.
  """
  return {
    name: value
    for name, value in checkpoint_values(path).items()
    if name.startswith(("model/", "model_variables/", "step/"))
  }


def relative_difference(actual, expected):
  """||actual - expected|| / ||expected||, over all the values of two dicts."""
  assert sorted(actual) == sorted(expected)
  difference = sum(
    np.sum((np.asarray(actual[name], np.float64) - expected[name]) ** 2)
    for name in expected
  )
  norm = sum(
    np.sum(np.asarray(expected[name], np.float64) ** 2) for name in expected
  )
  return float(np.sqrt(difference / norm))


def assert_same_values(actual, expected, rtol=0.0, atol=0.0):
  """Both dicts have the same keys and (close) values."""
  assert sorted(actual) == sorted(expected)
  for name in expected:
    np.testing.assert_allclose(
      actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name
    )


# Runs `python -m <module>` once per JSON list of arguments (argv[2]): the
# module (and TensorFlow) is imported once, then each invocation is a
# process of its own, forked from this one, with its own flags, exit status,
# stdout and stderr. Its stdout and stderr go to files; SIGALRM ends one that
# hangs.
_INVOCATIONS_SCRIPT = r"""
import importlib
import json
import os
import signal
import sys
import tempfile

from absl import app

module = importlib.import_module(sys.argv[1])
timeout = int(sys.argv[3])
results = []
for args in json.loads(sys.argv[2]):
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      signal.alarm(timeout)
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      sys.argv = [module.__file__] + args
      app.run(module.main)  # Exits this process, as `python -m` would.
    _, status = os.waitpid(pid, 0)
    texts = []
    for f in (out, err):
      f.seek(0)
      texts.append(f.read().decode())
  results.append([os.waitstatus_to_exitcode(status)] + texts)
print(json.dumps(results))
"""


def run_invocations(module, arg_lists, timeout=180):
  """Runs `python -m module args` for each list of `arg_lists`.

  Each is a separate process (see _INVOCATIONS_SCRIPT); they share the
  start-up of one interpreter.

  Returns:
    list of subprocess.CompletedProcess (text stdout and stderr), in order.
  """
  arg_lists = [[str(arg) for arg in args] for args in arg_lists]
  driver = subprocess.run(
    [
      sys.executable,
      "-c",
      _INVOCATIONS_SCRIPT,
      module,
      json.dumps(arg_lists),
      str(timeout),
    ],
    cwd=REPO,
    env=environment(),
    capture_output=True,
    text=True,
    timeout=60 + timeout * len(arg_lists),
    check=False,
  )
  assert driver.returncode == 0, driver.stderr[-3000:]
  return [
    subprocess.CompletedProcess(["-m", module] + args, code, stdout, stderr)
    for args, (code, stdout, stderr) in zip(
      arg_lists, json.loads(driver.stdout.splitlines()[-1])
    )
  ]
