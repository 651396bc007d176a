"""Tests of comln_tf.model.COMLN: call, training, weight decay, saving."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN

WAYS, QUERIES = 5, 2


def _episodes(num_tasks, seed=0, noise=0.3, image_shape=(28, 28, 1)):
  """5-way 1-shot episodes: each class is a random prototype plus noise.

  Labels are permuted per task, so only adaptation to the support set
  classifies the queries.

  Returns:
    episode dict: support_images [num_tasks, 5, *image_shape], support_labels
    [num_tasks, 5], query_images [num_tasks, 10, *image_shape], query_labels
    [num_tasks, 10].
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.random((num_tasks, WAYS) + image_shape, dtype=np.float32)
  support_labels = np.stack([rng.permutation(WAYS) for _ in range(num_tasks)])
  query_labels = np.tile(np.arange(WAYS), (num_tasks, QUERIES))

  def draw(labels):
    index = labels.reshape(labels.shape + (1,) * len(image_shape))
    clean = np.take_along_axis(prototypes, index, axis=1)
    return clean + noise * rng.standard_normal(clean.shape, dtype=np.float32)

  return {
    "support_images": draw(support_labels),
    "support_labels": support_labels.astype(np.int32),
    "query_images": draw(query_labels),
    "query_labels": query_labels.astype(np.int32),
  }


def _conv4_model(**kwargs):
  return COMLN(
    backbones.Conv4(filters=8), GradientFlowClassifier(WAYS), **kwargs
  )


def test_call_shapes_and_joint_embedding():
  model = _conv4_model()
  episode = _episodes(2)
  logits, stats = model(episode, return_stats=True)
  assert tuple(logits.shape) == (2, WAYS * QUERIES, WAYS)
  assert int(stats.num_evals) > 0
  # By hand: embed support and query of each task together (the per-task
  # batch norm sees both), then the classifier layer's own call.
  images = np.concatenate(
    [episode["support_images"], episode["query_images"]], axis=1
  )
  embeddings = model.backbone(images).numpy()
  expected = model.classifier(
    embeddings[:, :WAYS], episode["support_labels"], embeddings[:, WAYS:]
  )
  np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-5)
  # Embedding queries apart from the support set would give other values.
  separate = np.concatenate(
    [
      model.backbone(episode["support_images"]),
      model.backbone(episode["query_images"]),
    ],
    axis=1,
  )
  assert not np.allclose(separate, embeddings, atol=1e-3)


@pytest.mark.slow
def test_fit_reduces_loss():
  keras.utils.set_random_seed(0)
  episodes = _episodes(4)
  dataset = tf.data.Dataset.from_tensor_slices(episodes).batch(2)
  model = _conv4_model(weight_decay=5e-4)
  model.compile(
    optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
  )
  # Built first: outside a strategy, Keras creates the model's and the
  # optimizer's variables in the first trace of a step, which is then
  # traced again.
  model.build({"support_images": (None, None, 28, 28, 1)})
  model.optimizer.build(model.trainable_variables)
  before = model.evaluate(dataset, return_dict=True, verbose=0)
  history = model.fit(dataset, epochs=3, shuffle=False, verbose=0).history
  after = model.evaluate(dataset, return_dict=True, verbose=0)
  assert set(history) == {"loss", "accuracy", "num_evals", "t_final"}
  assert after["loss"] < 0.5 * before["loss"]
  assert after["accuracy"] > before["accuracy"]
  assert after["num_evals"] > 0
  assert after["t_final"] == pytest.approx(model.classifier.t_final.numpy())
  # The logged loss is the mean query cross-entropy, recomputed here.
  logits = model.predict(dataset, verbose=0)
  labels = episodes["query_labels"]
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  cross_entropy = -np.take_along_axis(log_probs, labels[..., None], -1).mean()
  assert after["loss"] == pytest.approx(cross_entropy, rel=1e-4)


def _loss_and_gradients(model, episode):
  with tf.GradientTape() as tape:
    loss = COMLN.query_loss(
      episode["query_labels"], model(episode, training=True)
    )
  return loss, tape.gradient(loss, model.trainable_variables)


def test_gradients_reach_backbone_init_weights_and_tau():
  model = _conv4_model()
  episode = _episodes(2)
  model(episode)
  _, gradients = _loss_and_gradients(model, episode)
  named = {v.path: g for v, g in zip(model.trainable_variables, gradients)}
  backbone_paths = {v.path for v in model.backbone.trainable_variables}
  assert len(backbone_paths) == 12  # 4 x (conv kernel, gamma, beta)
  assert set(named) == backbone_paths | {
    model.classifier.init_weights.path,
    model.classifier.log_t.path,
  }
  for path, gradient in named.items():
    assert gradient is not None, path
    assert np.all(np.isfinite(gradient)), path
    assert np.any(gradient.numpy() != 0), path


