"""tf.distribute strategies for meta-training, and per-worker file paths."""

from collections.abc import Sequence
import json
import os
import re

import tensorflow as tf

from comln_tf import _validation
from comln_tf.config import ConfigError
from comln_tf.config import STRATEGIES

_CPU_DEVICE = re.compile(r"^/(?:device:)?cpu:(\d+)$", re.IGNORECASE)


def _configure_logical_cpus(devices):
  """Splits the CPU into enough logical devices for the CPUs in `devices`.

  `/cpu:1` exists only once the host CPU has been split into logical
  devices, which must happen before TensorFlow initializes its runtime.

  Args:
    devices: list of device names, e.g. ["/cpu:0", "/cpu:1"].

  Raises:
    ConfigError: the runtime is already initialized with fewer CPU devices.
  """
  indices = [int(m.group(1)) for m in map(_CPU_DEVICE.match, devices) if m]
  if not indices:
    return
  wanted = max(indices) + 1
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) >= wanted:
    return
  try:
    tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * wanted
    )
  except RuntimeError as error:
    raise ConfigError(
      f"config.run.devices={list(devices)!r} needs {wanted} logical CPU "
      f"devices, "
      f"but TensorFlow is already initialized: {error}"
    ) from error


def make_strategy(
  name: str, devices: Sequence[str] | None = None, tpu: str | None = None
) -> tf.distribute.Strategy:
  """Creates the tf.distribute strategy of a run.

  Call it before any other TensorFlow op: the multi-worker and logical CPU
  set-ups need an uninitialized runtime.

  Args:
    name: "default" (one device), "mirrored" (all local GPUs, or `devices`),
      "multi_worker" (MultiWorkerMirroredStrategy; cluster from TF_CONFIG)
      or "tpu" (TPUStrategy).
    devices: list of device names for "mirrored", e.g. ["/cpu:0", "/cpu:1"];
      CPU devices past the first are created as logical devices.
    tpu: TPU name or address for "tpu" ("local" on a TPU VM).

  Returns:
    A tf.distribute.Strategy.

  Raises:
    ConfigError: unknown name, missing TF_CONFIG, or no TPU.
  """
  _validation.one_of("config.run.strategy", name, STRATEGIES, error=ConfigError)
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices:
      _configure_logical_cpus(devices)
    return tf.distribute.MirroredStrategy(devices or None)
  if name == "multi_worker":
    if not os.environ.get("TF_CONFIG"):
      raise ConfigError(
        "config.run.strategy='multi_worker' needs the "
        "TF_CONFIG "
        "environment variable (cluster and task of this "
        "worker)."
      )
    try:
      json.loads(os.environ["TF_CONFIG"])
    except ValueError as error:
      raise ConfigError(
        f"config.run.strategy='multi_worker': TF_CONFIG is "
        f"not valid "
        f"JSON: {error}"
      ) from error
    return tf.distribute.MultiWorkerMirroredStrategy()
  # name == "tpu"
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as error:
    first_line = str(error).strip().splitlines()[0]
    raise ConfigError(
      f"config.run.strategy='tpu': no TPU available "
      f"(config.run.tpu={tpu!r}): "
      f"{first_line}"
    ) from error
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this worker writes the run's files (summaries, config, export).

  Every worker but the multi-worker chief (or worker 0 without a chief)
  answers False.
  """
  return strategy.extended.should_checkpoint


def worker_dir(directory: str, strategy: tf.distribute.Strategy) -> str:
  """Where this worker writes the checkpoints of `directory`.

  TensorFlow's multi-worker convention: every worker saves (saving may need
  collective ops), the chief into `directory`, the others into a temporary
  directory that they delete after each save.

  Args:
    directory: str, the directory the chief writes.
    strategy: the run's tf.distribute.Strategy.

  Returns:
    str, `directory` on the chief, else `directory/workertemp_<task_id>`.
  """
  if is_chief(strategy):
    return directory
  return os.path.join(
    directory, f"workertemp_{strategy.cluster_resolver.task_id}"
  )
