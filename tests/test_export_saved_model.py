"""Tests of export/saved_model.py: an export's signatures and outputs.

Each export is served through the TF1 session loader (see export_helpers)
and its outputs compared with the in-process Keras model; the checks of
bad requests, other loaders (TFSMLayer, saved_model_cli, a process without
comln_tf) and the warmup requests are tested on the same two exports.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from comln_tf.layers import GradientFlowClassifier
from export import saved_model
from export import warmup
from export_helpers import IMAGE_SHAPE
from export_helpers import LABELS
from export_helpers import QUERY
from export_helpers import SUPPORT
from export_helpers import TASK
from export_helpers import TOLERANCE
from export_helpers import WAYS
from export_helpers import WEIGHTS
from export_helpers import assert_outputs
from export_helpers import built_model
from export_helpers import exported
from export_helpers import keras_logits
from export_helpers import random_task
from export_helpers import run
from export_helpers import run_python
from export_helpers import serve


def _export(tmp_path_factory, classifier):
  """(model, export dir, served session) of a model with `classifier`."""
  model = built_model(classifier)
  served, export_dir = exported(
    tmp_path_factory.mktemp("exports"), model, metadata={"source": "test"}
  )
  return model, export_dir, served


@pytest.fixture(scope="module")
def per_class(tmp_path_factory):
  """(model, export dir, served session) of a 5-way model, T = 2."""
  return _export(tmp_path_factory, GradientFlowClassifier(WAYS, initial_t=2.0))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  """Same with tied rows of W0: adapts to any number of ways."""
  return _export(
    tmp_path_factory, GradientFlowClassifier(initial_t=2.0, tie_init_rows=True)
  )


def _keras_weights(model, support, labels, num_ways=None):
  """In-process adapt: support embedded alone, plain solve. [N, d]."""
  embeddings = model.backbone(support[None])
  return model.classifier.adapt(
    embeddings, labels[None], training=False, num_ways=num_ways
  )[0].numpy()


def test_signatures(per_class):
  _, _, served = per_class
  signatures = {
    key: value
    for key, value in served.signatures.items()
    if not key.startswith("__")
  }
  assert set(signatures) == set(saved_model.SIGNATURES)
  float32, int64 = tf.float32.as_datatype_enum, tf.int64.as_datatype_enum
  expected = {
    "adapt_and_predict": (
      {
        "support_images": float32,
        "support_labels": int64,
        "query_images": float32,
      },
      {"logits": float32, "probabilities": float32, "classes": int64},
    ),
    "adapt": (
      {"support_images": float32, "support_labels": int64},
      {"weights": float32},
    ),
    "predict": (
      {"query_images": float32, "weights": float32},
      {"logits": float32, "probabilities": float32, "classes": int64},
    ),
    "embed": ({"images": float32}, {"embeddings": float32}),
  }
  expected["serving_default"] = expected["adapt_and_predict"]
  expected["adapt_and_predict_batch"] = expected["adapt_and_predict"]
  for key, (inputs, outputs) in expected.items():
    signature = signatures[key]
    assert {k: v.dtype for k, v in signature.inputs.items()} == inputs, key
    assert {k: v.dtype for k, v in signature.outputs.items()} == outputs, key


@pytest.mark.parametrize("shots,queries", [(1, 75), (3, 4)])
def test_adapt_and_predict_matches_keras(per_class, shots, queries):
  model, _, served = per_class
  support, labels, query = random_task(WAYS, shots, queries)
  logits = keras_logits(model, support, labels, query)
  for signature in ("serving_default", "adapt_and_predict"):
    outputs = serve(
      served,
      signature,
      support_images=support,
      support_labels=labels,
      query_images=query,
    )
    assert_outputs(outputs, logits)


def test_a_batch_of_tasks_is_served_as_each_task_alone(per_class, tied):
  for (model, _, served), ways in ((per_class, WAYS), (tied, 3)):
    tasks = [random_task(ways, 2, 6, seed) for seed in range(3)]
    outputs = serve(
      served,
      "adapt_and_predict_batch",
      support_images=np.stack([t[0] for t in tasks]),
      support_labels=np.stack([t[1] for t in tasks]),
      query_images=np.stack([t[2] for t in tasks]),
    )
    assert outputs["logits"].shape == (3, 6, ways)
    for i, task in enumerate(tasks):
      assert_outputs(
        {key: value[i] for key, value in outputs.items()},
        keras_logits(model, *task),
      )


def test_adapt_predict_embed_match_keras(per_class):
  model, _, served = per_class
  support, labels, query = random_task(WAYS, 2, 6)
  weights = serve(
    served, "adapt", support_images=support, support_labels=labels
  )["weights"]
  expected = _keras_weights(model, support, labels)
  # The solve moved W from W0: a test that T and the flow are exported.
  assert np.abs(expected - model.classifier.init_weights.numpy()).max() > 0.1
  np.testing.assert_allclose(weights, expected, atol=TOLERANCE)
  query_embeddings = model.backbone(query[None])[0].numpy()
  assert_outputs(
    serve(served, "predict", query_images=query, weights=weights),
    query_embeddings @ weights.T,
  )
  np.testing.assert_allclose(
    serve(served, "embed", images=query)["embeddings"],
    query_embeddings,
    atol=TOLERANCE,
  )


@pytest.mark.parametrize("ways", [2, 3, 7])
def test_tied_rows_adapt_to_any_number_of_ways(tied, ways):
  model, _, served = tied
  support, labels, query = random_task(ways, 2, 5)
  embeddings = model.backbone(np.concatenate([support, query])[None])
  weights = model.classifier.adapt(
    embeddings[:, : len(labels)], labels[None], training=False, num_ways=ways
  )
  logits = model.classifier.logits(embeddings[:, len(labels) :], weights)[
    0
  ].numpy()
  assert logits.shape == (5, ways)
  assert_outputs(
    serve(
      served,
      "serving_default",
      support_images=support,
      support_labels=labels,
      query_images=query,
    ),
    logits,
  )
  adapted = serve(
    served, "adapt", support_images=support, support_labels=labels
  )["weights"]
  np.testing.assert_allclose(
    adapted,
    _keras_weights(model, support, labels, num_ways=ways),
    atol=TOLERANCE,
  )
  predicted = serve(served, "predict", query_images=query, weights=adapted)
  assert predicted["logits"].shape == (5, ways)


def test_tied_rows_trained_ways_match_keras_model(tied):
  model, _, served = tied
  support, labels, query = random_task(WAYS, 1, 10)
  logits = keras_logits(model, support, labels, query)
  assert_outputs(
    serve(
      served,
      "serving_default",
      support_images=support,
      support_labels=labels,
      query_images=query,
    ),
    logits,
  )


def _with(array, index, value):
  array = array.copy()
  array[index] = value
  return array


_PER_CLASS_ERRORS = [
  (
    "serving_default",
    {"support_images": np.zeros((5, 32, 32, 1), np.float32)},
    r"support_images must have shape \[M, 28, 28, 1\]; got shape\] "
    r"\[5 32 32 1\]",
  ),
  (
    "serving_default",
    {"query_images": np.zeros((4, 28, 28, 3), np.float32)},
    r"query_images must have shape \[Q, 28, 28, 1\]",
  ),
  (
    "serving_default",
    {
      "support_images": np.zeros((0,) + IMAGE_SHAPE, np.float32),
      "support_labels": np.zeros([0], np.int64),
    },
    "support_images is empty",
  ),
  (
    "serving_default",
    {"query_images": np.zeros((0,) + IMAGE_SHAPE, np.float32)},
    "query_images is empty",
  ),
  (
    "serving_default",
    {"support_labels": np.array([0, 1, 2, 3, 5])},
    r"support_labels must be in \[0, 5\); got values in\] \[0\] \[5\]",
  ),
  (
    "adapt",
    {"support_labels": np.array([0, 1, -2, 3, 4])},
    r"support_labels must be in \[0, 5\)",
  ),
  (
    "serving_default",
    {"support_labels": np.array([0, 1, 2, 3, 1])},
    r"every class 0..N-1 must appear in support_labels; N =\] \[5\] "
    r"\[missing classes:\] \[4\]",
  ),
  (
    "adapt",
    {"support_labels": np.array([0, 1, 2, 3])},
    r"support_labels must have shape \[M\]",
  ),
  (
    "serving_default",
    {"support_images": _with(SUPPORT, (2, 3, 4), np.nan)},
    "support_images must be finite",
  ),
  (
    "serving_default",
    {"query_images": _with(QUERY, (1, 5, 6), np.inf)},
    "query_images must be finite",
  ),
  (
    "predict",
    {"weights": np.ones((4, 8), np.float32)},
    r"weights must have shape \[N, 8\] with N = 5",
  ),
  (
    "predict",
    {"weights": np.ones((5, 9), np.float32)},
    r"weights must have shape \[N, 8\]",
  ),
  (
    "predict",
    {"weights": _with(WEIGHTS, (0, 0), np.nan)},
    "weights must be finite",
  ),
  (
    "embed",
    {"images": np.zeros((3, 28, 28, 2), np.float32)},
    r"images must have shape \[n, 28, 28, 1\]",
  ),
]

_BATCH = {key: np.stack([value, value]) for key, value in TASK.items()}

_BATCH_ERRORS = [
  (
    {"support_images": np.zeros((2, 5, 32, 32, 1), np.float32)},
    r"support_images must have shape \[B, M, 28, 28, 1\]",
  ),
  (
    {"query_images": np.zeros((2, 0) + IMAGE_SHAPE, np.float32)},
    "query_images is empty: send at least one example and one task",
  ),
  (
    {"query_images": _BATCH["query_images"][:1]},
    "support_images and query_images must hold the same number of tasks B",
  ),
  (
    {"support_labels": _BATCH["support_labels"][:, :4]},
    r"support_labels must have shape \[B, M\], as support_images",
  ),
  (
    {"support_labels": np.stack([LABELS, np.array([0, 1, 2, 3, 3])])},
    r"every class 0..N-1 must appear in support_labels of every task; N =\] "
    r"\[5\] \[missing \(task, class\):\] \[\[1 4\]\]",
  ),
  (
    {"query_images": _with(_BATCH["query_images"], (1, 2, 5, 6), 1.5)},
    r"query_images must hold pixels in \[0, 1\]",
  ),
]


@pytest.mark.parametrize("changes,message", _BATCH_ERRORS)
def test_invalid_batch_requests(per_class, changes, message):
  served = per_class[2]
  served.run(warmup.predict_request("adapt_and_predict_batch", _BATCH))
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    served.run(
      warmup.predict_request("adapt_and_predict_batch", {**_BATCH, **changes})
    )


_TIED_ERRORS = [
  (
    "serving_default",
    {"support_labels": np.zeros(5, np.int64)},
    r"at least 2 classes 0..N-1; got N =\] \[1\]",
  ),
  (
    "serving_default",
    {"support_labels": np.array([0, 1, 2, 3, 10**12])},
    r"N = max\(support_labels\) \+ 1 <= M",
  ),
  (
    "adapt",
    {"support_labels": np.array([0, 1, 3, 3, 1])},
    r"every class 0..N-1 must appear in support_labels; N =\] \[4\] "
    r"\[missing classes:\] \[2\]",
  ),
  (
    "serving_default",
    {"support_labels": np.array([0, 1, -1, 2, 3])},
    r"support_labels must be >= 0",
  ),
  (
    "predict",
    {"weights": np.ones((1, 8), np.float32)},
    r"weights must have shape \[N, 8\] with N >= 2",
  ),
]


def _bad_request(signature, changes):
  """A request that is valid except for `changes`."""
  keys = {
    "serving_default": TASK,
    "adapt": ("support_images", "support_labels"),
    "predict": ("query_images", "weights"),
    "embed": ("images",),
  }[signature]
  valid = {**TASK, "weights": WEIGHTS, "images": QUERY}
  return warmup.predict_request(
    signature, {key: changes.get(key, valid[key]) for key in keys}
  )


@pytest.mark.parametrize("signature,changes,message", _PER_CLASS_ERRORS)
def test_invalid_requests(per_class, signature, changes, message):
  served = per_class[2]
  served.run(_bad_request(signature, {}))  # valid without the change
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    served.run(_bad_request(signature, changes))


@pytest.mark.parametrize("signature,changes,message", _TIED_ERRORS)
def test_invalid_requests_tied_rows(tied, signature, changes, message):
  served = tied[2]
  served.run(_bad_request(signature, {}))
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    served.run(_bad_request(signature, changes))


@pytest.mark.parametrize("which", ["per_class", "tied"])
def test_warmup_requests_replay(request, which):
  _, export_dir, served = request.getfixturevalue(which)
  requests = warmup.read(export_dir)
  signatures = [r.model_spec.signature_name for r in requests]
  assert set(signatures) == {
    "serving_default",
    "adapt_and_predict_batch",
    "adapt",
    "predict",
    "embed",
  }
  ways = set()
  for r in requests:
    assert r.model_spec.name == "comln"
    outputs = served.run(r)
    for value in outputs.values():
      assert np.all(np.isfinite(value))
    if r.model_spec.signature_name == "serving_default":
      num_ways = len(set(tf.make_ndarray(r.inputs["support_labels"])))
      # 15 queries a class, as in the benchmark's requests.
      assert outputs["logits"].shape == (15 * num_ways, num_ways)
      ways.add(num_ways)
  assert ways == ({3, WAYS} if which == "tied" else {WAYS})


def test_metadata(per_class, tied):
  for (_, export_dir, _), tie in ((per_class, False), (tied, True)):
    path = os.path.join(export_dir, "assets.extra", saved_model.METADATA_FILE)
    with open(path) as f:
      info = json.load(f)
    assert info["example_shape"] == list(IMAGE_SHAPE)
    assert info["num_ways"] == (None if tie else WAYS)
    assert info["tie_init_rows"] is tie
    assert info["embedding_size"] == 8
    assert info["t_final"] == pytest.approx(2.0)
    assert info["source"] == "test"


def test_tfsm_layer_reload(per_class):
  model, export_dir, _ = per_class
  support, labels, query = random_task(WAYS, 1, 6)
  embed = keras.layers.TFSMLayer(export_dir, call_endpoint="embed")
  np.testing.assert_allclose(
    embed(query)["embeddings"], model.backbone(query[None])[0], atol=TOLERANCE
  )
  adapt_and_predict = keras.layers.TFSMLayer(
    export_dir, call_endpoint="adapt_and_predict"
  )
  outputs = adapt_and_predict(
    support, support_labels=labels, query_images=query
  )
  logits = keras_logits(model, support, labels, query)
  np.testing.assert_allclose(outputs["logits"], logits, atol=TOLERANCE)


def test_export_dir_has_no_temporary_folder(per_class):
  base = os.path.dirname(per_class[1])
  assert os.listdir(base) == ["1"]
  assert os.path.isfile(os.path.join(base, "1", "saved_model.pb"))


@pytest.mark.slow
def test_serves_without_comln_tf(per_class, tmp_path):
  model, export_dir, _ = per_class
  support, labels, query = random_task(WAYS, 1, 6)
  np.savez(
    tmp_path / "task.npz",
    support_images=support,
    support_labels=labels,
    query_images=query,
  )
  result = run_python(
    f"""
      import json, sys
      import numpy as np
      import tensorflow as tf
      task = np.load("task.npz")
      with tf.compat.v1.Session(graph=tf.Graph()) as session:
        signature = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], {export_dir!r}).signature_def["serving_default"]
        served = session.run(signature.outputs["logits"].name, {{
            signature.inputs[key].name: task[key] for key in task.files}})
      loaded = tf.saved_model.load({export_dir!r})
      eager = loaded.signatures["serving_default"](
          **{{key: tf.constant(task[key]) for key in task.files}})["logits"]
      assert not any(name.split(".")[0] in ("comln_tf", "export")
                     for name in sys.modules), "imported project code"
      print(json.dumps([served.tolist(), eager.numpy().tolist()]))
      """,
    cwd=tmp_path,
  )
  served, eager = json.loads(result.stdout.strip().splitlines()[-1])
  logits = keras_logits(model, support, labels, query)
  np.testing.assert_allclose(served, logits, atol=TOLERANCE)
  np.testing.assert_allclose(eager, logits, atol=TOLERANCE)


@pytest.mark.slow
def test_saved_model_cli_run(per_class, tmp_path):
  model, export_dir, _ = per_class
  support, labels, query = random_task(WAYS, 1, 6)
  task = str(tmp_path / "task.npz")
  np.savez(
    task, support_images=support, support_labels=labels, query_images=query
  )
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  inputs = ";".join(
    f"{key}={task}[{key}]"
    for key in ("support_images", "support_labels", "query_images")
  )
  run(
    [
      cli,
      "run",
      "--dir",
      export_dir,
      "--tag_set",
      "serve",
      "--signature_def",
      "serving_default",
      "--inputs",
      inputs,
      "--outdir",
      str(tmp_path / "out"),
    ],
    tmp_path,
  )
  logits = keras_logits(model, support, labels, query)
  np.testing.assert_allclose(
    np.load(tmp_path / "out" / "logits.npy"), logits, atol=TOLERANCE
  )
  np.testing.assert_array_equal(
    np.load(tmp_path / "out" / "classes.npy"), logits.argmax(-1)
  )
