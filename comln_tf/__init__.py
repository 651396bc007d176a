"""comln_tf: COMLN (Deleu et al., ICLR 2022) in TensorFlow and Keras.

Public API:
  adapt: gradient-flow adaptation of a linear classifier with exact
    meta-gradients (forward-mode, discrete adjoint, backprop or adjoint).
  Forward, DiscreteAdjoint, Backprop, Adjoint, Auto: gradient methods
    (strategy objects for adapt).
  Dopri5, RK4, Euler: ODE solvers (strategy objects for adapt).
  TFPSolver: TensorFlow Probability's DormandPrince or BDF as the solver.
  SolveStats: what a solve cost.
  reduced_vector_field: the inner problem's flow in reduced coordinates.
  layers.GradientFlowClassifier: the adaptation as a Keras layer.
"""

__version__ = "0.1.0"

# First: settings TensorFlow reads when it creates its CPU device.
from comln_tf import _process_defaults  # noqa: F401  isort: skip
from comln_tf import layers
from comln_tf._adapt import adapt
from comln_tf._discrete_adjoint import Auto
from comln_tf._discrete_adjoint import DiscreteAdjoint
from comln_tf._gradient_methods import Adjoint
from comln_tf._gradient_methods import Backprop
from comln_tf._gradient_methods import Forward
from comln_tf._gradient_methods import GradientMethod
from comln_tf._reduced import reduced_vector_field
from comln_tf._solvers import Dopri5
from comln_tf._solvers import Euler
from comln_tf._solvers import RK4
from comln_tf._solvers import SolveStats
from comln_tf._solvers import Solver

# Registers "tfp_dopri5" and "tfp_bdf"; imports TFP only when one is used.
from comln_tf._tfp_solvers import TFPSolver

__all__ = [
  "adapt",
  "layers",
  "Adjoint",
  "Auto",
  "Backprop",
  "DiscreteAdjoint",
  "Forward",
  "GradientMethod",
  "reduced_vector_field",
  "Dopri5",
  "Euler",
  "RK4",
  "SolveStats",
  "Solver",
  "TFPSolver",
]
