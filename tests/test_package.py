"""The package `comln_tf`: its public names, imported on first use."""

import json
import subprocess
import sys

from cli_helpers import REPO

_IMPORT_SCRIPT = r"""
import json, sys
import comln_tf
import comln_tf.config
loaded = "tensorflow" in sys.modules
names = {name: type(getattr(comln_tf, name)).__name__
         for name in comln_tf.__all__}
print(json.dumps([loaded, names, sorted(dir(comln_tf))]))
"""


def test_import_leaves_tensorflow_out_and_every_name_resolves():
  result = subprocess.run(
    [sys.executable, "-c", _IMPORT_SCRIPT],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  loaded, names, listed = json.loads(result.stdout.strip().splitlines()[-1])
  assert not loaded
  assert set(names) == {
    "adapt",
    "AdaptOptions",
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
    "layers",
  }
  assert names["layers"] == "module" and names["adapt"] == "function"
  assert set(names) <= set(listed)


def test_unknown_names_raise_attribute_error():
  import comln_tf  # pylint: disable=g-import-not-at-top

  try:
    comln_tf.no_such_name  # noqa: B018
  except AttributeError as error:
    assert "no_such_name" in str(error)
  else:
    raise AssertionError("comln_tf.no_such_name resolved")
