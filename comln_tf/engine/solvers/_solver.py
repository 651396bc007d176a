"""The solver interface, what a solve costs, and the Runge-Kutta helpers.

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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
  # Only for annotations: the methods import this module.
  from comln_tf.engine.methods import _method

VectorField = Callable[[object], object]
# A state: a nest (tuple/list/dict) of tensors [B, ...], as tf.nest takes.
Nest = Any


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


def per_task(value: tf.Tensor, leaf: tf.Tensor) -> tf.Tensor:
  """Reshapes a per-task vector [B] so that it broadcasts against `leaf`."""
  shape = tf.concat(
    [tf.shape(value), tf.ones([tf.rank(leaf) - 1], tf.int32)], axis=0
  )
  return tf.reshape(value, shape)


def evaluated_once(
  vector_field: VectorField, y: Nest, condition: tf.Tensor
) -> Nest:
  """vector_field(y), computed once and stored, when `condition` holds.

  XLA fuses the elementwise tail of a stage's vector field into every
  later stage that reads it (Runge-Kutta stages read all earlier ones), so
  without a boundary a dopri5 step recomputes each stage up to 6 times,
  which on the forward method's sensitivities dominates the step.
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


def combine(
  y: Nest, h: tf.Tensor, coefficients: Sequence[float], ks: Sequence[Nest]
) -> Nest:
  """y + h * sum_j coefficients[j] * ks[j], leaf by leaf (h is per task)."""

  def leaf_update(y_leaf, *k_leaves):
    total = None
    for c, k in zip(coefficients, k_leaves):
      if c == 0.0:
        continue
      # tf.constant, not tf.cast: a Python float cast from float32 loses digits.
      term = tf.constant(c, y_leaf.dtype) * k
      total = term if total is None else total + term
    return y_leaf + per_task(h, y_leaf) * total

  return tf.nest.map_structure(leaf_update, y, *ks)


def rms_per_task(nest: Nest) -> tf.Tensor:
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


def as_constant(value: float, like: tf.Tensor) -> tf.Tensor:
  """A Python number as a constant of `like`'s dtype."""
  return tf.constant(value, like.dtype)


def where_per_task(
  condition: tf.Tensor, when_true: Nest, when_false: Nest
) -> Nest:
  """Per task: `when_true` where `condition` [B] holds, else `when_false`."""
  return tf.nest.map_structure(
    lambda a, b: tf.where(per_task(condition, a), a, b), when_true, when_false
  )


class Solver:
  """Base class of the solvers: a strategy object passed to `adapt`."""

  name = "solver"

  def integrate(
    self,
    vector_field: VectorField,
    y0: Nest,
    t_final: tf.Tensor,
    max_steps: int,
    error_weight: tf.Tensor | None = None,
  ) -> tuple[Nest, SolveStats]:
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
        grows into the adapted weights, see `methods._method`).
        Fixed-step solvers ignore it.

    Returns:
      (y_final, SolveStats). When stats.finished is False the state is not
      the solution at t_final; the caller must raise (see `adapt`).
    """
    raise NotImplementedError

  def gradient_method_for(
    self, method: "_method.GradientMethod"
  ) -> "_method.GradientMethod":
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
