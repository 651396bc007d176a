"""TensorFlow Probability's ODE solvers as backends of `adapt`.

`TFPSolver` puts `tfp.math.ode.DormandPrince` (explicit, adaptive) or
`tfp.math.ode.BDF` (implicit, variable order, for stiff flows) behind the
`Solver` interface; `adapt(..., solver="tfp_dopri5" | "tfp_bdf")` builds one
with the given rtol and atol (`dormand_prince`, `bdf`). TensorFlow
Probability is imported only when one is built (its import is slow and
needs tf-keras).

How they differ from the native `Dopri5`:
* One step size for the whole batch of tasks (TFP solves the B tasks as
  one system), and TFP's error norm: one RMS over the whole state, so
  the forward method's large sensitivity tensor weighs more than s.
* TFP's DormandPrince steps past t_final and interpolates back (4th order);
  its first step is fixed (1e-3 by default).
* BDF works on the state flattened to one vector of size n (all tasks,
  and for the forward method all sensitivities) and keeps dense n x n
  Jacobian and QR factors: with the forward method n = B M (N + K (N - 1)),
  K = M (N - 1) + M (M + 1) / 2, 42,500 per 5-way 5-shot task, far too many.
  Its Jacobian comes from automatic differentiation (n backward passes,
  vectorised), counted in `SolveStats.num_jacobian_evals`.

Gradient methods (`TFPSolver.gradient_method_for` decides, `adapt` asks):
* "forward": the sensitivities integrated with s, as one nested state, by
  TFP's solver; exact (same assembly as with the native solvers).
* "adjoint": TFP's own adjoint (`solve` with L0 = X W0^T and G = X X^T as
  `constants`), which recomputes s backwards with the same solver. TFP
  stops gradients on the solution times, so dL/dT is added from the vector
  field at T: dW(T)/dT = -f(s(T))^T X. Exact where the continuous adjoint
  is, like the native "adjoint": at large T the backward solve of s is
  unstable (445% error at T = 1000, tol 1e-5, on the hard case of
  tests/test_adapt.py; native adjoint 412%). In eager mode the caller's
  tape records TFP's forward steps (memory grows with them); in
  tf.function it does not.
* "backprop": refused. Taping through TFP's steps differentiates its step
  size choice too (TFP does not stop its gradient) and its error norm pools
  the probe tangent with s: 14% error on that hard case, against 3% for
  native backprop (and XLA cannot compile it: TFP's loops have no
  `maximum_iterations`); BDF's would go through Newton iterations no error
  control watches. The plain solve `Backprop(tangent_control=False)`
  (what the layer uses at inference) runs as the adjoint method's forward
  solve, which costs the same.
* "auto": "forward" with DormandPrince, "adjoint" with BDF.
* "discrete_adjoint" replays native dopri5 steps: refused.

Step limit: `adapt`'s max_steps bounds every solve, forward and backward,
with the same error as the native solvers (NaN under XLA): TFP's BDF stops
itself (its max_num_steps); TFP's DormandPrince only asserts, so its step
is wrapped to end the solve instead. A solve that stops early returns NaN
states, so a failed backward (adjoint) solve gives NaN gradients, never
wrong ones.

Relies on private parts of tensorflow-probability 0.25 (`_solve`, the
DormandPrince `_step`, `_max_num_steps`, `_make_adjoint_solver_fn`); the
tests cover each.
"""

from collections.abc import Callable
import copy
import dataclasses
import functools

import tensorflow as tf

from comln_tf.engine import _reduced
from comln_tf.engine.methods import _adjoint
from comln_tf.engine.methods import _backprop
from comln_tf.engine.methods import _forward
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _solver


def _tfp_ode():
  """`tfp.math.ode`, imported on first use."""
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

  return tfp.math.ode


def _poison_states(results):
  """TFP `Results` with NaN states unless the solve succeeded (status 0)."""
  succeeded = tf.equal(results.diagnostics.status, 0)
  return results._replace(
    states=tf.nest.map_structure(
      lambda state: _method.poison_unless(succeeded, state),
      results.states,
    )
  )


