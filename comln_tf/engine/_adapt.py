"""`adapt`, the engine's entry point, and its solve of a batch of tasks."""

import tensorflow as tf

from comln_tf.engine import _inputs
from comln_tf.engine._options import AdaptOptions
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _solver


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
  return weights[:batch], _solver.SolveStats(
    tf.reduce_max(num_evals),
    tf.reduce_max(num_steps),
    tf.reduce_all(finished),
    tf.reduce_max(num_jacobian_evals),
  )


def _no_tasks(init_weights, support_embeddings):
  """The result of adapting to B = 0 tasks: ([0, N, d] weights, stats).

  Built from the inputs, so that a gradient is zeros, not None.
  """
  weights = tf.zeros_like(support_embeddings[:0, :1, :1]) + init_weights
  return weights, _solver.SolveStats(
    tf.constant(0), tf.constant(0), tf.constant(True)
  )


def adapt(
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  t_final: float | tf.Tensor,
  *,
  method: str | _method.GradientMethod = AdaptOptions.method,
  solver: str | _solver.Solver = AdaptOptions.solver,
  rtol: float = AdaptOptions.rtol,
  atol: float = AdaptOptions.atol,
  max_steps: int = AdaptOptions.max_steps,
  num_steps: int | None = AdaptOptions.num_steps,
  tasks_per_solve: int | None = AdaptOptions.tasks_per_solve,
  return_stats: bool = False,
) -> tf.Tensor | tuple[tf.Tensor, _solver.SolveStats]:
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
      checkpoint slots; a few plain solves), "auto" (the default: the
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
      memory (the solver state is per group) and can keep it in cache
      (docs/benchmarks.md). Results do not depend on it: step control is
      per task.
    return_stats: also return the forward solve's `SolveStats`
      (function evaluations, steps, finished).

  The options (method to tasks_per_solve) are those of `AdaptOptions`,
  checked before any input.

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
  options = AdaptOptions(
    method=method,
    solver=solver,
    rtol=rtol,
    atol=atol,
    max_steps=max_steps,
    num_steps=num_steps,
    tasks_per_solve=tasks_per_solve,
  )
  weights, stats = adapt_with_options(
    options, init_weights, support_embeddings, support_labels, t_final
  )
  return (weights, stats) if return_stats else weights


def _solve(options, init_weights, support_embeddings, labels, t_solve):
  """The solve of tasks [B, M, d] with labels [B, M, N], at least 1 each.

  Returns:
    (weights [B, N, d], SolveStats).
  """
  num_tasks = support_embeddings.shape[0]
  if num_tasks is None:
    # B known only at run time: zero tasks get one neutral task, so that
    # the solve and its gradient never see an empty batch; it is dropped
    # below.
    num_tasks = tf.shape(support_embeddings)[0]
    support_embeddings, labels = _inputs.with_one_neutral_if_empty(
      support_embeddings, labels, axis=0
    )
  if support_embeddings.shape[-2] is None:
    # M known only at run time: M = 0 (refused by the checks; NaN under
    # XLA) gets one neutral example, so that no solver buffer is empty (XLA
    # refuses to compile the discrete adjoint's slot updates into an empty
    # one).
    support_embeddings, labels = _inputs.with_one_neutral_if_empty(
      support_embeddings, labels, axis=1
    )
  weights, stats = _solve_in_groups(
    lambda x, y: options.gradient_method(
      init_weights, x, y, t_solve, options.ode_solver, options.max_steps
    ),
    support_embeddings,
    labels,
    options.tasks_per_solve,
  )
  return weights[:num_tasks], stats


def _finished(options, weights, stats, support_embeddings, t_final, ok):
  """`weights` after a check that the solve finished; NaN unless `ok` too.

  Raises (at run time):
    tf.errors.InvalidArgumentError: the solve did not reach t_final within
      max_steps, with a hint at what makes the flow stiff.
  """
  ode_solver = options.ode_solver
  finished_check = tf.debugging.Assert(
    stats.finished,
    [
      f"The ODE solve did not reach t_final within "
      f"max_steps={options.max_steps} steps "
      f"(solver={getattr(ode_solver, 'name', ode_solver)}). The flow "
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
    return _method.poison_unless(ok & stats.finished, weights)


def adapt_with_options(
  options: AdaptOptions,
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  t_final: float | tf.Tensor,
) -> tuple[tf.Tensor, _solver.SolveStats]:
  """`adapt` with checked options; always returns the SolveStats too.

  Args:
    options: the `AdaptOptions`.
    init_weights, support_embeddings, support_labels, t_final: see `adapt`.

  Returns:
    (weights [N, d] or [B, N, d], SolveStats), as `adapt` with
    return_stats=True.
  """
  init_weights, support_embeddings, support_labels, t_final = (
    _inputs.as_tensors(
      init_weights, support_embeddings, support_labels, t_final
    )
  )
  rank = support_embeddings.shape.rank
  if rank == 3 and support_embeddings.shape[0] == 0:
    # No task: nothing to solve (a solve of zero tasks divides by zero in
    # places).
    return _no_tasks(init_weights, support_embeddings)
  support_embeddings, labels, runnable = _inputs.checked(
    init_weights, support_embeddings, support_labels, t_final
  )
  # Under XLA the assertions of the checks are compiled away: bad input
  # then solves up to time 0 (no solver step) and comes out as NaN, instead
  # of running to max_steps.
  t_solve = tf.where(runnable, t_final, tf.zeros_like(t_final))
  if rank == 2:
    support_embeddings, labels = support_embeddings[None], labels[None]
  weights, stats = _solve(
    options, init_weights, support_embeddings, labels, t_solve
  )
  weights = _finished(
    options, weights, stats, support_embeddings, t_final, runnable
  )
  if rank == 2:
    weights = weights[0]
  return weights, stats