def test_tau_and_init_weights_gradients_match_finite_differences():
  rng = np.random.default_rng(1)
  episode = {
    "support_images": rng.standard_normal((2, 5, 6), np.float32),
    "support_labels": np.tile(np.arange(5, dtype=np.int32), (2, 1)),
    "query_images": rng.standard_normal((2, 4, 6), np.float32),
    "query_labels": rng.integers(0, 5, (2, 4)).astype(np.int32),
  }
  classifier = GradientFlowClassifier(5, initial_t=2.0, rtol=1e-7, atol=1e-7)
  model = COMLN("identity", classifier)
  model(episode)
  _, gradients = _loss_and_gradients(model, episode)
  gradient = dict(zip([v.path for v in model.trainable_variables], gradients))

  def loss_with(variable, delta, index=()):
    value = np.array(variable.numpy())
    shifted = value.copy()
    shifted[index] += delta
    variable.assign(shifted)
    loss = COMLN.query_loss(episode["query_labels"], model(episode)).numpy()
    variable.assign(value)
    return loss

  h = 1e-2
  for variable, index in (
    (classifier.log_t, ()),
    (classifier.init_weights, (1, 2)),
  ):
    numeric = (
      loss_with(variable, h, index) - loss_with(variable, -h, index)
    ) / (2 * h)
    analytic = gradient[variable.path].numpy()[index]
    assert analytic == pytest.approx(numeric, rel=5e-3, abs=1e-4)


def test_weight_decay_applies_to_all_but_tau():
  weight_decay, learning_rate = 0.1, 0.5
  model = COMLN(
    backbones.Conv4(filters=8),
    GradientFlowClassifier(WAYS, initial_t=2.0),
    weight_decay=weight_decay,
  )
  model.compile(optimizer=keras.optimizers.SGD(learning_rate))
  episode = _episodes(2)
  model(episode)
  _, gradients = _loss_and_gradients(model, episode)
  before = [v.numpy() for v in model.trainable_variables]
  model.train_step(episode)
  log_t_path = model.classifier.log_t.path
  # Decaying tau too would move it by this much: far above the tolerance.
  assert math.log(2.0) * weight_decay * learning_rate > 1e-2
  for variable, old, gradient in zip(
    model.trainable_variables, before, gradients
  ):
    decay = 0.0 if variable.path == log_t_path else weight_decay * old
    expected = old - learning_rate * (gradient.numpy() + decay)
    np.testing.assert_allclose(
      variable.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=variable.path
    )


def test_optimizer_weight_decay_is_refused():
  model = _conv4_model()
  model.compile(optimizer=keras.optimizers.AdamW(weight_decay=1e-4))
  dataset = tf.data.Dataset.from_tensors(_episodes(2))
  with pytest.raises(ValueError, match="weight_decay"):
    model.fit(dataset, shuffle=False, verbose=0)


def test_save_load_round_trip(tmp_path):
  model = COMLN(
    "conv4", GradientFlowClassifier(WAYS, initial_t=0.5), weight_decay=5e-4
  )
  model.compile(optimizer=keras.optimizers.SGD(0.1))
  episode = _episodes(2)
  model.train_step(episode)  # trained weights and T differ from the init
  path = str(tmp_path / "comln.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, COMLN)
  assert isinstance(loaded.backbone, backbones.Conv4)
  assert loaded.weight_decay == 5e-4
  assert loaded.classifier.get_config() == model.classifier.get_config()
  assert loaded.classifier.t_final.numpy() == model.classifier.t_final.numpy()
  np.testing.assert_array_equal(loaded(episode).numpy(), model(episode).numpy())
  assert isinstance(loaded.optimizer, keras.optimizers.SGD)


def test_bad_arguments():
  with pytest.raises(TypeError, match="GradientFlowClassifier"):
    COMLN("conv4", keras.layers.Dense(5))
  with pytest.raises(ValueError, match="known backbones"):
    COMLN("vgg", GradientFlowClassifier(WAYS))
  with pytest.raises(ValueError, match="weight_decay"):
    COMLN("conv4", GradientFlowClassifier(WAYS), weight_decay=-1.0)


_DYNAMIC_SPEC = [
  tf.TensorSpec([None, None, 8]),
  tf.TensorSpec([None, None], tf.int32),
  tf.TensorSpec([None, None, 8]),
]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_query_embeddings_are_refused(value):
  rng = np.random.default_rng(0)
  support = rng.normal(size=(2, 5, 8)).astype(np.float32)
  labels = np.tile(np.arange(WAYS, dtype=np.int32), (2, 1))
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
  bad = queries.copy()
  bad[1, 2, 4] = value
  layer = GradientFlowClassifier(WAYS)
  layer.build(support.shape)
  graph = tf.function(layer.__call__, input_signature=_DYNAMIC_SPEC)
  for call in (layer, graph):
    assert np.all(np.isfinite(call(support, labels, queries)))
    with pytest.raises(
      tf.errors.InvalidArgumentError, match="query_embeddings must be finite"
    ):
      call(support, labels, bad)
  # Under XLA, where assertions are compiled away: NaN logits, no class.
  compiled = tf.function(layer.__call__, jit_compile=True)
  logits = compiled(support, labels, bad).numpy()
  assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1, 2]))
  # The model: a NaN query image gives no logits either (Conv-4 would turn
  # it into huge finite embeddings, and the solve would run to max_steps).
  model = _conv4_model()
  episode = _episodes(2)
  model(episode)
  episode["query_images"][1, 3, 5, 5, 0] = value
  with pytest.raises(
    tf.errors.InvalidArgumentError, match="query_images must be finite"
  ):
    model(episode)


