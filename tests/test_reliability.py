"""Reliability and security: hostile data files, damaged checkpoints,
concurrent exports, bounded serving requests, engine edge cases, evaluation
outputs and the data cache."""

import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from cli_helpers import REPO
import comln_tf
from comln_tf import backbones
from comln_tf import data
from comln_tf import training
from comln_tf.data import _sources
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN
from comln_tf.training import _checkpoints
from comln_tf.training import _evaluate as training_evaluate
from export import saved_model
from export import session
from export import warmup

# Data files are data.

_read_pickle = _sources._read_pickle  # pylint: disable=protected-access


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes a pickle as Python 2 with numpy 1 writes one.

  Every str and bytes is a Python 2 `str` (BINSTRING), and numpy's helpers
  are named `numpy.core.*`: such files only load with encoding="latin1".
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch[str] = _save_py2_str
  dispatch[bytes] = _save_py2_str

  def save_global(self, obj, name=None):
    module = pickle.whichmodule(obj, obj.__name__).replace(
      "numpy._core", "numpy.core"
    )
    self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
    self.memoize(obj)


class _WritesAFile:
  """Unpickling calls `function(*args)`, as a hostile pickle would."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, how):
  target = tmp_path / "written_by_the_pickle"
  payload = (
    _WritesAFile(os.system, f"touch {target}")
    if how == "os.system"
    else _WritesAFile(open, str(target), "w")
  )
  # Under the entries the loader reads, as a real attack would hide it.
  for prefix in ("train", "val", "test"):
    with open(tmp_path / f"{prefix}_embeddings.pkl", "wb") as f:
      pickle.dump({"embeddings": payload, "keys": ["0-a-0"]}, f, protocol=2)
  path = tmp_path / "train_embeddings.pkl"
  # The file is live: an unrestricted load runs its code (in a subfolder,
  # so that the check below sees the restricted loader alone).
  probe = tmp_path / "probe"
  probe.mkdir()
  live = (
    _WritesAFile(os.system, f"touch {probe / 'ran'}")
    if how == "os.system"
    else _WritesAFile(open, str(probe / "ran"), "w")
  )
  pickle.loads(pickle.dumps(live, protocol=2))
  assert (probe / "ran").exists()

  name = "system" if how == "os.system" else "open"
  with pytest.raises(ValueError, match=rf"{path}.*refused.*{name}"):
    data.load_splits("embeddings", data_dir=tmp_path)
  assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_still_load(tmp_path, protocol):
  written = {
    "data": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "embeddings": np.linspace(-1, 1, 6, dtype=np.float32),
    "labels": [1, 2, 3],
    "keys": np.array(["0-a-1", "1-b-2"]),
    "scalar": np.float64(2.5),
    "nested": {"t": (1, "x", b"y")},
  }
  path = tmp_path / "file.pkl"
  path.write_bytes(pickle.dumps(written, protocol=protocol))
  loaded = _read_pickle(path, ("data", "labels"))
  assert sorted(loaded) == sorted(written)
  for key in ("data", "embeddings", "keys"):
    assert loaded[key].dtype == written[key].dtype
    np.testing.assert_array_equal(loaded[key], written[key])
  assert loaded["scalar"] == 2.5 and loaded["nested"] == {"t": (1, "x", b"y")}


def test_python2_numpy_pickle_loads(tmp_path):
  images = np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3)
  buffer = io.BytesIO()
  _Py2Pickler(buffer, protocol=2).dump({"data": images, "labels": [7, 9]})
  raw = buffer.getvalue()
  assert b"numpy.core.multiarray\n_reconstruct" in raw
  path = tmp_path / "py2.pickle"
  path.write_bytes(raw)
  with pytest.raises(UnicodeDecodeError):  # as a real Python 2 pickle
    pickle.loads(raw)
  loaded = _read_pickle(path, ("data", "labels"))
  assert loaded["labels"] == [7, 9]
  assert loaded["data"].dtype == np.uint8
  np.testing.assert_array_equal(loaded["data"], images)


def test_a_damaged_pickle_is_a_clear_error(tmp_path):
  path = tmp_path / "cut.pkl"
  path.write_bytes(pickle.dumps({"data": np.zeros(100)}, protocol=2)[:60])
  with pytest.raises(ValueError, match=f"{path} is not a pickle"):
    _read_pickle(path, ("data",))


# A few bytes that ask for 256 MB: bytearray(n), numpy's _reconstruct of a
# large shape (numpy pickles ask for an empty array, then fill it from the
# file) and ndarray(shape) called directly.
_HUGE = 2**28


@pytest.mark.parametrize(
  "raw, message",
  [
    (
      f"c__builtin__\nbytearray\n(I{_HUGE}\ntR.".encode(),
      "bytearray with a int",
    ),
    (
      f"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
      f"(I{_HUGE}\ntS'b'\ntR.".encode(),
      "_reconstruct for an array of shape",
    ),
    (f"cnumpy\nndarray\n((I{_HUGE}\nttR.".encode(), "numpy.ndarray directly"),
  ],
)
def test_a_pickle_cannot_allocate_memory_its_file_does_not_hold(
  tmp_path, raw, message
):
  path = tmp_path / "small.pkl"
  path.write_bytes(raw)
  assert path.stat().st_size < 100
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=rf"{path}.*refused.*{message}"):
      _read_pickle(path, ("data",))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < _HUGE // 16, peak


# Engine edge cases.

_ZERO_TASKS_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
import comln_tf

def adapt(w0, x, y):
  return comln_tf.adapt(w0, x, y, 1.0)

dynamic = [tf.TensorSpec([5, 8]), tf.TensorSpec([None, None, 8]),
           tf.TensorSpec([None, None], tf.int32)]
modes = {"eager": adapt, "function": tf.function(adapt),
         "function_dynamic_batch": tf.function(adapt,
                                               input_signature=dynamic),
         "xla": tf.function(adapt, jit_compile=True),
         "xla_dynamic_batch": tf.function(adapt, input_signature=dynamic,
                                          jit_compile=True)}
results = {}
for name, function in modes.items():
  w0 = tf.Variable(tf.ones([5, 8]))
  with tf.GradientTape() as tape:
    weights = function(w0, tf.zeros([0, 5, 8]), tf.zeros([0, 5], tf.int32))
    loss = tf.reduce_sum(weights)
  gradient = tape.gradient(loss, w0)
  results[name] = [weights.shape.as_list(),
                   float(tf.reduce_max(tf.abs(gradient)))]
print(json.dumps(results))
"""


