"""The shared argument checks of comln_tf._validation."""

import numpy as np
import pytest

from comln_tf import _validation


class _CustomError(ValueError):
  pass


@pytest.mark.parametrize("value", [1, 7, 3.0, np.int64(2), np.float32(5.0)])
def test_integer_accepts_integral_values_and_returns_int(value):
  result = _validation.integer("steps", value, 1)
  assert result == value and type(result) is int


@pytest.mark.parametrize(
  "value", [0, -3, 2.5, True, False, "3", None, float("nan"), float("inf")]
)
def test_integer_refuses_naming_the_argument(value):
  with pytest.raises(ValueError, match=r"steps must be an integer >= 1; got"):
    _validation.integer("steps", value, 1)


def test_optional_values_may_be_none_and_say_so():
  assert _validation.integer("n", None, 1, optional=True) is None
  assert _validation.positive("x", None, optional=True) is None
  with pytest.raises(ValueError, match=r"n must be an integer >= 2 or None"):
    _validation.integer("n", 1, 2, optional=True)


@pytest.mark.parametrize("value", [1e-9, 2, 1e30])
def test_positive_accepts_finite_numbers_above_zero(value):
  assert _validation.positive("rtol", value) == float(value)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True])
def test_positive_refuses(value):
  with pytest.raises(ValueError, match=r"rtol must be a finite number > 0"):
    _validation.positive("rtol", value)


def test_in_range_includes_or_excludes_its_upper_end():
  assert _validation.in_range("momentum", 1, 0, 1) == 1.0
  with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
    _validation.in_range("smoothing", 1.0, 0, 1, include_high=False)
  with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
    _validation.in_range("momentum", float("nan"), 0, 1)


def test_one_of_lists_the_choices():
  assert _validation.one_of("solver", "rk4", ("rk4", "euler")) == "rk4"
  with pytest.raises(ValueError, match=r"solver must be one of euler, rk4"):
    _validation.one_of("solver", "RK4", ("rk4", "euler"))


def test_errors_are_of_the_callers_class():
  with pytest.raises(_CustomError):
    _validation.integer("ways", 1, 2, error=_CustomError)
  with pytest.raises(_CustomError):
    _validation.one_of("x", 3, ("a",), error=_CustomError)
