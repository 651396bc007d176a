"""ODE solvers on batches of tasks, written as `tf.while_loop`s.

Every solver integrates an autonomous system dy/dt = f(y) from t = 0 to
t = t_final for a batch of B independent tasks. The state `y` is a nest
(tuple/list/dict) of tensors whose leading axis is the task axis B. The
adaptive solver keeps one time and one step size per task, so an easy task is
not forced to take the small steps of a hard one; tasks that have reached
t_final keep their state while the others go on.

The loops are plain TensorFlow control flow: they run eagerly, inside
`tf.function` and under XLA (`jit_compile=True`), and can be differentiated by
`tf.GradientTape` (the "backprop" gradient method); `maximum_iterations` is
always set because XLA needs it to differentiate a while loop.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import tensorflow as tf

VectorField = Callable[[object], object]


class SolveStats(NamedTuple):
  """What a solve cost and whether it finished.

  A NamedTuple, so that tf.function and tf.nest pass it through.

  Attributes:
    num_evals: int32 scalar, evaluations of the vector field (each evaluates
      all B tasks at once).
    num_steps: int32 scalar, loop iterations (accepted and rejected steps).
    finished: bool scalar, every task reached t_final within max_steps.
    num_jacobian_evals: int32 scalar, Jacobian evaluations of the implicit
      solvers (TFP's BDF); 0 for the explicit ones.
  """

  num_evals: tf.Tensor
  num_steps: tf.Tensor
  finished: tf.Tensor
  num_jacobian_evals: tf.Tensor = 0


def _per_task(value, leaf):
  """Reshapes a per-task vector [B] so that it broadcasts against `leaf`."""
  shape = tf.concat(
    [tf.shape(value), tf.ones([tf.rank(leaf) - 1], tf.int32)], axis=0
  )
  return tf.reshape(value, shape)


def _evaluated_once(vector_field, y, condition):
  """vector_field(y), computed once and stored, when `condition` holds.

  XLA fuses the elementwise tail of a stage's vector field into every
  later stage that reads it (Runge-Kutta stages read all earlier ones), so
  without a boundary a dopri5 step recomputes each stage up to 6 times: on
  the forward method's sensitivities that was most of the step's time.
  XLA cannot fuse across a conditional, so the evaluation sits in one,
  with a condition known only at run time (true while any task runs).
  Outside XLA it is an ordinary `tf.cond` (zeros when `condition` is
  false, which the solvers never use: they pass a condition that holds
  inside their loop body).

  Args:
    vector_field: maps a state nest to its time derivative.
    y: a state nest.
    condition: bool scalar tensor.

  Returns:
    The nest vector_field(y), or zeros like y.
  """
  return tf.cond(
    condition,
    lambda: vector_field(y),
    lambda: tf.nest.map_structure(tf.zeros_like, y),
  )


def _combine(y, h, coefficients, ks):
  """y + h * sum_j coefficients[j] * ks[j], leaf by leaf (h is per task)."""

  def leaf_update(y_leaf, *k_leaves):
    total = None
    for c, k in zip(coefficients, k_leaves):
      if c == 0.0:
        continue
      # tf.constant, not tf.cast: a Python float cast from float32 loses digits.
      term = tf.constant(c, y_leaf.dtype) * k
      total = term if total is None else total + term
    return y_leaf + _per_task(h, y_leaf) * total

  return tf.nest.map_structure(leaf_update, y, *ks)


def _rms_per_task(nest):
  """Per task, the largest over leaves of the RMS over the leaf: [B].

  The maximum, not one RMS over all leaves: the forward method's state is
  s [M, N] with sensitivities K times larger, and a pooled RMS would let
  the sensitivities' small errors hide a large error in s.
  """
  return tf.reduce_max(
    tf.stack(
      [
        tf.sqrt(
          tf.reduce_mean(
            tf.reshape(tf.square(leaf), [tf.shape(leaf)[0], -1]), axis=1
          )
        )
        for leaf in tf.nest.flatten(nest)
      ]
    ),
    axis=0,
  )


def _as(value, like):
  """A Python number as a constant of `like`'s dtype."""
  return tf.constant(value, like.dtype)


def _where_per_task(condition, when_true, when_false):
  return tf.nest.map_structure(
    lambda a, b: tf.where(_per_task(condition, a), a, b), when_true, when_false
  )


class Solver:
  """Base class of the solvers: a strategy object passed to `adapt`."""

  name = "solver"

  def integrate(
    self,
    vector_field: VectorField,
    y0,
    t_final: tf.Tensor,
    max_steps: int,
    error_weight: Optional[tf.Tensor] = None,
  ):
    """Integrates dy/dt = vector_field(y) from 0 to t_final.

    Args:
      vector_field: maps a state nest to its time derivative (same nest).
      y0: initial state, a nest of tensors [B, ...] of one float dtype.
      t_final: scalar tensor > 0 of the state dtype.
      max_steps: Python int, the most loop iterations allowed.
      error_weight: [B] positive, or None for ones: per task, how much an
        error of the state weighs in the quantity the tolerances are meant
        for. The adaptive solvers control the error of y * error_weight,
        i.e. the state's absolute tolerance is atol / error_weight (the
        gradient methods pass the factor by which the reduced state's error
        grows into the adapted weights, see `_gradient_methods`).
        Fixed-step solvers ignore it.

    Returns:
      (y_final, SolveStats). When stats.finished is False the state is not
      the solution at t_final; the caller must raise (see `adapt`).
    """
    raise NotImplementedError

  def gradient_method_for(self, method):
    """The gradient method `adapt` runs with this solver.

    The solvers here run every method as given. A solver that computes a
    method its own way (TFP's solvers: their own adjoint) returns its
    version; one that cannot give an exact gradient with `method` raises.

    Args:
      method: a `GradientMethod`.

    Returns:
      The `GradientMethod` to run.

    Raises:
      ValueError: naming the method and the solver, if unsupported.
    """
    return method


@dataclasses.dataclass(frozen=True)
class Dopri5(Solver):
  """Adaptive Dormand-Prince 5(4) with per-task step-size control.

  The error of a step is measured on every part of the state (for the
  forward method that includes the sensitivities, so the meta-gradient is
  controlled, not only the adapted weights): the largest, over the state's
  tensors, of the RMS of err / (atol + rtol * |y|).
  Step sizes are chosen with `tf.stop_gradient`: differentiating through the
  solver (method="backprop") differentiates the discrete solution for the
  chosen steps, as `torchdiffeq` and `jax.experimental.ode` do, and the
  gradient with respect to t_final flows through the last, clipped step.
  """

  rtol: float = 1e-5
  atol: float = 1e-5
  name = "dopri5"

  # Butcher tableau of Dormand & Prince (1980); the last row is the 5th-order
  # solution and also the 7th stage (first-same-as-last).
  _A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
  )
  # Fifth-order minus fourth-order weights: the embedded error estimate.
  _E = (
    71 / 57600,
    0.0,
    -71 / 16695,
    71 / 1920,
    -17253 / 339200,
    22 / 525,
    -1 / 40,
  )

  def _scale(self, y, y_other=None, error_weight=None):
    """atol / error_weight + rtol * max(|y|, |y_other|), leaf by leaf."""

    def leaf_scale(a, b=None):
      magnitude = tf.abs(a) if b is None else tf.maximum(tf.abs(a), tf.abs(b))
      atol = tf.constant(self.atol, a.dtype)
      if error_weight is not None:
        atol = atol / _per_task(error_weight, a)
      return atol + tf.constant(self.rtol, a.dtype) * magnitude

    if y_other is None:
      return tf.nest.map_structure(leaf_scale, y)
    return tf.nest.map_structure(leaf_scale, y, y_other)

  def error_norm(self, error, y, y_new, error_weight=None):
    """Per task, the error measure that accepts a step when <= 1: [B].

    The largest over the state's tensors of the RMS of
    error / (atol / error_weight + rtol * max(|y|, |y_new|)); a non-finite
    measure (overflow) becomes 1e10, a rejected step, never accepted.
    Computed on values cut from the tape: it only chooses step sizes.
    """
    stop = tf.stop_gradient
    scale = self._scale(
      tf.nest.map_structure(stop, y),
      tf.nest.map_structure(stop, y_new),
      error_weight,
    )
    norm = _rms_per_task(
      tf.nest.map_structure(lambda e, s: stop(e) / s, error, scale)
    )
    return tf.where(
      tf.math.is_finite(norm), norm, tf.fill(tf.shape(norm), _as(1e10, norm))
    )

  @staticmethod
  def step_factor(error_norm, accept):
    """The next step size over the one tried: [B], at most 1 if rejected."""
    factor = tf.clip_by_value(
      0.9 * tf.maximum(error_norm, 1e-10) ** -0.2, 0.2, 10.0
    )
    return tf.where(accept, factor, tf.minimum(factor, 1.0))

  def _initial_step(self, vector_field, y0, f0, t_final, error_weight=None):
    """Hairer, Norsett & Wanner (1993), II.4: a first step from two evals.

    One change to their rule: it takes min(100 h0, h1), where h0 = 0.01
    |y0| / |f0| and h1 comes from the size and change of f. For a state
    that starts at zero, |y0| gives no scale, h0 is only the fixed probe
    1e-6 and the cap puts the first step at 1e-4 whatever the problem:
    every gradient flow here starts from zero (s and its sensitivities), so
    every solve spent three extra steps (18 evaluations) growing from 1e-4
    (at most 10x per step). From a zero state h1 is used alone, computed
    from |f0|; the error control still rejects a first step that is too
    large.

    Returns:
      (h [B], the number of evaluations made: 1 for the probe f(y0 + h0 f0),
      0 when every task starts from zero and the probe is not needed).
    """
    scale = self._scale(y0, error_weight=error_weight)
    ratio = lambda a, s: a / s
    d0 = _rms_per_task(tf.nest.map_structure(ratio, y0, scale))
    d1 = _rms_per_task(tf.nest.map_structure(ratio, f0, scale))
    dtype = d0.dtype
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = tf.where(
      small,
      tf.constant(1e-6, dtype),
      0.01 * d0 / tf.where(small, tf.ones_like(d1), d1),
    )
    zero_state = d0 < 1e-5

    def probe():
      f1 = vector_field(_combine(y0, h0, (1.0,), (f0,)))
      return (
        _rms_per_task(
          tf.nest.map_structure(lambda a, b, s: (a - b) / s, f1, f0, scale)
        )
        / h0
      )

    # From a zero state only |f0| sets h1: d2 is a difference of nearly
    # equal values of f over the 1e-6 probe, a few float32 ulps, and would
    # make the step sequence depend on rounding. So the probe runs only if
    # some task does not start from zero.
    all_zero = tf.reduce_all(zero_state)
    d2 = tf.cond(all_zero, lambda: tf.zeros_like(d1), probe)
    d12 = tf.where(zero_state, d1, tf.maximum(d1, d2))
    h1 = tf.where(
      d12 <= 1e-15,
      tf.maximum(tf.constant(1e-6, dtype), h0 * 1e-3),
      (0.01 / tf.maximum(d12, 1e-15)) ** 0.2,
    )
    h = tf.where(zero_state, h1, tf.minimum(100.0 * h0, h1))
    return tf.minimum(h, t_final), tf.where(all_zero, 0, 1)

  def integrate(self, vector_field, y0, t_final, max_steps, error_weight=None):
    leaf0 = tf.nest.flatten(y0)[0]
    dtype = leaf0.dtype
    batch = tf.shape(leaf0)[0]
    t_final = tf.cast(t_final, dtype)
    stop = tf.stop_gradient
    stop_nest = lambda nest: tf.nest.map_structure(stop, nest)
    if error_weight is not None:
      error_weight = stop(error_weight)
    f0 = vector_field(y0)
    h_init, probe_evals = self._initial_step(
      vector_field,
      stop_nest(y0),
      stop_nest(f0),
      stop(t_final),
      error_weight,
    )
    h_init = stop(h_init)
    t_init = tf.zeros([batch], dtype)

    def active(t):
      return t < t_final

    def cond(step, t, h, y, k1):
      del step, h, y, k1
      return tf.reduce_any(active(t))

    def body(step, t, h, y, k1):
      running = active(t)
      last = running & (t + h >= t_final)
      # The clipped last step carries the dependence on t_final.
      h_step = tf.where(last, t_final - t, h)
      h_step = tf.where(running, h_step, tf.zeros_like(h_step))
      ks = [k1]
      any_running = tf.reduce_any(running)
      for row in self._A[1:]:
        ks.append(
          _evaluated_once(
            vector_field, _combine(y, h_step, row, ks), any_running
          )
        )
      y_new = _combine(y, h_step, self._A[-1], ks[:-1])
      # ks[-1] was evaluated at y_new: the first stage of the next step.
      error = _combine(
        tf.nest.map_structure(tf.zeros_like, y), h_step, self._E, ks
      )
      error_norm = self.error_norm(error, y, y_new, error_weight)
      accept = running & (error_norm <= 1.0)
      factor = self.step_factor(error_norm, accept)
      t_next = tf.where(accept, tf.where(last, t_final, t + h_step), t)
      h_next = tf.where(running, stop(h_step) * factor, h)
      y_next = _where_per_task(accept, y_new, y)
      k1_next = _where_per_task(accept, ks[-1], k1)
      return step + 1, stop(t_next), stop(h_next), y_next, k1_next

    steps, t_end, _, y_end, _ = tf.while_loop(
      cond,
      body,
      (tf.constant(0), t_init, h_init, y0, f0),
      maximum_iterations=max_steps,
    )
    stats = SolveStats(
      num_evals=1 + probe_evals + 6 * steps,
      num_steps=steps,
      finished=tf.reduce_all(t_end >= t_final),
    )
    return y_end, stats