def test_accuracy_never_counts_non_finite_logits_as_a_class():
  labels = tf.constant([[0, 1, 0]])
  logits = tf.constant([[[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]])
  np.testing.assert_array_equal(
    COMLN.query_correct(labels, logits), [[1.0, 1.0, 1.0]]
  )
  # argmax of [nan, nan] is class 0, the right label of that query.
  nan_row = tf.tensor_scatter_nd_update(logits, [[0, 2]], [[np.nan, np.nan]])
  assert tf.argmax(nan_row[0, 2]).numpy() == 0
  correct = COMLN.query_correct(labels, nan_row).numpy()
  np.testing.assert_array_equal(correct[0, :2], [1.0, 1.0])
  assert np.isnan(correct[0, 2])
  # The metric the Keras train and test steps log.
  model = _conv4_model()
  _, stats = model(_episodes(1), return_stats=True)
  model.compile(optimizer="sgd")
  logs = model._update_metrics(  # pylint: disable=protected-access
    {"query_labels": labels}, nan_row, 0.0, stats
  )
  assert np.isnan(float(logs["accuracy"]))


# model.fit under MirroredStrategy on 2 logical CPUs, in a fresh process
# (logical devices must be set before TensorFlow initializes). Prints the
# single-device and mirrored updates of one SGD step and the error of an
# optimizer with clipnorm.
_MIRRORED_FIT_SCRIPT = """
import json
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
sys.path.insert(0, sys.argv[1])
from test_model import _conv4_model, _episodes

SHAPES = {"support_images": (None, None, 28, 28, 1)}

episodes = tf.data.Dataset.from_tensors(_episodes(4))
keras.utils.set_random_seed(0)
initial = _conv4_model()
initial.build(SHAPES)


def sgd_update(strategy, **optimizer_args):
  with strategy.scope():
    model = _conv4_model(weight_decay=0.05)
    model.build(SHAPES)
    model.set_weights(initial.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(0.1, **optimizer_args))
    # Built first, as in test_fit_reduces_loss.
    model.optimizer.build(model.trainable_variables)
  before = [v.numpy() for v in model.trainable_variables]
  model.fit(episodes, shuffle=False, verbose=0)
  return np.concatenate([(v.numpy() - b).ravel() for v, b in
                         zip(model.trainable_variables, before)])


single = sgd_update(tf.distribute.get_strategy())
mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
mirrored = sgd_update(mirrored_strategy)
try:
  sgd_update(mirrored_strategy, clipnorm=1.0)
  clip_error = None
except ValueError as error:
  clip_error = str(error)
print(json.dumps({"single": float(np.linalg.norm(single)),
                  "difference": float(np.linalg.norm(mirrored - single)),
                  "clip_error": clip_error}))
"""


def test_fit_under_mirrored_strategy_matches_one_device():
  # Each replica adapts to 2 of the 4 tasks; the optimizer sums the
  # replicas' parts. Without the 1/R in replica_gradients the mirrored
  # update would be twice the single-device one (and the L2 term, here
  # 0.05, counted twice).
  result = subprocess.run(
    [sys.executable, "-c", _MIRRORED_FIT_SCRIPT, os.path.dirname(__file__)],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  assert measured["single"] > 1e-2
  assert measured["difference"] <= 1e-4 * measured["single"], measured
  assert "clipnorm" in measured["clip_error"]
  assert "--clip_norm" in measured["clip_error"]