def _step_within(step, max_steps, solver_state, diagnostics, **options):
  """TFP DormandPrince's `_step`, ending the solve after max_steps steps.

  TFP's own max_num_steps is a `tf.debugging` assertion (TFP's message,
  and none under XLA, where the loop would run on). Here a step past the
  limit sets the time to +inf, which ends TFP's loop, and status -1, which
  `_poison_states` turns into NaN.
  """
  steps_taken = diagnostics.num_ode_fn_evaluations // (
    _tfp_ode().DormandPrince.ODE_FN_EVALS_PER_STEP
  )

  def give_up():
    time = tf.convert_to_tensor(solver_state.current_time)
    return (
      solver_state._replace(current_time=tf.constant(float("inf"), time.dtype)),
      diagnostics._replace(status=tf.constant(-1, tf.int32)),
    )

  return tf.cond(
    steps_taken >= max_steps,
    give_up,
    lambda: step(solver_state, diagnostics, **options),
  )


def _bounded(ode_solver, max_steps):
  """A copy of a TFP solver that stops after max_steps steps, NaN if so."""
  bounded = copy.copy(ode_solver)
  ode = _tfp_ode()
  if isinstance(ode_solver, ode.BDF):
    # BDF checks its own limit and reports it as status -1.
    bounded._max_num_steps = max_steps  # pylint: disable=protected-access
  else:
    bounded._max_num_steps = None  # pylint: disable=protected-access
    step = functools.partial(type(ode_solver)._step, bounded)  # pylint: disable=protected-access
    bounded._step = functools.partial(_step_within, step, max_steps)  # pylint: disable=protected-access
  bounded._solve = lambda **kwargs: _poison_states(  # pylint: disable=protected-access
    ode_solver.__class__._solve(bounded, **kwargs)
  )  # pylint: disable=protected-access
  # TFP's default adjoint solver is the solver itself: make it this bounded
  # copy, so that the backward solve has the same limit. A solver the user
  # chose for the adjoint is kept as it is.
  if ode_solver._make_adjoint_solver_fn() is ode_solver:  # pylint: disable=protected-access
    bounded._make_adjoint_solver_fn = lambda: bounded  # pylint: disable=protected-access
  return bounded


def _weighted_coordinates(error_weight):
  """Maps y -> u = y * error_weight and back, leaf by leaf ([B] weights).

  TFP's solvers take one scalar atol; solving for u instead of y gives the
  state the absolute tolerance atol / error_weight per task, as the native
  solvers' `error_weight` does (the relative tolerance is unchanged). The
  flow is linear in that change of variables, so the solution is the same.
  """
  if error_weight is None:
    identity = lambda nest: nest
    return identity, identity
  weight = tf.stop_gradient(error_weight)

  def scaled(nest, power):
    return tf.nest.map_structure(
      lambda leaf: leaf * _solver.per_task(weight**power, leaf), nest
    )

  return (lambda nest: scaled(nest, 1.0)), (lambda nest: scaled(nest, -1.0))


def _stats(ode_solver, diagnostics):
  """SolveStats from TFP's diagnostics, counted as the native solvers do."""
  ode = _tfp_ode()
  tfp_evals = tf.cast(diagnostics.num_ode_fn_evaluations, tf.int32)
  finished = tf.equal(diagnostics.status, 0)
  jacobian_evals = tf.cast(diagnostics.num_jacobian_evaluations, tf.int32)
  if isinstance(ode_solver, ode.BDF):
    # TFP counts the Newton iterations; its first step size (2 evaluations,
    # unless given) and first backward difference (1) come on top.
    first_step_given = ode_solver._first_step_size is not None  # pylint: disable=protected-access
    num_evals = tfp_evals + (1 if first_step_given else 3)
    # TFP does not report its step count, but (evaluating the Jacobian
    # eagerly, the only mode TFPSolver allows) it factorises once per step
    # attempt.
    num_steps = tf.cast(diagnostics.num_matrix_factorizations, tf.int32)
  else:
    # 6 evaluations per step (first same as last), plus f(y0), which TFP
    # does not count; its final interpolation evaluates nothing.
    num_steps = tfp_evals // ode.DormandPrince.ODE_FN_EVALS_PER_STEP
    num_evals = 1 + ode.DormandPrince.ODE_FN_EVALS_PER_STEP * num_steps
  return _solver.SolveStats(
    num_evals=num_evals,
    num_steps=num_steps,
    finished=finished,
    num_jacobian_evals=jacobian_evals,
  )


