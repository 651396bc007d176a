"""`adapt`: the public entry point of the engine, with input validation."""

from typing import Optional, Tuple, Union

import tensorflow as tf

from comln_tf import _gradient_methods
from comln_tf import _solvers

DEFAULT_MAX_STEPS = 10_000

# Floating dtypes the solver supports (its tolerances need >= float32).
SUPPORTED_DTYPES = (tf.float32, tf.float64)


def _static_dim(tensor, axis):
  return tensor.shape[axis] if tensor.shape.rank is not None else None


def _check_equal_dims(name_a, tensor_a, axis_a, name_b, tensor_b, axis_b, what):
  """Static check where both sizes are known, runtime assertion otherwise."""
  a, b = _static_dim(tensor_a, axis_a), _static_dim(tensor_b, axis_b)
  message = (
    f"{name_a} and {name_b} must have the same {what}: "
    f"got shapes {tensor_a.shape} and {tensor_b.shape}."
  )
  if a is not None and b is not None:
    if a != b:
      raise ValueError(message)
    return []
  return [
    tf.debugging.assert_equal(
      tf.shape(tensor_a)[axis_a], tf.shape(tensor_b)[axis_b], message=message
    )
  ]


def _label_distributions(support_labels, num_classes, dtype, rank):
  """Integer labels [B, M] -> one-hot [B, M, N]; float [B, M, N] kept.

  Returns:
    (labels [B, M, N] of `dtype`, runtime checks, validity scalar bool).
  """
  if support_labels.dtype.is_integer:
    if support_labels.shape.rank != rank - 1:
      raise ValueError(
        f"support_labels must be integers of shape [M] (or [B, M] for a "
        f"batch of tasks), got shape {support_labels.shape}."
      )
    in_range = tf.reduce_all(
      (support_labels >= 0)
      & (support_labels < tf.cast(num_classes, support_labels.dtype))
    )
    message = (
      f"support_labels must lie in [0, N) where N is the number of "
      f"rows of init_weights (N={num_classes})."
    )
    checks = [tf.debugging.Assert(in_range, [message])]
    return (
      tf.one_hot(support_labels, num_classes, dtype=dtype),
      checks,
      in_range,
    )
  if support_labels.dtype.is_floating:
    if support_labels.shape.rank != rank:
      raise ValueError(
        f"float support_labels are label distributions of shape [M, N] (or "
        f"[B, M, N]), got shape {support_labels.shape}."
      )
    labels = tf.cast(support_labels, dtype)
    valid = (
      tf.reduce_all(tf.math.is_finite(labels))
      & tf.reduce_all(labels >= 0)
      & tf.reduce_all(tf.abs(tf.reduce_sum(labels, -1) - 1) <= 1e-3)
    )
    message = (
      "float support_labels must be label distributions: finite, "
      "non-negative, each row summing to 1."
    )
    # Rows summing to 1 within 1e-3 are made to sum to 1: the flow keeps
    # P - Y summing to zero (see `_reduced.residual`).
    totals = tf.reduce_sum(labels, -1, keepdims=True)
    labels = labels / tf.where(totals > 0, totals, tf.ones_like(totals))
    return labels, [tf.debugging.Assert(valid, [message])], valid
  raise TypeError(
    f"support_labels must be integer class indices or float "
    f"label distributions, got dtype {support_labels.dtype}."
  )


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
  if tasks_per_solve is None or (
    batch is not None and batch <= tasks_per_solve
  ):
    return solve(support_embeddings, labels)
  batch = tf.shape(support_embeddings)[0]
  num_groups = (batch + tasks_per_solve - 1) // tasks_per_solve
  # The last group is completed with copies of the last task; their
  # results are dropped, so no gradient reaches them.
  padding = num_groups * tasks_per_solve - batch

  def grouped(tensor):
    padded = tf.concat([tensor, tf.repeat(tensor[-1:], padding, axis=0)], 0)
    return tf.reshape(
      padded,
      tf.concat([[num_groups, tasks_per_solve], tf.shape(tensor)[1:]], 0),
    )

  def solve_group(group):
    weights, stats = solve(*group)
    return weights, tuple(tf.nest.map_structure(tf.convert_to_tensor, stats))

  weights, (num_evals, num_steps, finished, num_jacobian_evals) = tf.map_fn(
    solve_group,
    (grouped(support_embeddings), grouped(labels)),
    fn_output_signature=(
      tf.TensorSpec(None, support_embeddings.dtype),
      (
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.bool),
        tf.TensorSpec([], tf.int32),
      ),
    ),
  )
  weights = tf.reshape(weights, tf.concat([[-1], tf.shape(weights)[2:]], 0))
  return weights[:batch], _solvers.SolveStats(
    tf.reduce_max(num_evals),
    tf.reduce_max(num_steps),
    tf.reduce_all(finished),
    tf.reduce_max(num_jacobian_evals),
  )


