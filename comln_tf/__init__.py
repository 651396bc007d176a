"""comln_tf: COMLN (Deleu et al., ICLR 2022) in TensorFlow and Keras.

Public API:
  adapt: gradient-flow adaptation of a linear classifier with exact
    meta-gradients (forward-mode, discrete adjoint, backprop or adjoint).
  AdaptOptions: adapt's options, checked once (also the layer's).
  Forward, DiscreteAdjoint, Backprop, Adjoint, Auto: gradient methods
    (strategy objects for adapt); GradientMethod, their interface.
  Dopri5, RK4, Euler: ODE solvers (strategy objects for adapt); Solver,
    their interface.
  TFPSolver: TensorFlow Probability's DormandPrince or BDF as the solver.
  SolveStats: what a solve cost.
  reduced_vector_field: the inner problem's flow in reduced coordinates.
  layers.GradientFlowClassifier: the adaptation as a Keras layer.

The engine lives in `comln_tf.engine`. Names are imported on first use, so
that `import comln_tf` (and the TensorFlow-free `comln_tf.config`) does not
import TensorFlow.
"""

# First: settings TensorFlow reads when it creates its CPU device.
from comln_tf import _process_defaults  # noqa: F401  isort: skip

import importlib  # isort: skip

__version__ = "0.1.0"

# Public name -> the module that defines it (a submodule: the module itself).
_EXPORTS = {
  "adapt": "comln_tf.engine",
  "AdaptOptions": "comln_tf.engine",
  "Adjoint": "comln_tf.engine",
  "Auto": "comln_tf.engine",
  "Backprop": "comln_tf.engine",
  "DiscreteAdjoint": "comln_tf.engine",
  "Forward": "comln_tf.engine",
  "GradientMethod": "comln_tf.engine",
  "reduced_vector_field": "comln_tf.engine",
  "Dopri5": "comln_tf.engine",
  "Euler": "comln_tf.engine",
  "RK4": "comln_tf.engine",
  "SolveStats": "comln_tf.engine",
  "Solver": "comln_tf.engine",
  "TFPSolver": "comln_tf.engine",
  "layers": "comln_tf.layers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
  """The public `name`, imported from its module on first use."""
  if name not in _EXPORTS:
    raise AttributeError(f"module 'comln_tf' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  value = (
    module if module.__name__ == f"comln_tf.{name}" else getattr(module, name)
  )
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
