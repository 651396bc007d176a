"""A run's outputs while it trains, and its stop on SIGTERM.

`Monitor` writes TensorBoard summaries, the progress bar or log lines, and
measures throughput; `SigtermFlag` turns SIGTERM into a flag the loop reads
after each step, so that it saves the step's checkpoint before it exits
(`Preempted`).
"""

from collections.abc import Callable, Iterator
import datetime
import logging
import os
import signal
import sys
import threading
import time

import ml_collections
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
import tqdm

from comln_tf.training._step import METRICS

_LOG = logging.getLogger(__name__)


# TensorBoard's scalar-plugin metadata, so that summaries need no
# `tensorboard` package to be written (tf.summary.scalar does).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
  plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
)


def _write_scalars(
  writer: tf.summary.SummaryWriter, values: dict[str, float], step: int
) -> None:
  """Writes float scalars as TensorBoard scalar summaries at `step`."""
  with writer.as_default():
    for name, value in values.items():
      tf.summary.write(
        name,
        tf.constant(value, tf.float32),
        step=step,
        metadata=_SCALAR_METADATA,
      )


class Monitor:
  """The run's outputs: summaries, progress, log lines, throughput.

  Metrics are read from the step's accumulators once per log window (the
  only host round-trip of training). On a terminal, progress is a bar with
  an ETA; otherwise (log files, --noprogress) one log line per window. A
  non-chief worker writes nothing.
  """

  def __init__(
    self,
    model_dir: str,
    config: ml_collections.ConfigDict,
    start: int,
    chief: bool,
    progress: bool,
  ):
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
    self.logs: dict[str, float] = {}

  def run_step(self, train_step: Callable, iterator: Iterator) -> None:
    """Runs one training step, timing it."""
    begin = time.perf_counter()
    train_step(iterator)
    self._window_time += time.perf_counter() - begin
    self._bar.update(1)

  def log_window(
    self,
    step: int,
    totals: dict[str, tf.Variable],
    t_final: float,
    learning_rate: float,
  ) -> None:
    """Writes the means of the window's steps (and zeroes the totals)."""
    count = max(float(totals["steps"].numpy()), 1.0)
    logs = {name: float(totals[name].numpy()) / count for name in METRICS}
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

  def log_validation(self, step: int, summary: dict, improved: bool) -> None:
    """Writes and logs a validation's accuracy and 95% interval."""
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
  def episodes_per_second(self) -> float | None:
    """Training throughput after the first log window, or None."""
    if not self._steady_steps:
      return None
    return self._steady_steps * self._batch_size / self._steady_time

  def close(self) -> None:
    self._bar.close()
    for writer in self._writers.values():
      writer.close()


class Preempted(SystemExit):
  """Training stopped on SIGTERM after saving a checkpoint of its step."""


class SigtermFlag:
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
