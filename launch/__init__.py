"""Command-line launchers, run as `python -m launch.<name>` (e.g. train,
evaluate) from the repository root, which must be on sys.path.
"""

import logging
import sys


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