@dataclasses.dataclass(frozen=True)
class _FixedStep(Solver):
  """Fixed-step explicit Runge-Kutta with `num_steps` steps of T / num_steps."""

  num_steps: int = 100
  _A = ()  # Runge-Kutta matrix rows, first row empty.
  _B = ()  # weights.

  def integrate(self, vector_field, y0, t_final, max_steps, error_weight=None):
    del error_weight  # No step control.
    leaf0 = tf.nest.flatten(y0)[0]
    h = tf.fill(
      [tf.shape(leaf0)[0]],
      tf.cast(t_final, leaf0.dtype) / tf.cast(self.num_steps, leaf0.dtype),
    )

    def body(step, y):
      ks = []
      for row in self._A:
        ks.append(
          _evaluated_once(
            vector_field,
            _combine(y, h, row, ks) if row else y,
            step < self.num_steps,
          )
        )
      return step + 1, _combine(y, h, self._B, ks)

    steps, y_end = tf.while_loop(
      lambda step, y: step < self.num_steps,
      body,
      (tf.constant(0), y0),
      maximum_iterations=self.num_steps,
    )
    stats = SolveStats(
      num_evals=steps * len(self._A),
      num_steps=steps,
      finished=tf.constant(self.num_steps <= max_steps),
    )
    return y_end, stats


