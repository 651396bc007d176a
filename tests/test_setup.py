"""What a newcomer meets: the set-up venv, the README's snippet, quiet CLIs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _clean_environment(**extra):
  """The test's environment without TensorFlow's log settings."""
  env = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith("TF_CPP") and key != "PYTHONPATH"
  }
  env.update(extra)
  return env


def _readme_api_snippet():
  readme = (_REPO / "README.md").read_text()
  section = readme[readme.index("## The Python API") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_venv_imports_comln_tf_from_any_folder(tmp_path):
  # launch/setup_env.sh installs the clone's comln_tf into the venv.
  result = subprocess.run(
    [sys.executable, "-c", "import comln_tf; print(comln_tf.__file__)"],
    cwd=tmp_path,
    env=_clean_environment(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert pathlib.Path(result.stdout.strip()).is_relative_to(_REPO)


@pytest.mark.slow
def test_the_readme_api_snippet_runs_as_a_file(tmp_path):
  script = tmp_path / "snippet.py"
  script.write_text(_readme_api_snippet())
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=_clean_environment(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'accuracy':" in result.stdout


_XLA_ASSERT = """
import launch
import tensorflow as tf


@tf.function(jit_compile=True)
def doubled(x):
  check = tf.debugging.Assert(tf.reduce_all(x > 0), ["not positive"])
  with tf.control_dependencies([check]):
    return 2 * x


print(float(tf.reduce_sum(doubled(tf.ones([3])))))
"""


def test_launchers_start_tensorflow_without_noise():
  # TensorFlow's start-up lines (no CUDA driver, cuInit) and XLA's
  # "Ignoring Assert operator" are not shown by default.
  result = subprocess.run(
    [sys.executable, "-c", _XLA_ASSERT],
    cwd=_REPO,
    env=_clean_environment(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "6.0"
  assert result.stderr == ""


def test_the_allocator_is_chosen_without_setting_anything():
  # BFC: the default allocator's page faults cost as much as the
  # arithmetic; it also makes the memory statistics work.
  code = (
    "import comln_tf, tensorflow as tf; tf.ones([8]);"
    "tf.config.experimental.reset_memory_stats('CPU:0');"
    "print(tf.config.experimental.get_memory_info('CPU:0')['peak'] >= 0)"
  )
  env = _clean_environment()
  env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "True"