@dataclasses.dataclass(frozen=True, eq=False)
class TFPSolver(_solver.Solver):
  """A `tfp.math.ode` solver behind the `Solver` interface.

  Example:
    solver = comln_tf.TFPSolver(tfp.math.ode.BDF(rtol=1e-5, atol=1e-5))
    weights = comln_tf.adapt(w0, x, y, t_final, solver=solver,
                             method="adjoint")

  The TFP solver's own settings are used as they are, except its
  max_num_steps: `adapt`'s max_steps bounds every solve. See the module
  docstring for the gradient methods each solver supports.

  Attributes:
    ode_solver: a `tfp.math.ode.DormandPrince` or `tfp.math.ode.BDF`.
  """

  ode_solver: object

  def __post_init__(self):
    ode = _tfp_ode()
    if not isinstance(self.ode_solver, (ode.DormandPrince, ode.BDF)):
      raise TypeError(
        f"TFPSolver needs a tfp.math.ode.DormandPrince or tfp.math.ode.BDF "
        f"instance, got {self.ode_solver!r}."
      )
    if (
      isinstance(self.ode_solver, ode.BDF)
      and self.ode_solver._evaluate_jacobian_lazily
    ):  # pylint: disable=protected-access
      # TFP 0.25 with TF 2.21: a tf.cond in BDF's lazy path returns a tuple
      # from one branch and a list from the other, which TF refuses.
      raise ValueError(
        "TFPSolver does not support tfp.math.ode.BDF(evaluate_jacobian_"
        "lazily=True): it fails in tf.function with tensorflow-probability "
        "0.25 (tf.cond branches of different structure). Use the default "
        "evaluate_jacobian_lazily=False."
      )

  @property
  def is_bdf(self) -> bool:
    return isinstance(self.ode_solver, _tfp_ode().BDF)

  @property
  def name(self) -> str:  # type: ignore[override]  # A class attribute above.
    return "tfp_bdf" if self.is_bdf else "tfp_dopri5"

  def integrate(
    self,
    vector_field: _solver.VectorField,
    y0: _solver.Nest,
    t_final: tf.Tensor,
    max_steps: int,
    error_weight: tf.Tensor | None = None,
  ) -> tuple[_solver.Nest, _solver.SolveStats]:
    """See `Solver.integrate`. Not meant to be differentiated (see above)."""
    leaf = tf.nest.flatten(y0)[0]
    to_solver, from_solver = _weighted_coordinates(error_weight)
    # `_solve`, not `solve`: `solve` wraps the solve in TFP's adjoint, whose
    # gradient silently ignores tensors the vector field closes over.
    results = _bounded(self.ode_solver, max_steps)._solve(  # pylint: disable=protected-access
      ode_fn=lambda time, u: to_solver(vector_field(from_solver(u))),
      initial_time=tf.zeros([], leaf.dtype),
      initial_state=to_solver(y0),
      solution_times=tf.reshape(tf.cast(t_final, leaf.dtype), [1]),
    )
    u_final = tf.nest.map_structure(lambda states: states[0], results.states)
    return from_solver(u_final), _stats(self.ode_solver, results.diagnostics)

  def integrate_with_adjoint(
    self,
    vector_field: Callable[..., _solver.Nest],
    y0: _solver.Nest,
    t_final: tf.Tensor,
    max_steps: int,
    constants: dict[str, tf.Tensor],
    error_weight: tf.Tensor | None = None,
  ) -> tuple[_solver.Nest, _solver.SolveStats]:
    """Solves with TFP's adjoint gradient for y0 and `constants`.

    Args:
      vector_field: maps (state nest, **constants) to the time derivative.
      y0: initial state nest [B, ...].
      t_final: scalar tensor > 0. No gradient flows to it (TFP's choice).
      max_steps: Python int, bounds the forward and the backward solve.
      constants: dict of tensors the vector field depends on.
      error_weight: as in `Solver.integrate`.

    Returns:
      (y_final, SolveStats of the forward solve).
    """
    leaf = tf.nest.flatten(y0)[0]
    to_solver, from_solver = _weighted_coordinates(error_weight)
    results = _bounded(self.ode_solver, max_steps).solve(
      ode_fn=lambda time, u, **kwargs: to_solver(
        vector_field(from_solver(u), **kwargs)
      ),
      initial_time=tf.zeros([], leaf.dtype),
      initial_state=to_solver(y0),
      solution_times=tf.reshape(tf.cast(t_final, leaf.dtype), [1]),
      constants=constants,
    )
    u_final = tf.nest.map_structure(lambda states: states[0], results.states)
    return from_solver(u_final), _stats(self.ode_solver, results.diagnostics)

  def gradient_method_for(
    self, method: _method.GradientMethod
  ) -> _method.GradientMethod:
    """See `Solver.gradient_method_for` and the module docstring."""
    name = getattr(method, "name", None)
    if isinstance(method, TFPAdjoint):
      return method
    if name == "auto":
      return TFPAdjoint() if self.is_bdf else _forward.Forward()
    if isinstance(method, _forward.Forward):
      return method
    if isinstance(method, _adjoint.Adjoint):
      return TFPAdjoint()
    if isinstance(method, _backprop.Backprop):
      if not method.tangent_control:
        # A plain solve: the adjoint method's forward pass is one.
        return TFPAdjoint()
      raise ValueError(
        f'method="backprop" is not supported with solver="{self.name}": '
        f"the tape would differentiate TFP's step-size choice (and BDF's "
        f"Newton iterations), which no error control keeps accurate. Use "
        f'method="forward" or "adjoint" (TFP\'s adjoint).'
      )
    raise ValueError(
      f"method={name or method!r} is not supported with solver="
      f'{self.name!r}: TFP\'s solvers run method="forward", "adjoint" '
      f'(TFP\'s adjoint) and "auto".'
    )


