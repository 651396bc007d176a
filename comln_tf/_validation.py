"""Checks of arguments, shared by the library, its CLIs and its exports.

Each check raises `error` (ValueError by default; callers pass their own
subclass, e.g. the training's ConfigError) with a message naming the
argument and what was expected, and returns the value in its plain Python
type. Booleans are never numbers here: `True` is not an integer >= 1.
"""

from collections.abc import Collection
import math
import numbers
from typing import Any, Literal, overload


def _or_none(optional: bool) -> str:
  return " or None" if optional else ""


def _real(value: Any) -> float | None:
  """`value` as a float if it is a real number other than a bool."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return None
  return float(value)


@overload
def integer(
  name: str,
  value: Any,
  minimum: int,
  *,
  optional: Literal[False] = False,
  error: type[Exception] = ValueError,
) -> int: ...


@overload
def integer(
  name: str,
  value: Any,
  minimum: int,
  *,
  optional: bool,
  error: type[Exception] = ValueError,
) -> int | None: ...


def integer(
  name: str,
  value: Any,
  minimum: int,
  *,
  optional: bool = False,
  error: type[Exception] = ValueError,
) -> int | None:
  """`value` as an int, checked to be an integer >= minimum.

  Integral floats (3.0) and NumPy integers are accepted and returned as int.

  Raises:
    error: `value` is a bool, not integral, or below minimum.
  """
  if optional and value is None:
    return None
  number = _real(value)
  if (
    number is None
    or not math.isfinite(number)
    or int(number) != number
    or number < minimum
  ):
    raise error(
      f"{name} must be an integer >= {minimum}{_or_none(optional)}; "
      f"got {value!r}."
    )
  return int(number)


@overload
def positive(
  name: str,
  value: Any,
  *,
  optional: Literal[False] = False,
  error: type[Exception] = ValueError,
) -> float: ...


@overload
def positive(
  name: str,
  value: Any,
  *,
  optional: bool,
  error: type[Exception] = ValueError,
) -> float | None: ...


def positive(
  name: str,
  value: Any,
  *,
  optional: bool = False,
  error: type[Exception] = ValueError,
) -> float | None:
  """`value` as a float, checked to be a finite number > 0.

  Raises:
    error: `value` is a bool, not a number, not finite, or <= 0.
  """
  if optional and value is None:
    return None
  number = _real(value)
  if number is None or not 0 < number < math.inf:
    raise error(
      f"{name} must be a finite number > 0{_or_none(optional)}; got {value!r}."
    )
  return number


def in_range(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  include_high: bool = True,
  error: type[Exception] = ValueError,
) -> float:
  """`value` as a float, checked to lie in [low, high] (or [low, high)).

  Raises:
    error: `value` is a bool, not a number, or outside the interval.
  """
  number = _real(value)
  inside = number is not None and (
    low <= number <= high if include_high else low <= number < high
  )
  if number is None or not inside:
    bracket = "]" if include_high else ")"
    raise error(f"{name} must be in [{low}, {high}{bracket}; got {value!r}.")
  return number


def one_of(
  name: str,
  value: Any,
  choices: Collection[str],
  *,
  error: type[Exception] = ValueError,
) -> str:
  """`value`, checked to be one of `choices`.

  Raises:
    error: `value` is not one of them.
  """
  if not isinstance(value, str) or value not in choices:
    raise error(
      f"{name} must be one of {', '.join(sorted(choices))}; got {value!r}."
    )
  return value
