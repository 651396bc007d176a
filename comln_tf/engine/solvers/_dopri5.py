"""Adaptive Dormand-Prince 5(4) with per-task step-size control."""

import dataclasses
from typing import NamedTuple

import tensorflow as tf

from comln_tf.engine.solvers import _solver


class StepAttempt(NamedTuple):
  """One attempted dopri5 step of every task (`Dopri5.attempt`).

  Attributes:
    accept: bool [B], the step is accepted (never for a task not running).
    h_step: [B], the step size tried (0 for a task not running).
    t_next, h_next: [B], the next time and step size.
    y_next, k1_next: the next state nest and its first stage (unchanged
      where rejected).
    stages: the 7 stage nests of the step tried; the last, evaluated at the
      new state, is the first stage of the next step.
  """

  accept: tf.Tensor
  h_step: tf.Tensor
  t_next: tf.Tensor
  h_next: tf.Tensor
  y_next: object
  k1_next: object
  stages: list


@dataclasses.dataclass(frozen=True)
class Dopri5(_solver.Solver):
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
        atol = atol / _solver.per_task(error_weight, a)
      return atol + tf.constant(self.rtol, a.dtype) * magnitude

    if y_other is None:
      return tf.nest.map_structure(leaf_scale, y)
    return tf.nest.map_structure(leaf_scale, y, y_other)

  def error_norm(
    self,
    error: _solver.Nest,
    y: _solver.Nest,
    y_new: _solver.Nest,
    error_weight: tf.Tensor | None = None,
  ) -> tf.Tensor:
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
    norm = _solver.rms_per_task(
      tf.nest.map_structure(lambda e, s: stop(e) / s, error, scale)
    )
    return tf.where(
      tf.math.is_finite(norm),
      norm,
      tf.fill(tf.shape(norm), _solver.as_constant(1e10, norm)),
    )

  @staticmethod
  def step_factor(error_norm: tf.Tensor, accept: tf.Tensor) -> tf.Tensor:
    """The next step size over the one tried: [B], at most 1 if rejected."""
    factor = tf.clip_by_value(
      0.9 * tf.maximum(error_norm, 1e-10) ** -0.2, 0.2, 10.0
    )
    return tf.where(accept, factor, tf.minimum(factor, 1.0))

  def initial_step(
    self,
    vector_field: _solver.VectorField,
    y0: _solver.Nest,
    f0: _solver.Nest,
    t_final: tf.Tensor,
    error_weight: tf.Tensor | None = None,
  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Hairer, Norsett & Wanner (1993), II.4: a first step from two evals.

    One change to their rule: it takes min(100 h0, h1), where h0 = 0.01
    |y0| / |f0| and h1 comes from the size and change of f. For a state
    that starts at zero, |y0| gives no scale, h0 is only the fixed probe
    1e-6 and the cap would put the first step at 1e-4 whatever the
    problem; every gradient flow here starts from zero (s and its
    sensitivities), and growing from 1e-4 (at most 10x per step) costs
    extra steps. From a zero state h1 is used alone, computed from |f0|;
    the error control still rejects a first step that is too large.

    Returns:
      (h [B], the number of evaluations made: 1 for the probe f(y0 + h0 f0),
      0 when every task starts from zero and the probe is not needed).
    """
    scale = self._scale(y0, error_weight=error_weight)
    ratio = lambda a, s: a / s
    d0 = _solver.rms_per_task(tf.nest.map_structure(ratio, y0, scale))
    d1 = _solver.rms_per_task(tf.nest.map_structure(ratio, f0, scale))
    dtype = d0.dtype
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = tf.where(
      small,
      tf.constant(1e-6, dtype),
      0.01 * d0 / tf.where(small, tf.ones_like(d1), d1),
    )
    zero_state = d0 < 1e-5

    def probe():
      f1 = vector_field(_solver.combine(y0, h0, (1.0,), (f0,)))
      return (
        _solver.rms_per_task(
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

  def attempt(
    self,
    vector_field: _solver.VectorField,
    t_final: tf.Tensor,
    error_weight: tf.Tensor | None,
    t: tf.Tensor,
    h: tf.Tensor,
    y: _solver.Nest,
    k1: _solver.Nest,
    running: tf.Tensor,
  ) -> StepAttempt:
    """One step attempt for the tasks that are `running` [B].

    The step control of `integrate`, shared with the discrete adjoint's
    forward and replay passes so that all take the same steps.

    Args:
      vector_field: maps a state nest to its time derivative.
      t_final: scalar. error_weight: [B] or None (see `Solver.integrate`).
      t, h: [B], each task's time and proposed step size.
      y, k1: the state nest and its derivative (the first stage).
      running: bool [B].

    Returns:
      A `StepAttempt`.
    """
    stop = tf.stop_gradient
    last = running & (t + h >= t_final)
    # The clipped last step carries the dependence on t_final.
    h_step = tf.where(last, t_final - t, h)
    h_step = tf.where(running, h_step, tf.zeros_like(h_step))
    ks = [k1]
    any_running = tf.reduce_any(running)
    for row in self._A[1:]:
      ks.append(
        _solver.evaluated_once(
          vector_field, _solver.combine(y, h_step, row, ks), any_running
        )
      )
    y_new = _solver.combine(y, h_step, self._A[-1], ks[:-1])
    # ks[-1] was evaluated at y_new: the first stage of the next step.
    error = _solver.combine(
      tf.nest.map_structure(tf.zeros_like, y), h_step, self._E, ks
    )
    error_norm = self.error_norm(error, y, y_new, error_weight)
    accept = running & (error_norm <= 1.0)
    factor = self.step_factor(error_norm, accept)
    return StepAttempt(
      accept=accept,
      h_step=h_step,
      t_next=tf.where(accept, tf.where(last, t_final, t + h_step), t),
      h_next=tf.where(running, stop(h_step) * factor, h),
      y_next=_solver.where_per_task(accept, y_new, y),
      k1_next=_solver.where_per_task(accept, ks[-1], k1),
      stages=ks,
    )

  def integrate(
    self,
    vector_field: _solver.VectorField,
    y0: _solver.Nest,
    t_final: tf.Tensor,
    max_steps: int,
    error_weight: tf.Tensor | None = None,
  ) -> tuple[_solver.Nest, _solver.SolveStats]:
    """See `Solver.integrate`."""
    leaf0 = tf.nest.flatten(y0)[0]
    dtype = leaf0.dtype
    t_final = tf.cast(t_final, dtype)
    stop = tf.stop_gradient
    stop_nest = lambda nest: tf.nest.map_structure(stop, nest)
    if error_weight is not None:
      error_weight = stop(error_weight)
    f0 = vector_field(y0)
    h_init, probe_evals = self.initial_step(
      vector_field, stop_nest(y0), stop_nest(f0), stop(t_final), error_weight
    )

    def body(step, t, h, y, k1):
      tried = self.attempt(
        vector_field, t_final, error_weight, t, h, y, k1, t < t_final
      )
      return (
        step + 1,
        stop(tried.t_next),
        stop(tried.h_next),
        tried.y_next,
        tried.k1_next,
      )

    steps, t_end, _, y_end, _ = tf.while_loop(
      lambda step, t, h, y, k1: tf.reduce_any(t < t_final),
      body,
      (
        tf.constant(0),
        tf.zeros([tf.shape(leaf0)[0]], dtype),
        stop(h_init),
        y0,
        f0,
      ),
      maximum_iterations=max_steps,
    )
    stats = _solver.SolveStats(
      num_evals=1 + probe_evals + 6 * steps,
      num_steps=steps,
      finished=tf.reduce_all(t_end >= t_final),
    )
    return y_end, stats