@dataclasses.dataclass(frozen=True)
class TFPAdjoint(_method.GradientMethod):
  """TFP's adjoint gradient, with dL/dT from the vector field at T.

  What method="adjoint" runs with a `TFPSolver`. The gradients with respect
  to W0 and X flow through L0 = X W0^T and G = X X^T, passed to TFP as
  `constants`, and through W(T) = W0 - s(T)^T X.
  """

  name = "adjoint"

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    if not isinstance(solver, TFPSolver):
      raise ValueError(
        f"TFPAdjoint needs a TFPSolver, got solver="
        f"{getattr(solver, 'name', solver)!r}."
      )
    logits0, gram = _method.logits_and_gram(init_weights, support_embeddings)
    field = lambda s, logits0, gram: _reduced.reduced_vector_field(
      s, logits0, gram, labels
    )
    s_final, stats = solver.integrate_with_adjoint(
      field,
      tf.zeros(tf.shape(labels), support_embeddings.dtype),
      t_final,
      max_steps,
      constants=dict(logits0=logits0, gram=gram),
      error_weight=_method.state_error_weight(support_embeddings, gram),
    )
    # TFP stops the gradient on solution times; ds(T)/dT = f(s(T)). Adding
    # f * (T - T) leaves the value as it is and gives the tape that term.
    rate = tf.stop_gradient(field(s_final, logits0, gram))
    s_final += rate * (t_final - tf.stop_gradient(t_final))
    return _method.weights_from_state(
      init_weights, support_embeddings, s_final
    ), stats


def dormand_prince(rtol: float, atol: float) -> TFPSolver:
  """ "tfp_dopri5": `tfp.math.ode.DormandPrince` with these tolerances."""
  return TFPSolver(_tfp_ode().DormandPrince(rtol=rtol, atol=atol))


def bdf(rtol: float, atol: float) -> TFPSolver:
  """ "tfp_bdf": `tfp.math.ode.BDF` with these tolerances."""
  return TFPSolver(_tfp_ode().BDF(rtol=rtol, atol=atol))
