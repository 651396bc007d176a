"""Synthetic meta-batches and gradient-method names shared by the benchmarks.

No flags here: `launch.benchmark` and `launch.gradient_accuracy` both use
it, each with its own flags. "backprop_plain" and "discrete_adjoint_plain"
name `Backprop` and `DiscreteAdjoint` with the step control on the state
alone (no probe tangent), to compare with the defaults.
"""

import time

import numpy as np

# The names a --methods flag accepts.
METHODS = (
  "forward",
  "backprop",
  "adjoint",
  "discrete_adjoint",
  "auto",
  "backprop_plain",
  "discrete_adjoint_plain",
)


def measure(run, args, repeats):
  """Times `run(*args)` and its peak CPU memory, after a first (compiling) call.

  Args:
    run: a tf.function returning a structure of tensors, the first a
      tensor.
    args: its arguments.
    repeats: timed calls after the first.

  Returns:
    (outputs of the first call as numpy, seconds of the first call, list of
    seconds of each timed call, list of peak bytes of each timed call).
  """
  import tensorflow as tf  # Only the benchmark processes need it.

  start = time.perf_counter()
  outputs = run(*args)
  first = tf.nest.map_structure(lambda x: x.numpy(), outputs)
  compile_seconds = time.perf_counter() - start
  times, peaks = [], []
  for _ in range(repeats):
    # The previous run's outputs are freed first: the peak is one run's.
    del outputs
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = time.perf_counter()
    outputs = run(*args)
    outputs[0].numpy()
    times.append(time.perf_counter() - start)
    peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"])
  return first, compile_seconds, times, peaks


def make_workload(
  tasks,
  ways,
  shots,
  queries,
  size,
  seed=0,
  shared_mean=0.0,
  noise=1.0,
  tied_init=False,
):
  """Synthetic embeddings with class structure, like a backbone's output.

  Non-negative (post-ReLU) features: x = relu(mu_class + noise) / sqrt(d)
  * 4; with the defaults |x|^2 is about 6 and tasks are separable but not
  trivially.

  Args:
    tasks, ways, shots, queries: B, N, k and q (queries per class).
    size: embedding size d.
    seed: of the draw.
    shared_mean: scale of a mean shared by the classes of a task, added to
      each class mean: a trained backbone's features are correlated.
    noise: standard deviation of the examples around their class mean.
    tied_init: W0 = 0 (the tied rows of training) instead of random rows.

  Returns:
    dict of float32 / int32 numpy arrays: init_weights [N, d], support
    [B, N k, d], support_labels [B, N k], queries [B, N q, d], query_labels
    [B, N q].
  """
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(tasks, ways, 1, size))
  if shared_mean:
    # Its own stream: the default workload stays the same draw.
    means = means + shared_mean * np.random.default_rng(seed + 1).normal(
      size=(tasks, 1, 1, size)
    )

  def draw(count):
    noise_draw = noise * rng.normal(size=(tasks, ways, count, size))
    features = np.maximum(means + noise_draw, 0.0) / np.sqrt(size) * 4.0
    labels = np.broadcast_to(
      np.arange(ways)[None, :, None], (tasks, ways, count)
    )
    return (
      features.reshape(tasks, ways * count, size).astype(np.float32),
      labels.reshape(tasks, ways * count).astype(np.int32),
    )

  support, support_labels = draw(shots)
  query, query_labels = draw(queries)
  init_weights = (rng.normal(size=(ways, size)) / np.sqrt(ways)).astype(
    np.float32
  )
  if tied_init:
    init_weights = np.zeros_like(init_weights)
  return dict(
    init_weights=init_weights,
    support=support,
    support_labels=support_labels,
    queries=query,
    query_labels=query_labels,
  )


def method_for(name):
  """The `adapt` method for a --methods entry."""
  # Imported here: the benchmark's parent process never loads TensorFlow.
  import comln_tf  # pylint: disable=g-import-not-at-top

  if name == "backprop_plain":
    return comln_tf.Backprop(tangent_control=False)
  if name == "discrete_adjoint_plain":
    return comln_tf.DiscreteAdjoint(tangent_control=False)
  return name
