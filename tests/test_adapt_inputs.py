"""The checks of `adapt`'s inputs (comln_tf/engine/_inputs.py).

Bad shapes, dtypes, labels and times are refused by name before any solver
step, eagerly, in tf.function and (as NaN) under XLA; zero tasks give an
empty result.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import REPO
import comln_tf
from references import make_problem


@pytest.fixture(scope="module")
def problem():
  return make_problem()


def _bad_input_cases():
  problem = make_problem()
  good = dict(
    init_weights=problem["init_weights"],
    support_embeddings=problem["support"],
    support_labels=problem["labels"],
    t_final=1.0,
  )
  nan_support = problem["support"].copy()
  nan_support[0, 0, 0] = np.nan
  out_of_range = problem["labels"].copy()
  out_of_range[1, 2] = 3
  return [
    (
      "M",
      dict(good, support_labels=problem["labels"][:, :5]),
      "number of support examples M",
    ),
    (
      "d",
      dict(good, init_weights=problem["init_weights"][:, :4]),
      "embedding size d",
    ),
    (
      "labels",
      dict(good, support_labels=out_of_range),
      "support_labels must lie in [0, N)",
    ),
    (
      "negative labels",
      dict(good, support_labels=-problem["labels"] - 1),
      "support_labels must lie in [0, N)",
    ),
    (
      "finite",
      dict(good, support_embeddings=nan_support),
      "support_embeddings and init_weights must be finite",
    ),
    ("time", dict(good, t_final=0.0), "t_final must be finite and > 0"),
    (
      "negative time",
      dict(good, t_final=-2.0),
      "t_final must be finite and > 0",
    ),
  ]


@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_bad_input_names_the_argument(case, mode):
  _, kwargs, message = case
  run = (
    comln_tf.adapt
    if mode == "eager"
    else tf.function(lambda **kw: comln_tf.adapt(**kw))
  )
  if mode == "function":
    kwargs = {k: tf.constant(v) for k, v in kwargs.items()}
  with pytest.raises(
    (ValueError, tf.errors.InvalidArgumentError),
    match=message.replace("[", r"\[").replace(")", r"\)"),
  ):
    run(**kwargs)


def test_bad_dtype_and_rank(problem):
  with pytest.raises(TypeError, match="support_embeddings must have the dtype"):
    comln_tf.adapt(
      problem["init_weights"],
      problem["support"].astype(np.float32),
      problem["labels"],
      1.0,
    )
  with pytest.raises(
    ValueError, match=r"init_weights must have shape \[N, d\]"
  ):
    comln_tf.adapt(
      problem["init_weights"][0], problem["support"], problem["labels"], 1.0
    )
  with pytest.raises(ValueError, match="t_final must be a scalar"):
    comln_tf.adapt(
      problem["init_weights"], problem["support"], problem["labels"], [1.0, 2.0]
    )


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
