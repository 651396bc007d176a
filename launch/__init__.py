"""Command-line launchers, run as `python -m launch.<name>` (e.g. train,
evaluate) from the repository root, which must be on sys.path.
"""

import logging
import sys

from absl import flags


def start(argv):
  """What every launcher's `main` does first.

  Exits with an error on positional arguments (absl has taken the flags),
  and keeps TensorFlow's and absl's own INFO lines (one per checkpoint, for
  instance) out of the output: comln_tf logs through its own loggers.

  Args:
    argv: the arguments absl passes to `main`.
  """
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  for name in ("absl", "tensorflow"):
    logging.getLogger(name).setLevel("WARNING")


def require_positive_list(flag, kind=float):
  """Makes absl reject a list flag unless every entry is a `kind` > 0.

  absl then stops at parsing with a message naming the flag, instead of a
  traceback from the first `float(...)` in the middle of a run.

  Args:
    flag: the FlagHolder of a `flags.DEFINE_list`.
    kind: float or int.
  """

  def check(values):
    try:
      return bool(values) and all(kind(value) > 0 for value in values)
    except ValueError:
      return False

  flags.register_validator(
    flag,
    check,
    message=f"expected a comma-separated list of {kind.__name__}s > 0",
  )


def require_choices(flag, choices):
  """Makes absl reject a list flag with an entry not in `choices`."""
  flags.register_validator(
    flag,
    lambda values: bool(values) and set(values) <= set(choices),
    message=f"expected a comma-separated list of: {', '.join(choices)}",
  )
