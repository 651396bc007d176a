"""Command-line launchers, run as `python -m launch.<name>` (e.g. train,
evaluate) from the repository root, which must be on sys.path.
"""

import logging
import os
import sys

from absl import flags


def _start_tensorflow_quietly():
  """Imports TensorFlow without its start-up lines on stderr.

  On a machine without a GPU, TensorFlow's CUDA build prints lines about
  missing drivers when it loads (before its log level applies) and an
  error when it looks for a device; XLA warns about every assertion it
  compiles away. None of it concerns the user. Setting
  TF_CPP_MIN_LOG_LEVEL (0 shows everything) keeps TensorFlow's own log as
  it is, start-up included.
  """
  if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
  saved_stderr = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)


_start_tensorflow_quietly()


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
  quiet_library_logs()


def quiet_library_logs():
  """Keeps TensorFlow's and absl's own INFO lines out of the output."""
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
