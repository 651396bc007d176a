"""The Keras layer `comln_tf.layers.GradientFlowClassifier`.

Its adaptation against the engine and the W-space reference, its
serialisation, XLA compilation, and the checks of what it is called with.
"""

import numpy as np
import pytest
import tensorflow as tf

import comln_tf
from comln_tf.layers import GradientFlowClassifier
from references import make_problem
from references import w_space_solution

WAYS = 5

_X = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
_Y = np.tile(np.arange(5, dtype=np.int32), (2, 1))

_DYNAMIC_SPEC = [
  tf.TensorSpec([None, None, 8]),
  tf.TensorSpec([None, None], tf.int32),
  tf.TensorSpec([None, None, 8]),
]


def test_layer_matches_engine_and_serializes():
  problem = make_problem(seed=8)
  layer = GradientFlowClassifier(
    3, initial_t=1.3, rtol=1e-10, atol=1e-10, dtype="float64"
  )
  logits = layer(
    problem["support"], problem["labels"], problem["queries"], training=True
  )
  weights = w_space_solution(
    layer.init_weights.numpy(), problem["support"][0], problem["labels"][0], 1.3
  )
  np.testing.assert_allclose(
    logits[0].numpy(), problem["queries"][0] @ weights.T, atol=1e-8
  )
  clone = GradientFlowClassifier.from_config(layer.get_config())
  clone.build(problem["support"].shape)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(
    clone(problem["support"], problem["labels"], problem["queries"]).numpy(),
    logits.numpy(),
    atol=1e-8,
  )


def test_layer_refuses_jit_compile_with_backprop():
  with pytest.raises(
    ValueError, match='jit_compile=True needs method="forward"'
  ):
    GradientFlowClassifier(3, method="backprop", jit_compile=True)
  with pytest.raises(ValueError, match="jit_compile=True and tasks_per_solve"):
    GradientFlowClassifier(3, tasks_per_solve=2, jit_compile=True)


def test_layer_jit_compile_gives_the_same_gradients():
  problem = make_problem(seed=9)
  results = []
  for jit_compile in (False, True):
    layer = GradientFlowClassifier(3, dtype="float64", jit_compile=jit_compile)
    layer.build(problem["support"].shape)
    if results:
      layer.set_weights(results[0][2])
    with tf.GradientTape() as tape:
      logits = layer(
        problem["support"], problem["labels"], problem["queries"], training=True
      )
      loss = tf.reduce_sum(tf.sin(logits))
    grads = tape.gradient(loss, layer.trainable_variables)
    results.append(
      (logits.numpy(), [g.numpy() for g in grads], layer.get_weights())
    )
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-10)
  for a, b in zip(results[0][1], results[1][1]):
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_tied_rows_with_no_task_give_an_empty_result():
  # B = 0 tasks: an empty result, as the engine and a per-class layer give.
  support = np.zeros((0, 5, 8), np.float32)
  labels = np.zeros((0, 5), np.int32)
  queries = np.zeros((0, 3, 8), np.float32)
  per_class = GradientFlowClassifier(WAYS)
  per_class.build(support.shape)
  expected = per_class(support, labels, queries)
  assert expected.shape == (0, 3, WAYS)
  tied = GradientFlowClassifier(tie_init_rows=True)
  tied.build(support.shape)
  graph = tf.function(tied.__call__, input_signature=_DYNAMIC_SPEC)
  for call in (tied, graph):
    logits = call(support, labels, queries)
    assert logits.shape[:2] == (0, 3) and tf.size(logits) == 0
  # One task still needs its labels to be a task.
  rng = np.random.default_rng(0)
  with pytest.raises(tf.errors.InvalidArgumentError, match="every class"):
    tied(
      rng.normal(size=(1, 5, 8)).astype(np.float32),
      np.array([[0, 1, 3, 3, 1]], np.int32),
      rng.normal(size=(1, 3, 8)).astype(np.float32),
    )


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


def test_options_are_built_once_and_saved_by_name():
  layer = GradientFlowClassifier(
    3, solver="rk4", num_steps=7, max_steps=50, tasks_per_solve=2
  )
  assert layer.options == comln_tf.AdaptOptions(
    solver="rk4", num_steps=7, max_steps=50, tasks_per_solve=2
  )
  config = layer.get_config()
  for name in (
    "method",
    "solver",
    "rtol",
    "atol",
    "max_steps",
    "num_steps",
    "tasks_per_solve",
  ):
    assert config[name] == getattr(layer.options, name), name
    assert getattr(layer, name) == getattr(layer.options, name), name
  clone = GradientFlowClassifier.from_config(config)
  assert clone.options == layer.options
  with pytest.raises(AttributeError, match="fixed at construction"):
    layer.max_steps = 3


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_ways=1), "num_ways must be an integer >= 2"),
    (dict(initial_t=0.0), "initial_t must be a finite number > 0"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0.0, 1.0\)"),
    (dict(method=comln_tf.Forward()), "method must be one of"),
    (dict(solver="rk4"), "num_steps must be a positive integer"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    GradientFlowClassifier(**{"num_ways": 3, **kwargs})
