"""The machine's own reference for timings, and the arithmetic measured.

Machines of one kind differ in speed, so a benchmark reports its times
beside the float32 matmul peak, measured in the same process, and a
throughput as a fraction of it (`backbone_flops`).
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


def backbone_flops(backbone, example_shape) -> int:
  """The FLOPs of a backbone's forward pass on one image, from its graph.

  Counts 2 per multiply-add of its convolutions and matrix products, the
  arithmetic that dominates; a training step (forward and backward) is
  about 3 times this.

  Args:
    backbone: a comln_tf backbone, taking images [B, n, H, W, C].
    example_shape: (H, W, C) of one image.

  Returns:
    int, FLOPs per image.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  spec = tf.TensorSpec([1, 1, *example_shape], tf.float32)
  graph = (
    tf.function(lambda x: backbone(x, training=True))
    .get_concrete_function(spec)
    .graph
  )
  flops = 0
  for op in graph.get_operations():
    if op.type == "Conv2D":
      filter_shape = op.inputs[1].shape.as_list()
      flops += (
        2 * np.prod(op.outputs[0].shape.as_list()) * np.prod(filter_shape[:3])
      )
    elif op.type in ("MatMul", "BatchMatMulV2"):
      flops += (
        2
        * np.prod(op.outputs[0].shape.as_list())
        * (op.inputs[0].shape.as_list()[-1])
      )
  return int(flops)
