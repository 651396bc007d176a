"""`adapt`: the public entry point of the engine, with input validation."""

from typing import Optional

import tensorflow as tf

from comln_tf import _gradient_methods
from comln_tf import _solvers

DEFAULT_MAX_STEPS = 10_000


def _static_dim(tensor, axis):
  return tensor.shape[axis] if tensor.shape.rank is not None else None


def _check_equal_dims(name_a, tensor_a, axis_a, name_b, tensor_b, axis_b,
                      what):
  """Static check where both sizes are known, runtime assertion otherwise."""
  a, b = _static_dim(tensor_a, axis_a), _static_dim(tensor_b, axis_b)
  message = (f"{name_a} and {name_b} must have the same {what}: "
             f"got shapes {tensor_a.shape} and {tensor_b.shape}.")
  if a is not None and b is not None:
    if a != b:
      raise ValueError(message)
    return []
  return [tf.debugging.assert_equal(tf.shape(tensor_a)[axis_a],
                                    tf.shape(tensor_b)[axis_b],
                                    message=message)]


def _label_distributions(support_labels, num_classes, dtype, rank):
  """Integer labels [B, M] -> one-hot [B, M, N]; float [B, M, N] kept.

  Returns:
    (labels [B, M, N] of `dtype`, runtime checks, validity scalar bool).
  """
  if support_labels.dtype.is_integer:
    if support_labels.shape.rank != rank - 1:
      raise ValueError(
          f"support_labels must be integers of shape [M] (or [B, M] for a "
          f"batch of tasks), got shape {support_labels.shape}.")
    in_range = tf.reduce_all((support_labels >= 0) &
                             (support_labels < tf.cast(num_classes,
                                                       support_labels.dtype)))
    message = (f"support_labels must lie in [0, N) where N is the number of "
               f"rows of init_weights (N={num_classes}).")
    checks = [tf.debugging.Assert(in_range, [message])]
    return tf.one_hot(support_labels, num_classes, dtype=dtype), checks, in_range
  if support_labels.dtype.is_floating:
    if support_labels.shape.rank != rank:
      raise ValueError(
          f"float support_labels are label distributions of shape [M, N] (or "
          f"[B, M, N]), got shape {support_labels.shape}.")
    labels = tf.cast(support_labels, dtype)
    valid = tf.reduce_all(tf.math.is_finite(labels)) & tf.reduce_all(
        labels >= 0) & tf.reduce_all(
            tf.abs(tf.reduce_sum(labels, -1) - 1) <= 1e-3)
    message = ("float support_labels must be label distributions: finite, "
               "non-negative, each row summing to 1.")
    return labels, [tf.debugging.Assert(valid, [message])], valid
  raise TypeError(f"support_labels must be integer class indices or float "
                  f"label distributions, got dtype {support_labels.dtype}.")


def _solve_in_groups(solve, support_embeddings, labels, tasks_per_solve):
  """Runs `solve` on groups of `tasks_per_solve` tasks, one after another.

  Args:
    solve: maps (support_embeddings [b, M, d], labels [b, M, N]) to
      (weights [b, N, d], SolveStats).
    support_embeddings: [B, M, d]. labels: [B, M, N].
    tasks_per_solve: int, or None for a single solve of all B tasks.

  Returns:
    (weights [B, N, d], SolveStats: the largest evaluation and step counts
    over the groups, finished if every group finished).
  """
  batch = support_embeddings.shape[0]
  if tasks_per_solve is None or (batch is not None and
                                 batch <= tasks_per_solve):
    return solve(support_embeddings, labels)
  batch = tf.shape(support_embeddings)[0]
  num_groups = (batch + tasks_per_solve - 1) // tasks_per_solve
  # The last group is completed with copies of the last task; their
  # results are dropped, so no gradient reaches them.
  padding = num_groups * tasks_per_solve - batch

  def grouped(tensor):
    padded = tf.concat([tensor, tf.repeat(tensor[-1:], padding, axis=0)], 0)
    return tf.reshape(padded, tf.concat(
        [[num_groups, tasks_per_solve], tf.shape(tensor)[1:]], 0))

  def solve_group(group):
    weights, stats = solve(*group)
    return weights, tuple(stats)

  weights, (num_evals, num_steps, finished) = tf.map_fn(
      solve_group, (grouped(support_embeddings), grouped(labels)),
      fn_output_signature=(
          tf.TensorSpec(None, support_embeddings.dtype),
          (tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32),
           tf.TensorSpec([], tf.bool))))
  weights = tf.reshape(weights, tf.concat([[-1], tf.shape(weights)[2:]], 0))
  return weights[:batch], _solvers.SolveStats(
      tf.reduce_max(num_evals), tf.reduce_max(num_steps),
      tf.reduce_all(finished))


