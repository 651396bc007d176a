"""The engine: gradient-flow adaptation of a linear classifier.

Public API:
  adapt: adapts W0 to each task by the gradient flow of its support loss,
    with exact meta-gradients.
  AdaptOptions: adapt's options (method, solver, tolerances, step limits,
    grouping), checked once; `adapt_with_options` runs adapt with them.
  METHODS, SOLVERS: the gradient methods and solvers known by name.
  GradientMethod and Forward, DiscreteAdjoint, Backprop, Adjoint, Auto: how
    the meta-gradient is computed.
  Solver and Dopri5, RK4, Euler, TFPSolver: the ODE solvers.
  SolveStats: what a solve cost.
  reduced_vector_field: the inner problem's flow in reduced coordinates.
  check_equal_dims, check_task_labels: input checks the layer shares.
"""

from comln_tf.engine._adapt import adapt
from comln_tf.engine._adapt import adapt_with_options
from comln_tf.engine._inputs import check_equal_dims
from comln_tf.engine._inputs import check_task_labels
from comln_tf.engine._options import AdaptOptions
from comln_tf.engine._options import METHODS
from comln_tf.engine._options import SOLVERS
from comln_tf.engine._reduced import reduced_vector_field
from comln_tf.engine.methods._adjoint import Adjoint
from comln_tf.engine.methods._auto import Auto
from comln_tf.engine.methods._backprop import Backprop
from comln_tf.engine.methods._discrete_adjoint import DiscreteAdjoint
from comln_tf.engine.methods._forward import Forward
from comln_tf.engine.methods._method import GradientMethod
from comln_tf.engine.solvers._dopri5 import Dopri5
from comln_tf.engine.solvers._fixed_step import Euler
from comln_tf.engine.solvers._fixed_step import RK4
from comln_tf.engine.solvers._solver import SolveStats
from comln_tf.engine.solvers._solver import Solver
from comln_tf.engine.solvers._tfp import TFPSolver

__all__ = [
  "adapt",
  "adapt_with_options",
  "AdaptOptions",
  "METHODS",
  "SOLVERS",
  "GradientMethod",
  "Adjoint",
  "Auto",
  "Backprop",
  "DiscreteAdjoint",
  "Forward",
  "Solver",
  "Dopri5",
  "Euler",
  "RK4",
  "TFPSolver",
  "SolveStats",
  "reduced_vector_field",
  "check_equal_dims",
  "check_task_labels",
]
