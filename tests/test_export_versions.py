"""Tests of export/saved_model.py: version folders and temporary folders.

Exports go to `<export_base>/<version>/` through a temporary folder of
their own: never half-written, never mixed when they run at the same time,
and the temporary folders of killed exports are removed by later ones.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import REPO
from export import saved_model
from export import session
from export import warmup
from export_helpers import IMAGE_SHAPE
from export_helpers import five_way_model


def test_next_version_and_existing_version(tmp_path):
  model = five_way_model()
  base = tmp_path / "base"
  assert saved_model.next_version(str(base)) == 1
  for name in ("1", "3", "10", ".tmp-11", "notes"):
    (base / name).mkdir(parents=True)
  assert saved_model.next_version(str(base)) == 11
  with pytest.raises(FileExistsError, match="3"):
    saved_model.export_version(model, str(base), IMAGE_SHAPE, version=3)
  with pytest.raises(ValueError, match="positive integer"):
    saved_model.export_version(model, str(base), IMAGE_SHAPE, version=0)


# An export killed while it writes its temporary folder.
_KILLED_EXPORT_SCRIPT = """
import os
import sys
import time

from export import saved_model


def export_forever(model, export_dir, *args, **kwargs):
  os.makedirs(export_dir)
  with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
    f.write(b"half written")
  print("writing", flush=True)
  time.sleep(600)


saved_model.export = export_forever
saved_model.export_version(None, sys.argv[1], (28, 28, 1))
"""


def test_later_exports_remove_the_temporary_folders_of_killed_ones(
  concurrent_exports,
):
  # The killed export left its temporary folder, half written.
  [left] = concurrent_exports.left
  assert left.startswith(".tmp-export-")
  # The exports after it removed it, and took the first versions.
  base = concurrent_exports.base
  assert sorted(os.listdir(base)) == ["1", "2"]
  assert sorted(concurrent_exports.export_dirs) == [
    str(base / "1"),
    str(base / "2"),
  ]
  assert any(
    "Removed the temporary folders of exports that did not finish: "
    f"{base / left}." in log
    for log in concurrent_exports.logs
  ), concurrent_exports.logs


def test_only_stale_temporary_folders_are_removed(tmp_path):
  here, pid = saved_model._host(), os.getpid()  # pylint: disable=protected-access
  gone = 2**22 + 1  # Above Linux's largest pid: no process has it.
  token = "0123456789abcdef" * 2
  names = {
    # This host: by whether the process runs.
    f".tmp-export-{here}-{gone}-{token}": False,
    f".tmp-export-{gone}-{token}": False,  # Named without the host.
    f".tmp-export-{here}-{pid}-{token}": True,  # An export running now.
    # Another host: by age.
    f".tmp-export-elsewhere-{gone}-{token}": True,
    f".tmp-export-old_host-{gone}-{token}": False,
    # Not temporary folders of exports.
    "3": True,
    ".tmp-11": True,
  }
  for name in names:
    (tmp_path / name).mkdir()
  day_and_more = time.time() - saved_model.STALE_TEMP_SECONDS - 60
  os.utime(
    tmp_path / f".tmp-export-old_host-{gone}-{token}", (day_and_more,) * 2
  )
  removed = saved_model.remove_stale_temp_dirs(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(
    name for name, kept in names.items() if kept
  )
  assert sorted(removed) == sorted(
    str(tmp_path / name) for name, kept in names.items() if not kept
  )


_EXPORT_SCRIPT = r"""
import os, sys, time
import keras
from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN
from export import saved_model

base, t_final, ready, start = sys.argv[1], float(sys.argv[2]), *sys.argv[3:]
keras.utils.set_random_seed(int(t_final))
model = COMLN(backbones.Conv4(filters=8),
              GradientFlowClassifier(5, initial_t=t_final))
model.build({"support_images": (None, None, 28, 28, 1)})
# Both exports start together, so that they choose the same next version.
open(ready, "w").close()
while not os.path.exists(start):
  time.sleep(0.01)
