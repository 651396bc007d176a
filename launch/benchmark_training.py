"""Meta-training speed beside the machine's own peak, in one process.

Measured one after the other in this process:
1. the float32 matmul peak (`machine.matmul_peak_gflops`);
2. the backbone's training step alone: forward and backward through the
   config's backbone on the images of one meta-batch, and an SGD update;
3. meta-training itself: `training.train` on the config for --steps steps
   in a temporary model_dir (no validation), its throughput after the
   first log window (which traces), and the process's user and system
   CPU time during it.

The backbone's arithmetic is counted from its graph: the multiply-adds of
its convolutions and dense layers on one image, forward, times 3 for
forward and backward. Its GFLOP/s during meta-training is that count times
the images per second; the table gives it as a fraction of the peak.

The default workload is the main job's recipe with 15 queries per class
(5-way 1-shot, meta-batch 16: 80 images per episode):

  TFDS_DATA_DIR=../shared/tensorflow_datasets \
      python -m launch.benchmark_training
"""

import contextlib
import resource
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import omniglot_5w1s
import launch
from launch import machine

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file of the workload (default: the main job's)."
)
_QUERIES = flags.DEFINE_integer(
  "queries", 15, "Queries per class of the workload's episodes.", lower_bound=1
)
_STEPS = flags.DEFINE_integer(
  "steps",
  60,
  "Meta-training steps timed (after a first log window).",
  lower_bound=2,
)
_LOG_EVERY = flags.DEFINE_integer(
  "log_every",
  10,
  "Steps per log window; the first one is not timed.",
  lower_bound=1,
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 10, "Timed backbone steps; the median.", lower_bound=1
)


def workload_config(config, queries, steps, log_every):
  """The config trained: `config` with these queries and steps, no
  validation, one checkpoint at the end."""
  from comln_tf import training  # pylint: disable=g-import-not-at-top

  return training.make_config(
    {
      "data.queries": queries,
      "schedule.steps": steps,
      "schedule.log_every": log_every,
      "schedule.validate_every": 0,
      "schedule.checkpoint_every": steps,
    },
    base=config,
  )


def backbone_step_seconds(config, repeats):
  """Median seconds of the backbone's training step on one meta-batch."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from comln_tf import training  # pylint: disable=g-import-not-at-top

  data = config.data
  images_per_task = data.ways * (data.shots + data.queries)
  shape = [data.meta_batch_size, images_per_task, *data.example_shape]
  images = tf.random.stateless_uniform(shape, seed=[0, 1])
  backbone = training.make_backbone(config)
  backbone(images[:1, :1])
  optimizer = keras.optimizers.SGD(0.01)

  @tf.function
  def step(images):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(backbone(images, training=True)))
    gradients = tape.gradient(loss, backbone.trainable_variables)
    optimizer.apply(gradients, backbone.trainable_variables)
    return loss

  step(images).numpy()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step(images).numpy()
    times.append(time.perf_counter() - start)
  return backbone, float(np.median(times))


@contextlib.contextmanager
def cpu_times():
  """Yields a dict filled on exit with the process's "user" and "system"
  CPU seconds spent inside the block."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  times = {}
  yield times
  after = resource.getrusage(resource.RUSAGE_SELF)
  times["user"] = after.ru_utime - before.ru_utime
  times["system"] = after.ru_stime - before.ru_stime


def meta_training(config):
  """(episodes/s after the first log window, CPU times) of a training."""
  from comln_tf import training  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as model_dir, cpu_times() as times:
    result = training.train(config, model_dir, progress=False)
  return result["train_episodes_per_second"], times


def main(argv):
  launch.start(argv)
  peak = machine.matmul_peak_gflops()
  config = workload_config(
    _CONFIG.value or omniglot_5w1s.get_config(),
    _QUERIES.value,
    _STEPS.value,
    _LOG_EVERY.value,
  )
  from comln_tf import training  # pylint: disable=g-import-not-at-top

  _, example_shape = training.load_data(config)
  config = training.updated(config, {"data.example_shape": example_shape})
  data = config.data
  images_per_episode = data.ways * (data.shots + data.queries)
  backbone, seconds = backbone_step_seconds(config, _REPEATS.value)
  train_flops = 3 * machine.backbone_flops(backbone, example_shape)
  per_episode = train_flops * images_per_episode
  backbone_episodes = data.meta_batch_size / seconds
  episodes, times = meta_training(config)
  rows = [
    ("backbone step alone", backbone_episodes),
    ("meta-training step", episodes),
  ]
  print(
    f"float32 matmul peak: {peak:.1f} GFLOP/s. Workload: {data.ways}-way "
    f"{data.shots}-shot, {data.queries} queries, meta-batch "
    f"{data.meta_batch_size}, {images_per_episode} images of "
    f"{list(example_shape)} per episode; backbone {train_flops / 1e6:.1f} "
    f"MFLOP per image forward and backward, {per_episode / 1e9:.2f} GFLOP "
    f"per episode.\n"
  )
  print("| measured | episodes/s | backbone GFLOP/s | of the peak |")
  print("|---|---|---|---|")
  for name, rate in rows:
    gflops = rate * per_episode / 1e9
    print(f"| {name} | {rate:.1f} | {gflops:.1f} | {gflops / peak:.0%} |")
  print(
    f"\nMeta-training, {_STEPS.value} steps: {times['user']:.0f} s user, "
    f"{times['system']:.0f} s system CPU time."
  )


if __name__ == "__main__":
  app.run(main)
