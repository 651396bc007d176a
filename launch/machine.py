"""The machine's own reference for timings: its float32 matmul peak.

Machines of one kind differ in speed, so a benchmark reports its times
beside this figure, measured in the same process.
"""

import time


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
  """The best float32 GFLOP/s of a [size, size] matmul on this process's CPU.

  Args:
    size: the matrices' side.
    repeats: timed products (after one warm-up); the fastest counts.

  Returns:
    2 size^3 / seconds of the fastest product, in GFLOP/s.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  a = tf.random.stateless_normal([size, size], seed=[0, 1])
  b = tf.random.stateless_normal([size, size], seed=[0, 2])
  product = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
  product(a, b).numpy()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, b).numpy()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9