print(saved_model.export_version(model, base, (28, 28, 1),
                                 metadata={"writer_t": t_final}))
"""


def _exported_t(export_dir):
  """T saved in a SavedModel's variables (the writer's, by construction)."""
  reader = tf.train.load_checkpoint(
    os.path.join(export_dir, "variables", "variables")
  )
  # log T is the model's only scalar variable.
  [log_t] = [
    reader.get_tensor(name)
    for name, shape in reader.get_variable_to_shape_map().items()
    if shape == [] and name.endswith("VARIABLE_VALUE")
  ]
  return float(np.exp(log_t))


def _kill_if_running(process):
  if process.poll() is None:
    process.kill()
    process.wait(timeout=60)


def _wait_for_files(paths, writers, timeout):
  """Waits until every path exists; fails if a writer exits first.

  Args:
    paths: pathlib.Paths.
    writers: (process, path of its log) pairs.
    timeout: seconds.
  """
  deadline = time.monotonic() + timeout
  while not all(path.exists() for path in paths):
    for process, log_path in writers:
      assert process.poll() is None, log_path.read_text()[-3000:]
    assert time.monotonic() < deadline, f"no {paths} after {timeout} s"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def concurrent_exports(tmp_path_factory):
  """Two exports at the same time into a base holding a killed one's folder.

  The killed export and both writers start together; the writers wait,
  their model built, until the killed one is gone, then export at once.

  Returns:
    namespace: base, left (the base's entries once the export was killed),
    export_dirs (printed by the writers) and logs (their output).
  """
  folder = tmp_path_factory.mktemp("exports")
  base = folder / "base"
  script = folder / "export_one.py"
  script.write_text(_EXPORT_SCRIPT)
  start = folder / "start"
  with contextlib.ExitStack() as stack:
    killed = subprocess.Popen(
      [sys.executable, "-c", _KILLED_EXPORT_SCRIPT, str(base)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
    )
    stack.callback(_kill_if_running, killed)
    writers = []
    for t_final in (2.0, 3.0):
      log_path = folder / f"export{t_final}.log"
      log = stack.enter_context(open(log_path, "w"))
      writer = subprocess.Popen(
        [
          sys.executable,
          str(script),
          str(base),
          str(t_final),
          str(folder / f"ready{t_final}"),
          str(start),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
      )
      stack.callback(_kill_if_running, writer)
      writers.append((writer, log_path))
    assert killed.stdout.readline().strip() == "writing"
    killed.kill()
    killed.wait(timeout=60)
    left = os.listdir(base)
    _wait_for_files(
      [folder / f"ready{t_final}" for t_final in (2.0, 3.0)],
      writers,
      timeout=300,
    )
    start.touch()
    logs = []
    for writer, log_path in writers:
      code = writer.wait(timeout=300)
      logs.append(log_path.read_text())
      assert code == 0, logs[-1][-3000:]
  return types.SimpleNamespace(
    base=base,
    left=left,
    export_dirs=[
      line
      for log in logs
      for line in log.splitlines()
      if line.startswith(str(base))
    ],
    logs=logs,
  )


def test_concurrent_exports_give_complete_separate_versions(
  concurrent_exports,
):
  base = concurrent_exports.base
  assert sorted(os.listdir(base)) == ["1", "2"]  # no temporary folder left
  written = set()
  for version in ("1", "2"):
    export_dir = base / version
    with open(export_dir / "assets.extra" / saved_model.METADATA_FILE) as f:
      info = json.load(f)
    # Metadata and variables of the same export, never one of each.
    assert info["t_final"] == pytest.approx(info["writer_t"])
    assert _exported_t(export_dir) == pytest.approx(info["writer_t"])
    written.add(info["writer_t"])
    served = session.SessionModel(str(export_dir))
    support = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    outputs = served.run(
      warmup.predict_request(
        "serving_default",
        {
          "support_images": support,
          "support_labels": np.arange(5),
          "query_images": support,
        },
      )
    )
    assert outputs["logits"].shape == (5, 5)
  assert written == {2.0, 3.0}