def adapt(init_weights,
          support_embeddings,
          support_labels,
          t_final,
          *,
          method="forward",
          solver="dopri5",
          rtol: float = 1e-5,
          atol: float = 1e-5,
          max_steps: int = DEFAULT_MAX_STEPS,
          num_steps: Optional[int] = None,
          tasks_per_solve: Optional[int] = None,
          return_stats: bool = False):
  """Adapts a linear classifier to tasks by the gradient flow of their loss.

  Integrates dW/dt = -(1/M) (softmax(X W^T) - Y)^T X from W(0) = init_weights
  up to t_final, in reduced coordinates W = W0 - s^T X, so the cost does not
  depend on d. The result is differentiable by `tf.GradientTape` with respect
  to init_weights, support_embeddings and t_final; the gradients are exact
  up to the solver tolerance. Works eagerly, in `tf.function` and under XLA.

  Args:
    init_weights: [N, d] float32 or float64, the initial classifier W0.
    support_embeddings: [M, d], or [B, M, d] for a batch of B tasks, same
      dtype as init_weights.
    support_labels: integers [M] / [B, M] in [0, N), or float label
      distributions [M, N] / [B, M, N] (e.g. label smoothing).
    t_final: scalar > 0, the integration time T.
    method: how the gradient is computed: "forward" (forward-mode
      sensitivities, memory independent of T), "backprop" (through the solver
      steps, memory growing with them; the step control also watches one
      probe tangent, which keeps this gradient accurate at large T), "adjoint"
      (continuous adjoint, inaccurate at large T), or a `GradientMethod`
      instance such as `Forward(tangent_field="accumulator")` or
      `Backprop(tangent_control=False)` (a plain solve of the state, for
      adapting without a gradient).
    solver: "dopri5" (adaptive, rtol/atol, step control per task), "rk4" or
      "euler" (fixed step, `num_steps` steps), or a `Solver` instance.
    rtol: relative tolerance of "dopri5".
    atol: absolute tolerance of "dopri5".
    max_steps: most solver steps; a solve that needs more raises
      InvalidArgumentError (under XLA, where assertions are compiled away, the
      result is NaN instead: never a silent wrong answer).
    num_steps: number of steps of the fixed-step solvers.
    tasks_per_solve: solve the tasks of a batch in groups of this many, one
      group after another (None: all together). Smaller groups use less
      memory (the solver state is per group); on CPU, groups of about 4
      keep the state in cache, which is also faster (see README). Results
      do not depend on it: step control is per task.
    return_stats: also return the forward solve's `SolveStats`
      (function evaluations, steps, finished).

  Returns:
    The adapted weights W(T), [N, d] or [B, N, d], in the inputs' dtype
    (and the SolveStats if return_stats).

  Raises:
    ValueError / TypeError: bad arguments or shapes known when tracing.
    tf.errors.InvalidArgumentError: bad values found at run time (labels out
      of range, non-finite embeddings, t_final <= 0, max_steps exceeded).
  """
  gradient_method = _gradient_methods.make_method(method)
  ode_solver = _solvers.make_solver(solver, rtol, atol, num_steps)
  if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
    raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
  if tasks_per_solve is not None and (
      isinstance(tasks_per_solve, bool) or not isinstance(tasks_per_solve, int)
      or tasks_per_solve < 1):
    raise ValueError(f"tasks_per_solve must be None or a positive integer, "
                     f"got {tasks_per_solve!r}.")

  init_weights = tf.convert_to_tensor(init_weights)
  if not init_weights.dtype.is_floating:
    raise TypeError(f"init_weights must be float32 or float64, got dtype "
                    f"{init_weights.dtype}.")
  dtype = init_weights.dtype
  support_embeddings = tf.convert_to_tensor(support_embeddings)
  if support_embeddings.dtype != dtype:
    raise TypeError(
        f"support_embeddings must have the dtype of init_weights ({dtype.name}),"
        f" got {support_embeddings.dtype.name}.")
  support_labels = tf.convert_to_tensor(support_labels)
  # A Python float goes straight to `dtype` (through float32 it loses digits);
  # a tensor of another float dtype is cast.
  t_final = tf.cast(t_final, dtype) if tf.is_tensor(t_final) else (
      tf.convert_to_tensor(t_final, dtype=dtype))
  if init_weights.shape.rank != 2:
    raise ValueError(f"init_weights must have shape [N, d], got shape "
                     f"{init_weights.shape}.")
  rank = support_embeddings.shape.rank
  if rank not in (2, 3):
    raise ValueError(f"support_embeddings must have shape [M, d] or [B, M, d],"
                     f" got shape {support_embeddings.shape}.")
  if t_final.shape.rank != 0:
    raise ValueError(f"t_final must be a scalar, got shape {t_final.shape}.")

  num_classes = tf.shape(init_weights)[0]
  if init_weights.shape[0] is not None:
    num_classes = init_weights.shape[0]
  labels, checks, valid = _label_distributions(support_labels, num_classes,
                                               dtype, rank)
  checks += _check_equal_dims("init_weights", init_weights, -1,
                              "support_embeddings", support_embeddings, -1,
                              "embedding size d (last axis)")
  checks += _check_equal_dims("support_embeddings", support_embeddings, -2,
                              "support_labels", labels, -2,
                              "number of support examples M")
  checks += _check_equal_dims("init_weights", init_weights, 0,
                              "support_labels", labels, -1,
                              "number of classes N")
  if rank == 3:
    checks += _check_equal_dims("support_embeddings", support_embeddings, 0,
                                "support_labels", labels, 0,
                                "number of tasks B (first axis)")
  finite = tf.reduce_all(tf.math.is_finite(support_embeddings)) & tf.reduce_all(
      tf.math.is_finite(init_weights))
  positive_time = t_final > 0
  checks += [
      tf.debugging.Assert(finite, [
          "support_embeddings and init_weights must be finite (no NaN or Inf)."
      ]),
      tf.debugging.Assert(positive_time, ["t_final must be > 0, got", t_final]),
  ]
  with tf.control_dependencies(checks):
    support_embeddings = tf.identity(support_embeddings)
  if rank == 2:
    support_embeddings, labels = support_embeddings[None], labels[None]

  weights, stats = _solve_in_groups(
      lambda x, y: gradient_method(init_weights, x, y, t_final, ode_solver,
                                   max_steps),
      support_embeddings, labels, tasks_per_solve)
  finished_check = tf.debugging.Assert(stats.finished, [
      f"The ODE solve did not reach t_final within max_steps={max_steps} "
      f"steps (solver={getattr(ode_solver, 'name', ode_solver)}); raise "
      f"max_steps, loosen rtol/atol or use a smaller t_final. t_final =",
      t_final
  ])
  with tf.control_dependencies([finished_check]):
    ok = valid & finite & positive_time & stats.finished
    weights = _gradient_methods.poison_unless(ok, weights)
  if rank == 2:
    weights = weights[0]
  return (weights, stats) if return_stats else weights
