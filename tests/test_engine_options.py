"""`comln_tf.AdaptOptions`: adapt's options, checked once when built."""

import dataclasses
import inspect

import pytest

import comln_tf
from comln_tf.layers import GradientFlowClassifier
from references import make_problem

_FIELDS = (
  "method",
  "solver",
  "rtol",
  "atol",
  "max_steps",
  "num_steps",
  "tasks_per_solve",
)


@pytest.fixture(scope="module")
def problem():
  return make_problem()


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(method="newton"), "method must be one of"),
    (dict(solver="midpoint"), "solver must be one of"),
    (dict(solver="rk4"), "num_steps must be a positive integer"),
    (dict(solver="euler", num_steps=0), "num_steps must be a positive integer"),
    (dict(rtol=0.0), "rtol must be > 0"),
    (dict(max_steps=0), "max_steps must be a positive integer"),
    (dict(tasks_per_solve=0), "tasks_per_solve must be None or a positive"),
  ],
)
def test_bad_options_name_the_option(problem, kwargs, message):
  with pytest.raises(ValueError, match=message):
    comln_tf.adapt(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      1.0,
      **kwargs,
    )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(method="newton"), "method must be one of"),
    (dict(solver="midpoint"), "solver must be one of"),
    (dict(solver="euler"), "num_steps must be a positive integer"),
    (dict(atol=-1.0), "atol must be > 0 for solver='dopri5'"),
    (dict(max_steps=True), "max_steps must be a positive integer"),
    (dict(tasks_per_solve=1.5), "tasks_per_solve must be None or a positive"),
    (dict(method="discrete_adjoint", solver="rk4", num_steps=4), None),
  ],
)
def test_options_are_checked_when_built(kwargs, message):
  if message is None:
    # The discrete adjoint refuses a fixed-step solver when it runs.
    assert comln_tf.AdaptOptions(**kwargs).solver == "rk4"
    return
  with pytest.raises(ValueError, match=message):
    comln_tf.AdaptOptions(**kwargs)


def test_adapt_and_the_layer_take_the_options_defaults():
  defaults = comln_tf.AdaptOptions()
  for function in (comln_tf.adapt, GradientFlowClassifier.__init__):
    parameters = inspect.signature(function).parameters
    for name in _FIELDS:
      assert parameters[name].default == getattr(defaults, name), name
  assert [
    field.name for field in dataclasses.fields(defaults) if field.init
  ] == list(_FIELDS)


def test_options_are_frozen_hashable_and_resolved():
  options = comln_tf.AdaptOptions(max_steps=5.0)
  assert options.max_steps == 5 and isinstance(options.max_steps, int)
  assert options == comln_tf.AdaptOptions(max_steps=5)
  assert hash(options) == hash(comln_tf.AdaptOptions(max_steps=5))
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.max_steps = 6
  assert isinstance(options.gradient_method, comln_tf.Auto)
  assert options.ode_solver == comln_tf.Dopri5(rtol=1e-5, atol=1e-5)
  fixed = comln_tf.AdaptOptions(solver="rk4", num_steps=3, method="forward")
  assert fixed.ode_solver == comln_tf.RK4(num_steps=3)
  assert fixed.gradient_method == comln_tf.Forward()
  solver = comln_tf.Euler(num_steps=2)
  assert comln_tf.AdaptOptions(solver=solver).ode_solver is solver


def test_every_method_and_solver_has_one_entry():
  from comln_tf import engine  # pylint: disable=g-import-not-at-top

  assert sorted(engine.METHODS) == [
    "adjoint",
    "auto",
    "backprop",
    "discrete_adjoint",
    "forward",
  ]
  assert sorted(engine.SOLVERS) == [
    "dopri5",
    "euler",
    "rk4",
    "tfp_bdf",
    "tfp_dopri5",
  ]
