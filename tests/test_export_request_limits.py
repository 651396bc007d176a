"""Tests of export/saved_model.py: the bounds of a request's work.

Requests over the size limits, with pixels outside [0, 1], whose logits
overflow, or whose support set is too stiff for the serving step budget
are refused with errors naming the input, and quickly; the budget bounds
every solve.
"""

import os
import re
import time

import numpy as np
import pytest
import tensorflow as tf

from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from export import saved_model
from export import warmup
from export_helpers import IMAGE_SHAPE
from export_helpers import QUERY
from export_helpers import TASK
from export_helpers import WAYS
from export_helpers import WEIGHTS
from export_helpers import built_model
from export_helpers import exported
from export_helpers import five_way_model
from export_helpers import serve


@pytest.fixture(scope="module")
def per_class(tmp_path_factory):
  """(model, export dir, served session) of a 5-way model, T = 2."""
  model = five_way_model()
  served, export_dir = exported(tmp_path_factory.mktemp("exports"), model)
  return model, export_dir, served


def test_requests_over_the_size_limits_are_refused(per_class):
  _, export_dir, served = per_class
  info = saved_model.read_metadata(export_dir)
  max_support = info["max_serving_support"]
  max_queries = info["max_serving_queries"]
  rng = np.random.default_rng(0)
  queries = rng.random((max_queries + 1,) + IMAGE_SHAPE, np.float32)
  at_limit = serve(
    served, "serving_default", **{**TASK, "query_images": queries[:-1]}
  )
  assert at_limit["classes"].shape == (max_queries,)

  def refused(signature, name, count, limit, setting, **inputs):
    with pytest.raises(
      tf.errors.InvalidArgumentError,
      match=(
        rf"{name} holds too many examples for one request: at most "
        rf"{limit} \({re.escape(setting)}, fixed at export\); send them in "
        rf"several requests. Got {count} =\] \[{limit + 1}\]"
      ),
    ):
      serve(served, signature, **inputs)

  query_limit = (max_queries, "max_serving_queries")
  refused(
    "serving_default",
    "query_images",
    "Q",
    *query_limit,
    **{**TASK, "query_images": queries},
  )
  refused(
    "predict",
    "query_images",
    "Q",
    *query_limit,
    query_images=queries,
    weights=WEIGHTS,
  )
  # A batch of tasks is bounded in all: B Q = 7 x 143 = max_queries + 1.
  assert max_queries + 1 == 7 * 143
  refused(
    "adapt_and_predict_batch",
    "query_images",
    "Q x B",
    *query_limit,
    support_images=np.stack([TASK["support_images"]] * 7),
    support_labels=np.stack([TASK["support_labels"]] * 7),
    query_images=queries.reshape((7, 143) + IMAGE_SHAPE),
  )
  support = rng.random((max_support + 1,) + IMAGE_SHAPE, np.float32)
  labels = np.arange(max_support + 1) % WAYS
  refused(
    "adapt",
    "support_images",
    "M",
    max_support,
    "max_serving_support",
    support_images=support,
    support_labels=labels,
  )
  images = np.concatenate([support, queries])[: max_support + max_queries + 1]
  refused(
    "embed",
    "images",
    "n",
    max_support + max_queries,
    "max_serving_support + max_serving_queries",
    images=images,
  )


def test_limits_too_small_for_the_warmup_requests_are_refused(
  tmp_path, per_class
):
  model = per_class[0]
  export_dir = str(tmp_path / "1")
  # 5 ways: 15 queries and up to 5 support images a class.
  with pytest.raises(ValueError, match="25 support and 75 query images"):
    saved_model.export(model, export_dir, IMAGE_SHAPE, max_serving_queries=74)
  with pytest.raises(ValueError, match="max_serving_support=24"):
    saved_model.export(model, export_dir, IMAGE_SHAPE, max_serving_support=24)
  with pytest.raises(
    ValueError, match="max_serving_queries must be a positive integer"
  ):
    saved_model.export(model, export_dir, IMAGE_SHAPE, max_serving_queries=0)
  assert not os.path.exists(export_dir)


def test_non_finite_logits_are_refused_not_classified(per_class):
  _, _, served = per_class
  # Finite weights whose products with the (non-negative) embeddings
  # overflow: every logit +inf, whose argmax would be class 0.
  weights = np.full((WAYS, 8), 3e38, np.float32)
  embeddings = serve(served, "embed", images=QUERY)["embeddings"]
  with np.errstate(over="ignore"):
    logits = embeddings @ weights.T
  assert not np.all(np.isfinite(logits))
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match="the logits of the queries are not finite",
  ):
    serve(served, "predict", query_images=QUERY, weights=weights)


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
  per_class, which, scale
):
  served = per_class[2]
  support, labels, query = _image_task(shots=1)
  served.run(_request(support, labels, query))  # valid as it is
  inputs = {"support_images": support, "query_images": query}
  inputs[which] = inputs[which] * scale
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=rf"{which} must hold pixels in \[0, 1\]",
  ):
    served.run(
      _request(inputs["support_images"], labels, inputs["query_images"])
    )
  with pytest.raises(
    tf.errors.InvalidArgumentError, match=r"images must hold pixels in \[0, 1\]"
  ):
    served.run(warmup.predict_request("embed", {"images": inputs[which]}))


def test_a_bad_request_of_400_support_images_fails_within_a_second(
  per_class,
):
  served = per_class[2]
  support, labels, query = _image_task(shots=80)
  served.run(_request(*_image_task(shots=1)))  # warm
  for bad in (support * 255.0, support * 3e38):
    start = time.perf_counter()
    with pytest.raises(
      tf.errors.InvalidArgumentError,
      match=r"support_images must hold pixels in \[0, 1\]",
    ):
      served.run(_request(bad, labels, query))
    assert time.perf_counter() - start < 1.0


@pytest.fixture(scope="module")
def served_features(tmp_path_factory):
  """(served session, export dir) of a 5-way model on 16-d feature vectors
  (identity backbone), T = 2."""
  return exported(tmp_path_factory.mktemp("features"), _feature_model(), (16,))


def _feature_model():
  return built_model(
    GradientFlowClassifier(5, initial_t=2.0),
    (16,),
    backbones.get_backbone("identity"),
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
  assert saved_model.read_metadata(export_dir)["max_serving_steps"] == (
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
  model = _feature_model()
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
  served, _ = exported(tmp_path, model, (16,), max_serving_steps=budget)
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=f"did not reach t_final within max_steps={budget}",
  ):
    served.run(_request(support, labels, query))
