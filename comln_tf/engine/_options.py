"""`AdaptOptions`: how `adapt` solves, checked once; the name tables.

`METHODS` and `SOLVERS` list every gradient method and solver `adapt`
knows by name. The TFP solvers' builders import TensorFlow Probability
only when called.
"""

from collections.abc import Callable
import dataclasses

from comln_tf import _validation
from comln_tf.engine.methods import _adjoint
from comln_tf.engine.methods import _auto
from comln_tf.engine.methods import _backprop
from comln_tf.engine.methods import _discrete_adjoint
from comln_tf.engine.methods import _forward
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _dopri5
from comln_tf.engine.solvers import _fixed_step
from comln_tf.engine.solvers import _solver
from comln_tf.engine.solvers import _tfp

# Method name -> its class, built with its default settings.
METHODS = {
  "auto": _auto.Auto,
  "forward": _forward.Forward,
  "discrete_adjoint": _discrete_adjoint.DiscreteAdjoint,
  "backprop": _backprop.Backprop,
  "adjoint": _adjoint.Adjoint,
}

# Solver name -> (its builder, the options it is built from): the adaptive
# solvers from the tolerances, the fixed-step ones from num_steps.
SOLVERS: dict[str, tuple[Callable[..., _solver.Solver], tuple[str, ...]]] = {
  "dopri5": (_dopri5.Dopri5, ("rtol", "atol")),
  "tfp_dopri5": (_tfp.dormand_prince, ("rtol", "atol")),
  "tfp_bdf": (_tfp.bdf, ("rtol", "atol")),
  "rk4": (_fixed_step.RK4, ("num_steps",)),
  "euler": (_fixed_step.Euler, ("num_steps",)),
}


def _checked(message, check, *args, **kwargs):
  """`check(*args, **kwargs)`, a `_validation` check, failing with `message`.

  For the options whose error wording callers already match.
  """
  try:
    return check(*args, **kwargs)
  except ValueError:
    raise ValueError(message) from None


def _gradient_method(method) -> _method.GradientMethod:
  """The GradientMethod named by `method` (or `method` itself)."""
  if isinstance(method, _method.GradientMethod):
    return method
  if isinstance(method, str) and method in METHODS:
    return METHODS[method]()
  raise ValueError(
    f"method must be one of {sorted(METHODS)} or a comln_tf GradientMethod, "
    f"got {method!r}."
  )


def _solver_option(options, solver: str, name: str):
  """The option `name` of `options`, checked for the builder of `solver`."""
  value = getattr(options, name)
  if name == "num_steps":
    return _checked(
      f"num_steps must be a positive integer for the fixed-step solver "
      f"solver={solver!r}, got {value!r}.",
      _validation.integer,
      name,
      value,
      1,
    )
  return _checked(
    f"{name} must be > 0 for solver={solver!r}, got {value!r}.",
    _validation.positive,
    name,
    value,
  )


def _ode_solver(options) -> _solver.Solver:
  """The Solver named by `options.solver` (or that solver itself)."""
  if isinstance(options.solver, _solver.Solver):
    return options.solver
  if not isinstance(options.solver, str) or options.solver not in SOLVERS:
    raise ValueError(
      f"solver must be one of {', '.join(map(repr, SOLVERS))} or a "
      f"comln_tf Solver, got {options.solver!r}."
    )
  build, names = SOLVERS[options.solver]
  values = {
    name: _solver_option(options, options.solver, name) for name in names
  }
  return build(**values)


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
  """How `adapt` solves each task's flow and computes its gradient.

  The keyword arguments of `comln_tf.adapt` and of the layer
  `GradientFlowClassifier`, and the fields of `config.adaptation`, of the
  same names. Checked when built: a bad value, or a method the solver does
  not support, raises ValueError naming the option.

  Attributes:
    method: a name in `METHODS` or a `GradientMethod` (see `adapt`).
    solver: a name in `SOLVERS` or a `Solver` (see `adapt`).
    rtol, atol: tolerances of the adaptive solvers, > 0.
    max_steps: most solver steps of a solve, >= 1.
    num_steps: steps of the fixed-step solvers, >= 1 (needed by them).
    tasks_per_solve: solve the tasks in groups of this many (None: all
      together).
    gradient_method: the `GradientMethod` `adapt` runs (the solver's own
      version of `method`, see `Solver.gradient_method_for`). Derived.
    ode_solver: the `Solver` `adapt` runs. Derived.
  """

  method: str | _method.GradientMethod = "auto"
  solver: str | _solver.Solver = "dopri5"
  rtol: float = 1e-5
  atol: float = 1e-5
  max_steps: int = 10_000
  num_steps: int | None = None
  tasks_per_solve: int | None = None
  gradient_method: _method.GradientMethod = dataclasses.field(
    init=False, repr=False, compare=False
  )
  ode_solver: _solver.Solver = dataclasses.field(
    init=False, repr=False, compare=False
  )

  def __post_init__(self):
    method = _gradient_method(self.method)
    ode_solver = _ode_solver(self)
    # A solver may run a method its own way (TFP's adjoint) or refuse it.
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field("gradient_method", ode_solver.gradient_method_for(method))
    set_field("ode_solver", ode_solver)
    set_field(
      "max_steps",
      _checked(
        f"max_steps must be a positive integer, got {self.max_steps!r}.",
        _validation.integer,
        "max_steps",
        self.max_steps,
        1,
      ),
    )
    set_field(
      "tasks_per_solve",
      _checked(
        f"tasks_per_solve must be None or a positive integer, "
        f"got {self.tasks_per_solve!r}.",
        _validation.integer,
        "tasks_per_solve",
        self.tasks_per_solve,
        1,
        optional=True,
      ),
    )