def _with_one_neutral_if_empty(support_embeddings, labels, axis):
  """(X [B, M, d], Y [B, M, N]) with one neutral entry appended along
  `axis` (0: a task, 1: an example) when that axis is empty.

  Neutral: zero embeddings and uniform labels, on which the flow stands
  still. Both tensors unchanged otherwise.
  """
  dtype = support_embeddings.dtype
  padding = tf.maximum(1 - tf.shape(support_embeddings)[axis], 0)

  def padded(tensor, fill):
    shape = tf.tensor_scatter_nd_update(tf.shape(tensor), [[axis]], [padding])
    return tf.concat([tensor, tf.fill(shape, fill)], axis)

  uniform = 1.0 / tf.cast(tf.shape(labels)[-1], dtype)
  return padded(support_embeddings, tf.zeros([], dtype)), padded(
    labels, uniform
  )


def _check_static_sizes(init_weights, support_embeddings, t_final):
  """Raises ValueError on sizes and times known bad when tracing.

  The runtime assertions of `adapt` catch the same cases when they are only
  known at run time.
  """
  num_classes = _static_dim(init_weights, 0)
  if num_classes is not None and num_classes < 2:
    raise ValueError(
      f"init_weights must have N >= 2 rows (classes), got "
      f"shape {init_weights.shape}."
    )
  if _static_dim(support_embeddings, -2) == 0:
    raise ValueError(
      f"support_embeddings must hold M >= 1 examples per task "
      f"(axis -2), got shape {support_embeddings.shape}."
    )
  value = tf.get_static_value(t_final)
  if value is not None and not 0 < float(value) < float("inf"):
    raise ValueError(f"t_final must be finite and > 0, got {float(value)}.")


def _no_tasks(init_weights, support_embeddings):
  """The result of adapting to B = 0 tasks: ([0, N, d] weights, stats).

  Built from the inputs, so that a gradient is zeros, not None.
  """
  weights = tf.zeros_like(support_embeddings[:0, :1, :1]) + init_weights
  return weights, _solvers.SolveStats(
    tf.constant(0), tf.constant(0), tf.constant(True)
  )


def check_task_labels(support_labels, num_ways):
  """Runtime checks that integer labels form tasks of `num_ways` classes.

  For classifiers whose number of classes comes from the labels (tied
  rows): every class 0..N-1 must appear in every task, so N <= M.

  Args:
    support_labels: int [B, M] (or [M]).
    num_ways: int scalar (tensor or Python int), N.

  Returns:
    List of assertion ops (run them before using the labels).
  """
  support_labels = tf.convert_to_tensor(support_labels)
  if not support_labels.dtype.is_integer:
    raise TypeError(
      f"support_labels must be integer class indices, got "
      f"dtype {support_labels.dtype.name}."
    )
  labels = tf.reshape(support_labels, [-1, tf.shape(support_labels)[-1]])
  num_ways = tf.cast(num_ways, tf.int32)
  num_examples = tf.shape(labels)[-1]
  low = tf.reduce_min(labels)
  size_check = tf.debugging.Assert(
    (num_ways <= num_examples) & (tf.cast(low, tf.int64) >= 0),
    [
      "support_labels must be classes 0..N-1, each in every task, so "
      "0 <= label and N = max(label) + 1 <= M; got N =",
      num_ways,
      "M =",
      num_examples,
      "min(label) =",
      low,
    ],
    summarize=16,
  )
  # After the size check: the one-hot below is sized by N.
  with tf.control_dependencies([size_check]):
    counts = tf.reduce_sum(
      tf.one_hot(tf.cast(labels, tf.int32), num_ways, dtype=tf.int32), axis=-2
    )
    present = tf.debugging.Assert(
      tf.reduce_all(counts > 0),
      [
        "every class 0..N-1 must appear in the support_labels of every "
        "task; N =",
        num_ways,
        "classes missing per task (1 = missing):",
        tf.cast(tf.equal(counts, 0), tf.int32),
      ],
      summarize=64,
    )
  return [size_check, present]


