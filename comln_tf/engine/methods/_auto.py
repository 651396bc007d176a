"""Auto: the default method, the cheapest exact one for the solver."""

import dataclasses

from comln_tf.engine.methods import _discrete_adjoint
from comln_tf.engine.methods import _forward
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _dopri5
from comln_tf.engine.solvers import _solver


@dataclasses.dataclass(frozen=True)
class Auto(_method.GradientMethod):
  """The cheapest exact method for the solver and the episode shape.

  With dopri5: `DiscreteAdjoint`, at every episode shape: a few plain
  solves and a fixed memory, while the forward method pays for K =
  M (N - 1) + M (M + 1) / 2 sensitivity directions (docs/benchmarks.md,
  "Meta-gradient methods", compares them). With a fixed-step solver (rk4,
  euler), which the discrete adjoint does not replay: `Forward` (exact,
  memory flat in T). TFP's solvers pick their own method for "auto".
  """

  name = "auto"

  def resolve(
    self,
    num_examples: int | None,
    num_classes: int | None,
    solver: _solver.Solver,
  ) -> _method.GradientMethod:
    """The method `Auto` runs for M examples and N classes (ints or None)."""
    del num_examples, num_classes  # The same choice at every shape.
    if isinstance(solver, _dopri5.Dopri5):
      return _discrete_adjoint.DiscreteAdjoint()
    return _forward.Forward()

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    method = self.resolve(labels.shape[-2], labels.shape[-1], solver)
    return method(
      init_weights, support_embeddings, labels, t_final, solver, max_steps
    )
