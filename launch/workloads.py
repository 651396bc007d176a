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


PLAIN = "plain"


def query_loss_function(
  data, method_name, solver, t_final, max_steps, tasks_per_solve, xla
):
  """The query loss of a workload, or its meta-gradient, as a tf.function.

  The loss is the mean query cross-entropy after `adapt`; with a method
  name other than PLAIN, its gradient with respect to W0, the support and
  query embeddings and T is taken too (what meta-training pays).

  Args:
    data: a workload of `make_workload` (numpy arrays).
    method_name: PLAIN (a solve without gradient) or a METHODS name.
    solver: the solver name of `adapt`.
    t_final: T. max_steps: of the solve. tasks_per_solve: 0 or None for
      all tasks at once.
    xla: compile with XLA.

  Returns:
    (run, args): `run(*args)` returns (loss, gradients (empty for PLAIN),
    SolveStats).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import comln_tf  # pylint: disable=g-import-not-at-top

  inputs = [
    tf.constant(data[k]) for k in ("init_weights", "support", "queries")
  ]
  plain = method_name == PLAIN
  # The plain solve: for tfp_bdf, adapt runs it as the adjoint's forward.
  method = (
    comln_tf.Backprop(tangent_control=False)
    if plain
    else method_for(method_name)
  )

  def query_loss(init_weights, support, queries, t_final):
    weights, stats = comln_tf.adapt(
      init_weights,
      support,
      data["support_labels"],
      t_final,
      method=method,
      solver=solver,
      rtol=1e-5,
      atol=1e-5,
      max_steps=max_steps,
      tasks_per_solve=tasks_per_solve or None,
      return_stats=True,
    )
    logits = tf.matmul(queries, weights, transpose_b=True)
    loss = tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(
        data["query_labels"], logits
      )
    )
    return loss, stats

  def meta_gradient(init_weights, support, queries, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, queries, t_final])
      loss, stats = query_loss(init_weights, support, queries, t_final)
    grads = tape.gradient(loss, [init_weights, support, queries, t_final])
    return loss, grads, stats

  def loss_only(*args):
    loss, stats = query_loss(*args)
    return loss, [], stats

  run = tf.function(loss_only if plain else meta_gradient, jit_compile=xla)
  return run, [*inputs, tf.constant(float(t_final), tf.float32)]


def time_query_loss(
  data, method_name, solver, t_final, max_steps, tasks_per_solve, xla, repeats
):
  """Times `query_loss_function(...)` (see there for the arguments).

  Returns:
    (loss, gradients (empty for PLAIN), SolveStats, as numpy, then the
    seconds of the first call, the list of timed seconds, the list of peak
    bytes).
  """
  function = query_loss_function(
    data, method_name, solver, t_final, max_steps, tasks_per_solve, xla
  )
  ((loss, grads, stats), *timing) = measure([function], repeats)[0]
  return (loss, grads, stats, *timing)


def measure(functions, repeats):
  """Times functions and their peak CPU memory, after a first (compiling) call.

  The timed calls are interleaved (one of each function in turn), so that
  drifts of the machine's speed affect every function alike: ratios of
  their times are steadier than times taken one after the other.

  Args:
    functions: list of (run, args): a tf.function returning a structure of
      tensors, the first a tensor, and its arguments.
    repeats: timed calls of each function after its first.

  Returns:
    A list with, for each function: (outputs of its first call as numpy,
    seconds of its first call, list of seconds of each timed call, list of
    peak bytes of each timed call).
  """
  import tensorflow as tf  # Only the benchmark processes need it.

  results = []
  for run, args in functions:
    start = time.perf_counter()
    first = tf.nest.map_structure(lambda x: x.numpy(), run(*args))
    results.append((first, time.perf_counter() - start, [], []))
  for _ in range(repeats):
    for (run, args), (_, _, times, peaks) in zip(functions, results):
      # Only this call's buffers are alive: the peak is one call's.
      tf.config.experimental.reset_memory_stats("CPU:0")
      start = time.perf_counter()
      outputs = run(*args)
      outputs[0].numpy()
      times.append(time.perf_counter() - start)
      peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"])
      del outputs
  return results


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
