"""Fixed-step explicit Runge-Kutta solvers: Euler and RK4."""

import dataclasses
from typing import ClassVar

import tensorflow as tf

from comln_tf.engine.solvers import _solver


@dataclasses.dataclass(frozen=True)
class FixedStep(_solver.Solver):
  """Fixed-step explicit Runge-Kutta with `num_steps` steps of T / num_steps."""

  num_steps: int = 100
  # Runge-Kutta matrix rows (the first empty) and weights.
  _A: ClassVar[tuple[tuple[float, ...], ...]] = ()
  _B: ClassVar[tuple[float, ...]] = ()

  def integrate(
    self,
    vector_field: _solver.VectorField,
    y0: _solver.Nest,
    t_final: tf.Tensor,
    max_steps: int,
    error_weight: tf.Tensor | None = None,
  ) -> tuple[_solver.Nest, _solver.SolveStats]:
    """See `Solver.integrate`; no step control, so no error_weight."""
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
          _solver.evaluated_once(
            vector_field,
            _solver.combine(y, h, row, ks) if row else y,
            step < self.num_steps,
          )
        )
      return step + 1, _solver.combine(y, h, self._B, ks)

    steps, y_end = tf.while_loop(
      lambda step, y: step < self.num_steps,
      body,
      (tf.constant(0), y0),
      maximum_iterations=self.num_steps,
    )
    stats = _solver.SolveStats(
      num_evals=steps * len(self._A),
      num_steps=steps,
      finished=tf.constant(self.num_steps <= max_steps),
    )
    return y_end, stats


@dataclasses.dataclass(frozen=True)
class Euler(FixedStep):
  """Explicit Euler: in W-space, exactly gradient descent (ANIL) with lr h."""

  name = "euler"
  _A = ((),)
  _B = (1.0,)


@dataclasses.dataclass(frozen=True)
class RK4(FixedStep):
  """The classical fourth-order Runge-Kutta method."""

  name = "rk4"
  _A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
  _B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