def test_zero_tasks_give_an_empty_result_in_every_mode():
  # In a process of its own: the failure this guards against was a
  # floating point exception that killed the process.
  result = subprocess.run(
    [sys.executable, "-c", _ZERO_TASKS_SCRIPT],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(result.stdout.strip().splitlines()[-1])
  assert results == {
    name: [[0, 5, 8], 0.0]
    for name in (
      "eager",
      "function",
      "function_dynamic_batch",
      "xla",
      "xla_dynamic_batch",
    )
  }


_W0 = np.zeros((5, 8), np.float32)
_X = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
_Y = np.tile(np.arange(5, dtype=np.int32), (2, 1))


@pytest.mark.parametrize(
  "arguments, error, message",
  [
    (
      (_W0, _X[:, :0], _Y[:, :0], 1.0),
      ValueError,
      r"support_embeddings must hold M >= 1 examples.*\(2, 0, 8\)",
    ),
    (
      (_W0[:1], _X, 0 * _Y, 1.0),
      ValueError,
      r"init_weights must have N >= 2 rows.*\(1, 8\)",
    ),
    (
      (_W0.astype(np.float16), _X.astype(np.float16), _Y, 1.0),
      TypeError,
      "init_weights must be float32 or float64, got dtype float16",
    ),
    (
      (tf.cast(_W0, tf.bfloat16), tf.cast(_X, tf.bfloat16), _Y, 1.0),
      TypeError,
      "init_weights must be float32 or float64, got dtype bfloat16",
    ),
    (
      (_W0, _X.astype(np.int32), _Y, 1.0),
      TypeError,
      "support_embeddings must have the dtype of init_weights",
    ),
    (
      (_W0.astype(np.int32), _X.astype(np.int32), _Y, 1.0),
      TypeError,
      "init_weights must be float32 or float64",
    ),
    (
      (_W0, _X, _Y, float("inf")),
      ValueError,
      "t_final must be finite and > 0, got inf",
    ),
    (
      (_W0, _X, _Y, float("nan")),
      ValueError,
      "t_final must be finite and > 0, got nan",
    ),
    ((_W0, _X, _Y, 0.0), ValueError, "t_final must be finite and > 0"),
    (
      (_W0, _X, _Y, tf.constant(-2.0)),
      ValueError,
      "t_final must be finite and > 0, got -2.0",
    ),
  ],
)
def test_bad_arguments_are_refused_before_solving_eagerly(
  arguments, error, message
):
  start = time.perf_counter()
  with pytest.raises(error, match=message):
    comln_tf.adapt(*arguments)
  assert time.perf_counter() - start < 1.0


def test_bad_sizes_and_times_known_at_run_time_fail_fast():
  spec = [
    tf.TensorSpec([None, None]),
    tf.TensorSpec([None, None, None]),
    tf.TensorSpec([None, None], tf.int32),
    tf.TensorSpec([]),
  ]
  graph = tf.function(lambda *a: comln_tf.adapt(*a), input_signature=spec)
  xla = tf.function(
    lambda *a: comln_tf.adapt(*a), input_signature=spec, jit_compile=True
  )
  # Traced (and compiled) on a good task first: the timings below are of
  # the refusals alone.
  reference = comln_tf.adapt(_W0, _X, _Y, 1.0).numpy()
  np.testing.assert_allclose(graph(_W0, _X, _Y, 1.0), reference, atol=1e-5)
  np.testing.assert_allclose(xla(_W0, _X, _Y, 1.0), reference, atol=1e-5)
  bad = {
    "M = 0": ((_W0, _X[:, :0], _Y[:, :0], 1.0), "M >= 1 examples"),
    "N = 1": ((_W0[:1], _X, 0 * _Y, 1.0), "N >= 2 classes"),
    "T = inf": (
      (_W0, _X, _Y, float("inf")),
      r"t_final must be finite and > 0, got\] \[inf\]",
    ),
    "T = -1": ((_W0, _X, _Y, -1.0), "t_final must be finite and > 0"),
  }
  for case, (arguments, message) in bad.items():
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      graph(*arguments)
    assert time.perf_counter() - start < 1.0, case
    # Under XLA assertions are compiled away: NaN, without a solve. XLA
    # compiles each new shape (M = 0 is one): timed once compiled.
    assert np.all(np.isnan(xla(*arguments).numpy())), case
    start = time.perf_counter()
    assert np.all(np.isnan(xla(*arguments).numpy())), case
    assert time.perf_counter() - start < 1.0, case


def test_layer_refuses_support_and_query_batches_of_different_sizes():
  layer = GradientFlowClassifier(5)
  layer.build(_X.shape)
  with pytest.raises(ValueError, match="same number of tasks B"):
    layer(_X, _Y, _X[:1])
  spec = [
    tf.TensorSpec([None, None, 8]),
    tf.TensorSpec([None, None], tf.int32),
    tf.TensorSpec([None, None, 8]),
  ]
  call = tf.function(lambda *a: layer(*a), input_signature=spec)
  assert call(_X, _Y, _X[:, :3]).shape == (2, 3, 5)
  with pytest.raises(
    tf.errors.InvalidArgumentError, match="same number of tasks B"
  ):
    call(_X, _Y, _X[:1])


@pytest.mark.parametrize(
  "labels, message",
  [
    # Eager and graph errors print the values differently: "_" spans both.
    ([[0, 1, 2, 3, 999], [0, 1, 2, 3, 4]], "got N =_1000_M =_5_"),
    ([[0, 1, 2, 3, 10**9], [0, 1, 2, 3, 4]], "got N =_1000000001_"),
    ([[0, 1, 2, 3, -1], [0, 1, 2, 3, 4]], r"min\(label\) =_-1_"),
    (
      [[0, 1, 3, 3, 1], [0, 1, 2, 3, 3]],
      "every class 0..N-1 must appear.*N =_4_.*missing.*_0_0_1_0_0_0_0_0_",
    ),
  ],
)
def test_tied_rows_layer_refuses_labels_that_are_not_a_task(labels, message):
  layer = GradientFlowClassifier(tie_init_rows=True)
  layer.build(_X.shape)
  spec = [
    tf.TensorSpec([None, None, 8]),
    tf.TensorSpec([None, None], tf.int32),
    tf.TensorSpec([None, None, 8]),
  ]
  for call in (layer, tf.function(lambda *a: layer(*a), input_signature=spec)):
    assert call(_X, tf.constant([[0, 1, 2, 1, 0]] * 2), _X[:, :3]).shape == (
      2,
      3,
      3,
    )
    with pytest.raises(
      tf.errors.InvalidArgumentError,
      match="(?s)" + message.replace("_", r"[\W b']+"),
    ):
      call(_X, tf.constant(labels, tf.int32), _X[:, :3])


# Exports.

_EXPORT_SCRIPT = r"""
import sys, time
import keras
from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN
from export import saved_model

base, t_final, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
keras.utils.set_random_seed(int(t_final))
model = COMLN(backbones.Conv4(filters=8),
              GradientFlowClassifier(5, initial_t=t_final))
model.build({"support_images": (None, None, 28, 28, 1)})
# Both exports start together, so that they choose the same next version.
time.sleep(max(0.0, start_at - time.time()))
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


def test_concurrent_exports_give_complete_separate_versions(tmp_path):
  base = tmp_path / "base"
  script = tmp_path / "export_one.py"
  script.write_text(_EXPORT_SCRIPT)
  start_at = time.time() + 25
  writers = []
  for t_final in (2.0, 3.0):
    log = open(tmp_path / f"export{t_final}.log", "w")
    writers.append(
      (
        subprocess.Popen(
          [sys.executable, str(script), str(base), str(t_final), str(start_at)],
          cwd=REPO,
          env={**os.environ, "PYTHONPATH": str(REPO)},
          stdout=log,
          stderr=subprocess.STDOUT,
        ),
        log,
      )
    )
  for writer, log in writers:
    try:
      assert writer.wait(timeout=300) == 0, pathlib.Path(log.name).read_text()[
        -3000:
      ]
    finally:
      if writer.poll() is None:
        writer.kill()
      log.close()
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


# Serving.


def _exported(base, backbone, example_shape, **export_options):
  keras.utils.set_random_seed(0)
  model = COMLN(backbone, GradientFlowClassifier(5, initial_t=2.0))
  model.build({"support_images": (None, None) + tuple(example_shape)})
  export_dir = saved_model.export_version(
    model, str(base), example_shape, **export_options
  )
  return session.SessionModel(export_dir), export_dir


@pytest.fixture(scope="module")
def served_images(tmp_path_factory):
  """A served 5-way Conv-4 (8 filters) on 28x28x1 images, T = 2."""
  return _exported(
    tmp_path_factory.mktemp("images"), backbones.Conv4(filters=8), (28, 28, 1)
  )[0]


def _request(support, labels, query, signature="serving_default"):
  return warmup.predict_request(
    signature,
    {
      "support_images": support,
      "support_labels": labels,
      "query_images": query,
    },
  )


def _image_task(shots, queries=4, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(5), shots)
  return (
    rng.random((5 * shots, 28, 28, 1), np.float32),
    labels,
    rng.random((queries, 28, 28, 1), np.float32),
  )


@pytest.mark.parametrize(
  "which, scale",
  [
    ("support_images", 255.0),
    ("query_images", 255.0),
    ("support_images", 3e38),
    ("support_images", -1.0),
  ],
)
def test_pixels_outside_0_1_are_refused_naming_the_input(
  served_images, which, scale
):
  support, labels, query = _image_task(shots=1)
  served_images.run(_request(support, labels, query))  # valid as it is
  inputs = {"support_images": support, "query_images": query}
  inputs[which] = inputs[which] * scale
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=rf"{which} must hold pixels in \[0, 1\]",
  ):
    served_images.run(
      _request(inputs["support_images"], labels, inputs["query_images"])
    )
  with pytest.raises(
    tf.errors.InvalidArgumentError, match=r"images must hold pixels in \[0, 1\]"
  ):
    served_images.run(
      warmup.predict_request("embed", {"images": inputs[which]})
    )


def test_a_bad_request_of_400_support_images_fails_within_a_second(
  served_images,
):
  support, labels, query = _image_task(shots=80)
  served_images.run(_request(*_image_task(shots=1)))  # warm
  for bad in (support * 255.0, support * 3e38):
    start = time.perf_counter()
    with pytest.raises(
      tf.errors.InvalidArgumentError,
      match=r"support_images must hold pixels in \[0, 1\]",
    ):
      served_images.run(_request(bad, labels, query))
    assert time.perf_counter() - start < 1.0


@pytest.fixture(scope="module")
def served_features(tmp_path_factory):
  """A served 5-way model on 16-d feature vectors (identity backbone)."""
  return _exported(
    tmp_path_factory.mktemp("features"),
    backbones.get_backbone("identity"),
    (16,),
  )


def _feature_task(num_support, scale=1.0, offset=0.0, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(num_support) % 5
  features = rng.normal(size=(num_support, 16)) + offset
  return (
    (scale * features).astype(np.float32),
    labels,
    rng.normal(size=(3, 16)).astype(np.float32),
  )


def test_a_request_too_stiff_for_the_serving_budget_is_refused_fast(
  served_features,
):
  served, export_dir = served_features
  with open(
    os.path.join(export_dir, "assets.extra", saved_model.METADATA_FILE)
  ) as f:
    assert json.load(f)["max_serving_steps"] == (
      saved_model.DEFAULT_SERVING_STEPS
    )
  good = _feature_task(400)
  start = time.perf_counter()
  assert served.run(_request(*good))["logits"].shape == (3, 5)
  good_seconds = time.perf_counter() - start
  # Finite, but 1e4 times the scale: the flow is ~1e8 times stiffer.
  bad = _feature_task(400, scale=1e4, offset=1.0)
  # The bound: T lambda_max(G) / (3.3 M N) steps, far above the budget.
  gram = bad[0].astype(np.float64) @ bad[0].T.astype(np.float64)
  estimate = 2.0 * np.linalg.eigvalsh(gram)[-1] / (3.3 * 400 * 5)
  assert estimate > 100 * saved_model.DEFAULT_SERVING_STEPS
  start = time.perf_counter()
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match="too stiff to adapt within the serving step budget of 2000 steps",
  ):
    served.run(_request(*bad))
  bad_seconds = time.perf_counter() - start
  assert bad_seconds < 1.0
  assert bad_seconds < 2 * good_seconds + 0.1


def _solver_steps(model, support, labels):
  """dopri5 steps of the plain solve of one task, in process."""
  _, stats = model.classifier.adapt(
    support[None], labels[None], training=False, return_stats=True
  )
  return int(stats.num_steps)


def test_the_serving_budget_bounds_every_solve(tmp_path):
  keras.utils.set_random_seed(0)
  model = COMLN(
    backbones.get_backbone("identity"), GradientFlowClassifier(5, initial_t=2.0)
  )
  model.build({"support_images": (None, None, 16)})
  # The budget: what the export's own warmup tasks need, no more.
  budget = max(
    _solver_steps(model, task["support_images"], task["support_labels"])
    for task in (
      warmup.task((16,), 5, shots, seed) for seed, shots in enumerate((1, 5))
    )
  )
  support, labels, query = _feature_task(400, scale=10.0)
  needed = _solver_steps(model, support, labels)
  assert needed > budget
  export_dir = saved_model.export_version(
    model, str(tmp_path), (16,), max_serving_steps=budget
  )
  served = session.SessionModel(export_dir)
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=f"did not reach t_final within max_steps={budget}",
  ):
    served.run(_request(support, labels, query))


# Checkpoints, preemption and the run lock.

# Tiny Omniglot runs: Conv-4, 5-way 1-shot, 4 episodes a step; checkpoints
# every 2 steps, 3 kept; validation every 4 steps.
_TINY_RUN = {
  "data.ways": 5,
  "data.shots": 1,
  "data.queries": 5,
  "data.meta_batch_size": 4,
  "schedule.validation_episodes": 10,
  "schedule.log_every": 2,
  "schedule.checkpoint_every": 2,
  "schedule.validate_every": 4,
  "schedule.keep_checkpoints": 3,
  "run.seed": 3,
}


def _train(model_dir, steps):
  return training.train(
    training.make_config({**_TINY_RUN, "schedule.steps": steps}),
    str(model_dir),
    progress=False,
  )


def _steps_on_disk(model_dir):
  return sorted(
    int(path.name[len("ckpt-") : -len(".index")])
    for path in pathlib.Path(model_dir).glob("ckpt-*.index")
  )


def _values(prefix):
  values = cli_helpers.checkpoint_values(prefix)
  values.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE")
  return values


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """model_dir of a tiny run of 10 steps, and one stopped at 8."""
  reference = tmp_path_factory.mktemp("reference") / "run"
  _train(reference, 10)
  stopped = tmp_path_factory.mktemp("stopped") / "run"
  _train(stopped, 8)
  assert _steps_on_disk(stopped) == [4, 6, 8]
  return reference, stopped


def _damage(model_dir, how):
  if how == "deleted index":
    (model_dir / "ckpt-8.index").unlink()
    return "ckpt-8.index is missing"
  if how == "deleted state file":
    (model_dir / "checkpoint").unlink()
    return None
  if how == "truncated data":
    [data_file] = model_dir.glob("ckpt-8.data-*")
    data_file.write_bytes(data_file.read_bytes()[:100])
    return "ckpt-8.{index,data-*} cannot be read"
  raise ValueError(how)


@pytest.mark.parametrize(
  "how", ["deleted index", "deleted state file", "truncated data"]
)
def test_a_damaged_latest_checkpoint_falls_back_and_loses_nothing(
  tmp_path, uninterrupted, how, caplog
):
  reference, stopped = uninterrupted
  model_dir = tmp_path / "run"
  shutil.copytree(stopped, model_dir)
  best_before = _values(training.checkpoint_path(str(model_dir), "best"))
  damaged = _damage(model_dir, how)
  with caplog.at_level("INFO"):
    _train(model_dir, 10)
  resumed_from = 8 if damaged is None else 6
  assert f"Resumed from {model_dir}/ckpt-{resumed_from}" in caplog.text
  if damaged is not None:
    assert damaged in caplog.text
    assert list(model_dir.glob("ckpt-8.*.damaged"))
  # Every checkpoint an uninterrupted run keeps, with its values: nothing
  # restarted from step 0, no intact checkpoint deleted for a damaged one.
  assert _steps_on_disk(model_dir) == _steps_on_disk(reference) == [6, 8, 10]
  for step in (6, 8, 10):
    cli_helpers.assert_same_values(
      _values(model_dir / f"ckpt-{step}"), _values(reference / f"ckpt-{step}")
    )
  best = training.checkpoint_path(str(model_dir), "best")
  cli_helpers.assert_same_values(
    _values(best), _values(training.checkpoint_path(str(reference), "best"))
  )
  assert (
    _values(best)["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
    >= best_before["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
  )


def test_no_intact_checkpoint_stops_with_a_clear_error(tmp_path, uninterrupted):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  for index in model_dir.glob("ckpt-*.index"):
    index.unlink()
  with pytest.raises(
    training.ConfigError,
    match="No intact checkpoint .*/ckpt-8.index is missing",
  ):
    _train(model_dir, 10)
  # Nothing was trained from step 0 over the damaged run, and a rerun
  # stops again: the damaged files are left where they were.
  assert not list(model_dir.glob("ckpt-*.index"))
  assert len(list(model_dir.glob("ckpt-*.data-*"))) == 3
  with pytest.raises(training.ConfigError, match="No intact checkpoint"):
    _train(model_dir, 10)


def test_after_a_fallback_the_best_checkpoint_keeps_its_record(
  tmp_path, uninterrupted
):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  # A best model better than anything this run will reach again.
  best = tf.train.CheckpointManager(
    tf.train.Checkpoint(best_accuracy=tf.Variable(0.99)),
    str(model_dir / "best"),
    max_to_keep=1,
  )
  best_path = best.save(checkpoint_number=8)
  (model_dir / "ckpt-8.index").unlink()
  result = _train(model_dir, 10)
  assert result["best_accuracy"] == pytest.approx(0.99)
  # Validations at 8 and 10 were worse: best/ still holds that model.
  assert training.checkpoint_path(str(model_dir), "best") == best_path
  assert _values(model_dir / "ckpt-10")[
    "best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"
  ] == pytest.approx(0.99)


def _files(directory):
  return {
    path.name: path.read_bytes()
    for path in pathlib.Path(directory).iterdir()
    if path.is_file()
  }


def test_a_best_checkpoint_without_latest_ones_is_never_trained_over(
  tmp_path, uninterrupted
):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], model_dir)
  for path in model_dir.glob("ckpt-*"):
    path.unlink()
  (model_dir / "checkpoint").unlink()
  best_before = _files(model_dir / "best")
  best = training.checkpoint_path(str(model_dir), "best")
  recorded = _values(best)["best_accuracy/.ATTRIBUTES/VARIABLE_VALUE"]
  with pytest.raises(
    training.ConfigError,
    match=(
      rf"holds a best checkpoint \({re.escape(best)}, validation accuracy "
      rf"{recorded:.4f}\) but no checkpoint to resume from.* delete "
      rf"'{re.escape(str(model_dir / 'best'))}' or use a new --model_dir"
    ),
  ):
    _train(model_dir, 10)
  assert _files(model_dir / "best") == best_before
  assert not list(model_dir.glob("ckpt-*"))


class _Killed(Exception):
  """Stands for a SIGKILL at a given point of the loop."""


def test_a_run_killed_after_its_first_best_save_can_resume(
  tmp_path, monkeypatch
):
  # Validation at step 2, checkpoints every 4: the first best model comes
  # before the first checkpoint is due.
  config = training.make_config(
    {
      **_TINY_RUN,
      "schedule.steps": 3,
      "schedule.validate_every": 2,
      "schedule.checkpoint_every": 4,
    }
  )
  model_dir = tmp_path / "run"
  save = tf.train.CheckpointManager.save

  def die_once_best_is_saved(manager, *args, **kwargs):
    path = save(manager, *args, **kwargs)
    if os.path.basename(manager.directory) == "best":
      raise _Killed
    return path

  monkeypatch.setattr(
    tf.train.CheckpointManager, "save", die_once_best_is_saved
  )
  with pytest.raises(_Killed):
    training.train(config, str(model_dir), progress=False)
  monkeypatch.undo()
  assert (
    training.checkpoint_step(training.checkpoint_path(str(model_dir), "best"))
    == 2
  )
  # A checkpoint to resume from was saved with the best model.
  assert (
    training.checkpoint_step(training.checkpoint_path(str(model_dir), "latest"))
    == 2
  )
  assert training.train(config, str(model_dir), progress=False)["step"] == 3
  assert _steps_on_disk(model_dir) == [2, 3]


# A training whose checkpoint of step 2 finds the disk full: the save
# leaves a data file cut short, as a full disk does, and fails as
# TensorFlow's file system reports ENOSPC.
_DISK_FULL_SCRIPT = """
import os
import sys

from absl import app
import tensorflow as tf

save = tf.train.CheckpointManager.save


def save_on_a_full_disk(self, checkpoint_number=None, **kwargs):
  if checkpoint_number != 2:
    return save(self, checkpoint_number=checkpoint_number, **kwargs)
  prefix = os.path.join(self.directory, "ckpt-2")
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.write(bytes(100))
  raise tf.errors.ResourceExhaustedError(
      None, None, prefix + ".data-00000-of-00001; No space left on device")


tf.train.CheckpointManager.save = save_on_a_full_disk
from launch import train

app.run(train.main, flags_parser=train._parse_flags, argv=sys.argv)
"""


def test_a_full_disk_while_checkpointing_is_one_line_and_a_rerun_resumes(
  tmp_path,
):
  model_dir = tmp_path / "run"
  args = _tiny_cli_args(model_dir, 3, "--config.schedule.checkpoint_every=1")
  full = subprocess.run(
    [sys.executable, "-c", _DISK_FULL_SCRIPT, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    check=False,
  )
  assert full.returncode == 1, full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  [line] = [
    line for line in full.stderr.splitlines() if line.startswith("error:")
  ]
  assert line.startswith(
    f"error: Disk full at {model_dir}: the checkpoint of step 2 could not "
    f"be written ("
  ), line
  assert line.endswith(
    "Free space and rerun with the same --model_dir: training resumes from "
    "the last intact checkpoint."
  ), line
  assert cli_helpers.latest_step(model_dir) == 1

  rerun = cli_helpers.run("launch.train", args, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed from {model_dir}/ckpt-1 (step 1)" in rerun.stderr
  assert list(model_dir.glob("ckpt-2.data-*.damaged"))
  assert cli_helpers.latest_step(model_dir) == 3


def _tiny_cli_args(model_dir, steps, *extra):
  return (
    (f"--model_dir={model_dir}",)
    + cli_helpers.TINY_ARGS
    + (
      f"--config.schedule.steps={steps}",
      "--config.schedule.log_every=1",
      "--config.schedule.validate_every=0",
      "--config.run.seed=3",
    )
    + extra
  )


def test_sigterm_saves_the_current_step_and_exits_with_a_message(
  tmp_path, processes
):
  model_dir = tmp_path / "run"
  # Checkpoints only at the end: the one SIGTERM writes is the only one.
  run = processes.start(
    "run",
    "launch.train",
    _tiny_cli_args(model_dir, 1000, "--config.schedule.checkpoint_every=1000"),
  )
  cli_helpers.wait_until(
    lambda: "Step 3/1000" in processes.log(run), timeout=240, processes=[run]
  )
  assert cli_helpers.latest_step(model_dir) == -1
  run.send_signal(signal.SIGTERM)
  assert processes.wait(run, 120) != 0
  log = processes.log(run)
  match = re.search(
    r"Stopped by SIGTERM at step (\d+)/1000; saved (\S+)\. "
    r"Run the same command again to resume\.",
    log,
  )
  assert match, log[-3000:]
  step = int(match.group(1))
  assert step >= 3 and match.group(2) == f"{model_dir}/ckpt-{step}"
  assert cli_helpers.latest_step(model_dir) == step
  assert training.checkpoint_step(str(model_dir / f"ckpt-{step}")) == step
  assert "Traceback" not in log
  assert not (model_dir / ".lock").exists()


def test_a_second_training_is_refused_and_a_stale_lock_taken_over(
  tmp_path, processes
):
  model_dir = tmp_path / "run"
  first = processes.start(
    "first",
    "launch.train",
    _tiny_cli_args(model_dir, 1000, "--config.schedule.checkpoint_every=2"),
  )
  cli_helpers.wait_until(
    lambda: cli_helpers.latest_step(model_dir) >= 2,
    timeout=240,
    processes=[first],
  )
  lock = json.loads((model_dir / ".lock").read_text())
  assert lock["pid"] == first.pid
  config = (model_dir / "config.json").read_text()
  second = cli_helpers.run(
    "launch.train",
    _tiny_cli_args(model_dir, 1000, "--config.schedule.checkpoint_every=2"),
    timeout=120,
  )
  assert second.returncode != 0
  assert (
    f"is in use by another training (pid {first.pid} on host {lock['host']}"
  ) in second.stderr
  assert "Traceback" not in second.stderr
  assert (model_dir / "config.json").read_text() == config
  # A crash leaves the lock behind; the next training takes it over.
  first.send_signal(signal.SIGKILL)
  processes.wait(first, 30)
  assert json.loads((model_dir / ".lock").read_text())["pid"] == first.pid
  third = cli_helpers.run(
    "launch.train",
    _tiny_cli_args(model_dir, 2, "--config.schedule.checkpoint_every=2"),
    timeout=240,
  )
  assert third.returncode == 0, third.stderr[-3000:]
  assert "Taking over the stale lock" in third.stderr
  assert not (model_dir / ".lock").exists()


def test_lock_of_a_live_process_on_another_host_is_respected(tmp_path):
  (tmp_path / ".lock").write_text(
    json.dumps({"host": "elsewhere.example", "pid": 1, "start": None})
  )
  with pytest.raises(
    training.ConfigError,
    match="in use by another training .pid 1 on host elsewhere.example",
  ):
    with _checkpoints.RunLock(str(tmp_path)):
      pass
  # The same record on this host, of a process that is gone: stale.
  (tmp_path / ".lock").write_text(
    json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "start": None})
  )
  with _checkpoints.RunLock(str(tmp_path)) as taken:
    assert json.loads(pathlib.Path(taken.path).read_text())["pid"] == (
      os.getpid()
    )
  assert not (tmp_path / ".lock").exists()


# Processes forked at once take over a stale lock: each writes "won" (and
# holds the lock until every taker has tried) or "lost". Prints the
# outcomes of each race.
_LOCK_RACE_SCRIPT = """
import json
import os
import socket
import sys
import time

from comln_tf.training import _checkpoints
from comln_tf.training._config import ConfigError


def write(results, index, outcome):
  path = os.path.join(results, str(index))
  with open(path + ".tmp", "w") as f:
    f.write(outcome)
  os.replace(path + ".tmp", path)


def taker(directory, results, index, takers, start):
  time.sleep(max(0.0, start - time.time()))
  try:
    with _checkpoints.RunLock(directory):
      write(results, index, "won")
      deadline = time.time() + 60
      while len(os.listdir(results)) < takers and time.time() < deadline:
        time.sleep(0.01)
  except ConfigError as error:
    lost = "in use by another training" in str(error)
    write(results, index, "lost" if lost else f"error: {error}")


def race(directory, takers):
  os.makedirs(directory)
  with open(os.path.join(directory, _checkpoints.LOCK_FILE), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": 2**22 + 1}, f)
  results = os.path.join(directory, "results")
  os.makedirs(results)
  start = time.time() + 0.3
  children = []
  for index in range(takers):
    pid = os.fork()
    if pid == 0:
      try:
        taker(directory, results, index, takers, start)
      finally:
        os._exit(0)
    children.append(pid)
  for pid in children:
    os.waitpid(pid, 0)
  return sorted(
    open(os.path.join(results, name)).read() for name in os.listdir(results)
  )


base, races, takers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(json.dumps([race(os.path.join(base, str(i)), takers)
                  for i in range(races)]))
"""


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_processes(
  tmp_path,
):
  races, takers = 5, 12
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _LOCK_RACE_SCRIPT,
      str(tmp_path),
      str(races),
      str(takers),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  assert outcomes == [["lost"] * (takers - 1) + ["won"]] * races, outcomes
  for index in range(races):
    assert not (tmp_path / str(index) / ".lock").exists()


def test_unusable_model_dir_and_export_base_give_one_line_errors(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = cli_helpers.run(
    "launch.train", _tiny_cli_args(blocker / "run", 2), timeout=120
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  [line] = [
    line for line in result.stderr.splitlines() if line.startswith("error:")
  ]
  assert f"{blocker / 'run'} cannot be used: Not a directory" in line

  config = training.make_config({"data.example_shape": [28, 28, 1]})
  model_dir = tmp_path / "run"
  training.save_config(str(model_dir), config)
  training.make_checkpoint(
    training.build_model(config), step=tf.Variable(1, dtype=tf.int64)
  ).save(str(model_dir / "ckpt"))
  result = cli_helpers.run(
    "export.export_model",
    [f"--model_dir={model_dir}", f"--export_base={blocker}"],
    timeout=240,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert (
    f"export_model: export_base '{blocker}' is a file, not a directory"
  ) in result.stderr


# Evaluation outputs and the Omniglot cache.


def test_evaluations_on_other_episodes_get_their_own_result_file():
  standard = training_evaluate.default_output("run", "best", "test", 5, 1, 15)
  names = {standard}
  for options in (
    {"seed": 1},
    {"num_episodes": 100},
    {"seed": 1, "num_episodes": 100},
  ):
    name = training_evaluate.default_output(
      "run", "best", "test", 5, 1, 15, **options
    )
    assert name not in names, options
    names.add(name)
  assert standard == "run/evaluation_test_best_5w1s15q.json"
  assert (
    training_evaluate.default_output(
      "run", "best", "test", 5, 1, 15, seed=1, num_episodes=100
    )
    == "run/evaluation_test_best_5w1s15q_seed1_100ep.json"
  )


def test_omniglot_cache_is_keyed_by_its_source_and_checked(tmp_path, caplog):
  cache_dir = tmp_path / "cache"
  _sources._omniglot_arrays.cache_clear()  # pylint: disable=protected-access
  built = data.load_splits("omniglot", cache_dir=cache_dir)
  [cache_file] = cache_dir.glob("omniglot-*.npz")
  source = os.path.realpath(os.environ["TFDS_DATA_DIR"])
  assert hashlib.sha256(source.encode()).hexdigest()[:12] in cache_file.name
  # Another data directory never reads this cache: an empty one fails.
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(
    ValueError, match=f"'{empty}'.* holds no prepared TFDS 'omniglot' dataset"
  ):
    data.load_splits("omniglot", data_dir=empty, cache_dir=cache_dir)

  def damage_and_reload(damage):
    damage()
    _sources._omniglot_arrays.cache_clear()  # pylint: disable=protected-access
    caplog.clear()
    with caplog.at_level("WARNING"):
      reloaded = data.load_splits("omniglot", cache_dir=cache_dir)
    assert f"The Omniglot cache {cache_file} is damaged" in caplog.text
    for a, b in zip(built, reloaded):
      assert a.class_names == b.class_names
      np.testing.assert_array_equal(a.images, b.images)

  def cut_short():
    with np.load(cache_file) as cached:
      arrays = dict(cached)
    arrays["train_images"] = arrays["train_images"][:100]
    np.savez(cache_file, **arrays)

  damage_and_reload(cut_short)
  damage_and_reload(
    lambda: cache_file.write_bytes(cache_file.read_bytes()[:1000])
  )