def adapt(
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  t_final: Union[float, tf.Tensor],
  *,
  method: Union[str, _gradient_methods.GradientMethod] = "auto",
  solver: Union[str, _solvers.Solver] = "dopri5",
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = DEFAULT_MAX_STEPS,
  num_steps: Optional[int] = None,
  tasks_per_solve: Optional[int] = None,
  return_stats: bool = False,
) -> Union[tf.Tensor, Tuple[tf.Tensor, _solvers.SolveStats]]:
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
    t_final: finite scalar > 0, the integration time T.
    method: how the gradient is computed: "forward" (forward-mode
      sensitivities, memory independent of T; cost grows as M^4 N),
      "discrete_adjoint" (reverse pass over the accepted dopri5 steps: exact
      for the discrete solution, runs under XLA, memory fixed by its
      checkpoint slots; 2-3.5 plain solves), "auto" (the default: the
      cheapest exact method for the solver and episode shape, see
      `Auto`), "backprop"
      (through the solver steps, memory growing with them; the step control
      also watches one probe tangent, which keeps this gradient accurate at
      large T), "adjoint" (continuous adjoint, inaccurate at large T), or a
      `GradientMethod`
      instance such as `Forward(tangent_field="accumulator")` or
      `Backprop(tangent_control=False)` (a plain solve of the state, for
      adapting without a gradient).
    solver: "dopri5" (adaptive, rtol/atol, step control per task), "rk4" or
      "euler" (fixed step, `num_steps` steps), "tfp_dopri5" or "tfp_bdf"
      (TensorFlow Probability's DormandPrince and BDF, see `TFPSolver` for
      the methods each supports), or a `Solver` instance.
    rtol: relative tolerance of the adaptive solvers.
    atol: absolute tolerance of the adaptive solvers. Both hold for the
      adapted weights, whatever the embeddings' scale: the solvers control
      the reduced state's error as it weighs in W = W0 - s^T X.
    max_steps: most solver steps; a solve that needs more raises
      InvalidArgumentError (under XLA, where assertions are compiled away, the
      result is NaN instead: never a silent wrong answer). The flow is stiff
      when the support embeddings are large (its fastest rate grows with
      their squared norm); the message then says so.
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
    (and the SolveStats if return_stats). B = 0 tasks give an empty
    [0, N, d] result.

  Raises:
    ValueError / TypeError: bad arguments, dtypes (other than float32 and
      float64) or shapes known when tracing (M = 0 examples, N < 2 classes,
      t_final not finite or <= 0).
    tf.errors.InvalidArgumentError: bad values found at run time (the same
      cases, labels out of range, non-finite embeddings), before any solver
      step; max_steps exceeded. Under XLA, where assertions are compiled
      away, bad input gives NaN weights, also without a solver step.
  """
  gradient_method = _gradient_methods.make_method(method)
  ode_solver = _solvers.make_solver(solver, rtol, atol, num_steps)
  # A solver may run a method its own way (TFP's adjoint) or refuse it.
  gradient_method = ode_solver.gradient_method_for(gradient_method)
  if (
    isinstance(max_steps, bool)
    or not isinstance(max_steps, int)
    or max_steps < 1
  ):
    raise ValueError(
      f"max_steps must be a positive integer, got {max_steps!r}."
    )
  if tasks_per_solve is not None and (
    isinstance(tasks_per_solve, bool)
    or not isinstance(tasks_per_solve, int)
    or tasks_per_solve < 1
  ):
    raise ValueError(
      f"tasks_per_solve must be None or a positive integer, "
      f"got {tasks_per_solve!r}."
    )

  init_weights = tf.convert_to_tensor(init_weights)
  if init_weights.dtype not in SUPPORTED_DTYPES:
    # float16 / bfloat16 cannot hold the solver's tolerances: a solve would
    # creep to max_steps before failing.
    raise TypeError(
      f"init_weights must be float32 or float64, got dtype "
      f"{init_weights.dtype.name}."
    )
  dtype = init_weights.dtype
  support_embeddings = tf.convert_to_tensor(support_embeddings)
  if support_embeddings.dtype != dtype:
    raise TypeError(
      f"support_embeddings must have the dtype of init_weights ({dtype.name}),"
      f" got {support_embeddings.dtype.name}."
    )
  support_labels = tf.convert_to_tensor(support_labels)
  # A Python float goes straight to `dtype` (through float32 it loses digits);
  # a tensor of another float dtype is cast.
  t_final = (
    tf.cast(t_final, dtype)
    if tf.is_tensor(t_final)
    else (tf.convert_to_tensor(t_final, dtype=dtype))
  )
  if init_weights.shape.rank != 2:
    raise ValueError(
      f"init_weights must have shape [N, d], got shape {init_weights.shape}."
    )
  rank = support_embeddings.shape.rank
  if rank not in (2, 3):
    raise ValueError(
      f"support_embeddings must have shape [M, d] or [B, M, d],"
      f" got shape {support_embeddings.shape}."
    )
  if t_final.shape.rank != 0:
    raise ValueError(f"t_final must be a scalar, got shape {t_final.shape}.")
  _check_static_sizes(init_weights, support_embeddings, t_final)
  if rank == 3 and support_embeddings.shape[0] == 0:
    # No task: nothing to solve (a solve of zero tasks divides by zero in
    # places).
    weights, stats = _no_tasks(init_weights, support_embeddings)
    return (weights, stats) if return_stats else weights

  num_classes = tf.shape(init_weights)[0]
  if init_weights.shape[0] is not None:
    num_classes = init_weights.shape[0]
  labels, checks, valid = _label_distributions(
    support_labels, num_classes, dtype, rank
  )
  checks += _check_equal_dims(
    "init_weights",
    init_weights,
    -1,
    "support_embeddings",
    support_embeddings,
    -1,
    "embedding size d (last axis)",
  )
  checks += _check_equal_dims(
    "support_embeddings",
    support_embeddings,
    -2,
    "support_labels",
    labels,
    -2,
    "number of support examples M",
  )
  checks += _check_equal_dims(
    "init_weights",
    init_weights,
    0,
    "support_labels",
    labels,
    -1,
    "number of classes N",
  )
  if rank == 3:
    checks += _check_equal_dims(
      "support_embeddings",
      support_embeddings,
      0,
      "support_labels",
      labels,
      0,
      "number of tasks B (first axis)",
    )
  finite = tf.reduce_all(tf.math.is_finite(support_embeddings)) & tf.reduce_all(
    tf.math.is_finite(init_weights)
  )
  positive_time = (t_final > 0) & tf.math.is_finite(t_final)
  num_examples = tf.shape(support_embeddings)[-2]
  sizes_ok = (num_examples > 0) & (tf.shape(init_weights)[0] >= 2)
  checks += [
    tf.debugging.Assert(
      finite,
      ["support_embeddings and init_weights must be finite (no NaN or Inf)."],
    ),
    tf.debugging.Assert(
      positive_time, ["t_final must be finite and > 0, got", t_final]
    ),
    tf.debugging.Assert(
      sizes_ok,
      [
        "support_embeddings must hold M >= 1 examples per task and "
        "init_weights N >= 2 classes; got M =",
        num_examples,
        "and N =",
        tf.shape(init_weights)[0],
      ],
    ),
  ]
  with tf.control_dependencies(checks):
    support_embeddings = tf.identity(support_embeddings)
  # Under XLA the assertions above are compiled away: bad input then solves
  # up to time 0 (no solver step) and comes out as NaN, instead of running
  # to max_steps.
  runnable = valid & finite & positive_time & sizes_ok
  t_solve = tf.where(runnable, t_final, tf.zeros_like(t_final))
  if rank == 2:
    support_embeddings, labels = support_embeddings[None], labels[None]

  num_tasks = support_embeddings.shape[0]
  if num_tasks is None:
    # B known only at run time: zero tasks get one neutral task, so that
    # the solve and its gradient never see an empty batch; it is dropped
    # below.
    num_tasks = tf.shape(support_embeddings)[0]
    support_embeddings, labels = _with_one_neutral_if_empty(
      support_embeddings, labels, axis=0
    )
  if support_embeddings.shape[-2] is None:
    # M known only at run time: M = 0 (refused above; NaN under XLA) gets
    # one neutral example, so that no solver buffer is empty (XLA refuses
    # to compile the discrete adjoint's slot updates into an empty one).
    support_embeddings, labels = _with_one_neutral_if_empty(
      support_embeddings, labels, axis=1
    )
  weights, stats = _solve_in_groups(
    lambda x, y: gradient_method(
      init_weights, x, y, t_solve, ode_solver, max_steps
    ),
    support_embeddings,
    labels,
    tasks_per_solve,
  )
  weights = weights[:num_tasks]
  finished_check = tf.debugging.Assert(
    stats.finished,
    [
      f"The ODE solve did not reach t_final within max_steps={max_steps} "
      f"steps (solver={getattr(ode_solver, 'name', ode_solver)}). The flow "
      f"is stiff when the support embeddings are large: its fastest rate "
      f"grows with their squared norm, here up to",
      tf.reduce_max(tf.reduce_sum(tf.square(support_embeddings), -1)),
      "; scale or normalise the embeddings (e.g. L2-normalise them), use "
      "solver='tfp_bdf' (implicit), raise max_steps, loosen rtol/atol or "
      "use a smaller t_final. t_final =",
      t_final,
    ],
  )
  with tf.control_dependencies([finished_check]):
    ok = runnable & stats.finished
    weights = _gradient_methods.poison_unless(ok, weights)
  if rank == 2:
    weights = weights[0]
  return (weights, stats) if return_stats else weights