@dataclasses.dataclass(frozen=True)
class Euler(_FixedStep):
  """Explicit Euler: in W-space, exactly gradient descent (ANIL) with lr h."""

  name = "euler"
  _A = ((),)
  _B = (1.0,)


@dataclasses.dataclass(frozen=True)
class RK4(_FixedStep):
  """The classical fourth-order Runge-Kutta method."""

  name = "rk4"
  _A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
  _B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


# The names `make_solver` knows: the adaptive and the fixed-step solvers.
# The tfp_* solvers (TensorFlow Probability's DormandPrince and BDF) live in
# comln_tf._tfp_solvers, which registers their builder in _BUILDERS when
# comln_tf is imported; TFP itself is imported only when one is built.
TFP_SOLVERS = ("tfp_dopri5", "tfp_bdf")
ADAPTIVE_SOLVERS = ("dopri5",) + TFP_SOLVERS
FIXED_STEP_SOLVERS = ("rk4", "euler")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS

# Name -> build(rtol, atol) of the adaptive solvers defined in other modules.
_BUILDERS = {}


def register_builder(name: str, build: Callable[[float, float], Solver]):
  """Makes `make_solver` build the adaptive solver `name` with `build`."""
  if name not in ADAPTIVE_SOLVERS:
    raise ValueError(f"{name!r} is not in ADAPTIVE_SOLVERS {ADAPTIVE_SOLVERS}.")
  _BUILDERS[name] = build


def make_solver(
  solver, rtol: float, atol: float, num_steps: Optional[int]
) -> Solver:
  """Returns the Solver named by `solver` (or `solver` itself if a Solver)."""
  if isinstance(solver, Solver):
    return solver
  if solver in ADAPTIVE_SOLVERS:
    for name, value in (("rtol", rtol), ("atol", atol)):
      if not value > 0:
        raise ValueError(
          f"{name} must be > 0 for solver={solver!r}, got {value!r}."
        )
    if solver == "dopri5":
      return Dopri5(rtol=float(rtol), atol=float(atol))
    return _BUILDERS[solver](float(rtol), float(atol))
  if solver in FIXED_STEP_SOLVERS:
    if (
      num_steps is None
      or isinstance(num_steps, bool)
      or int(num_steps) != num_steps
      or num_steps < 1
    ):
      raise ValueError(
        f"num_steps must be a positive integer for the fixed-step solver "
        f"solver={solver!r}, got {num_steps!r}."
      )
    cls = RK4 if solver == "rk4" else Euler
    return cls(num_steps=int(num_steps))
  raise ValueError(
    f"solver must be one of {', '.join(map(repr, SOLVERS))} or a comln_tf "
    f"Solver, got {solver!r}."
  )
