"""Cost and accuracy of `adapt` as the support embeddings grow.

For embeddings scaled by each --scales factor and each T of --t_finals,
in float32 and float64 under XLA: the solver steps and the time of the
plain solve and of the meta-gradient (method "auto", default tolerances).
Their accuracy against SciPy's LSODA is tested in
tests/test_adapt_scale.py. The machine's float32 matmul peak is measured
first, in the same process.

  python -m launch.benchmark_scale
"""

import time

from absl import app
from absl import flags
import numpy as np

import launch
from launch import machine

_SCALES = flags.DEFINE_list(
  "scales", ["1", "10", "100", "1000"], "Factors of the embeddings."
)
_T_FINALS = flags.DEFINE_list("t_finals", ["10", "1000"], "Times T.")
_TASKS = flags.DEFINE_integer("tasks", 8, "Tasks per call (5-way 2-shot).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls; the median.")
launch.require_positive_list(_SCALES)
launch.require_positive_list(_T_FINALS)

_WAYS, _SHOTS, _SIZE = 5, 2, 64


def make_tasks(scale, tasks, seed=0):
  """W0 = 0 [N, d], embeddings [B, M, d] (normal times scale), labels."""
  rng = np.random.default_rng(seed)
  embeddings = scale * rng.standard_normal((tasks, _WAYS * _SHOTS, _SIZE))
  labels = np.tile(np.repeat(np.arange(_WAYS), _SHOTS), (tasks, 1))
  return np.zeros((_WAYS, _SIZE)), embeddings, labels


def _median_seconds(function, args, repeats):
  function(*args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function(*args)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_case(scale, t_final, dtype, repeats, tasks):
  """(solver steps, plain solve ms, meta-gradient ms)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import comln_tf  # pylint: disable=g-import-not-at-top

  init_weights, embeddings, labels = make_tasks(scale, tasks)
  args = (
    tf.constant(init_weights, dtype),
    tf.constant(embeddings, dtype),
    tf.constant(labels),
    tf.constant(t_final, dtype),
  )
  plain_method = comln_tf.Backprop(tangent_control=False)

  @tf.function(jit_compile=True)
  def plain(w0, x, y, t):
    return comln_tf.adapt(w0, x, y, t, method=plain_method, return_stats=True)

  @tf.function(jit_compile=True)
  def meta_gradient(w0, x, y, t):
    with tf.GradientTape() as tape:
      tape.watch([w0, x, t])
      weights = comln_tf.adapt(w0, x, y, t)
      loss = tf.reduce_sum(tf.square(weights))
    return tape.gradient(loss, [w0, x, t])

  _, stats = plain(*args)
  return (
    int(stats.num_steps),
    1e3 * _median_seconds(plain, args, repeats),
    1e3 * _median_seconds(meta_gradient, args, repeats),
  )


def main(argv):
  launch.start(argv)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  print(f"float32 matmul peak: {machine.matmul_peak_gflops():.0f} GFLOP/s")
  print(
    f"{_TASKS.value} tasks of 5-way 2-shot, d = {_SIZE}, W0 = 0, XLA, "
    "rtol = atol = 1e-5\n"
  )
  print("| scale | T | dtype | steps | plain solve ms | meta-gradient ms |")
  print("|---|---|---|---|---|---|")
  for scale in map(float, _SCALES.value):
    for t_final in map(float, _T_FINALS.value):
      for dtype in (tf.float32, tf.float64):
        steps, plain_ms, gradient_ms = measure_case(
          scale, t_final, dtype, _REPEATS.value, _TASKS.value
        )
        print(
          f"| {scale:g} | {t_final:g} | {dtype.name} | {steps} | "
          f"{plain_ms:.1f} | {gradient_ms:.1f} |"
        )


if __name__ == "__main__":
  app.run(main)
