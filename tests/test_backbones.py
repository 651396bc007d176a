"""Tests of comln_tf.backbones: shapes, per-task batch norm, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from comln_tf import backbones

# Few channels keep the ResNet-12 tests fast; its structure is unchanged.
TINY_RESNET = dict(channels=(4, 6, 6, 8))


def _images(*shape, seed=0):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _embed(backbone, images, training=None):
  return backbone(images, training=training).numpy()


@pytest.mark.parametrize(
  "shape, d", [((2, 3, 28, 28, 1), 64), ((1, 2, 84, 84, 3), 1600)]
)
def test_conv4_embedding_size(shape, d):
  backbone = backbones.Conv4()
  assert _embed(backbone, _images(*shape)).shape == shape[:2] + (d,)
  assert backbone.compute_output_shape(shape) == shape[:2] + (d,)


def test_resnet12_embedding_size():
  backbone = backbones.ResNet12()
  assert _embed(backbone, _images(1, 2, 32, 32, 3)).shape == (1, 2, 640 * 2 * 2)
  # The paper's setting, by shape inference only (a forward pass is slow).
  assert backbone.compute_output_shape((None, 5, 84, 84, 3)) == (None, 5, 16000)
  pooled = backbones.ResNet12(global_pool=True)
  assert pooled.compute_output_shape((None, 5, 84, 84, 3)) == (None, 5, 640)


def test_global_pool_is_spatial_mean_of_feature_map():
  images = _images(2, 3, 32, 32, 3)
  flat = backbones.ResNet12(**TINY_RESNET)
  flat_out = _embed(flat, images)
  pooled = backbones.ResNet12(global_pool=True, **TINY_RESNET)
  pooled.build(images.shape)
  pooled.set_weights(flat.get_weights())
  # Flattening is channels last: [B, n, h * w * c] -> [B, n, h * w, c].
  expected = flat_out.reshape(2, 3, 2 * 2, 8).mean(axis=2)
  np.testing.assert_allclose(_embed(pooled, images), expected, atol=1e-5)


def test_conv4_last_block_pooling_options():
  # At 28x28 the fourth block's map is 3x3: its 2x2 max pooling (floor)
  # keeps the top-left 2x2 cells; without it the whole map is flattened or
  # averaged. The same weights in all three, checked against NumPy.
  images = _images(2, 3, 28, 28, 1)
  unpooled = backbones.Conv4(pool_last_block=False)
  feature_map = _embed(unpooled, images).reshape(2, 3, 3, 3, 64)
  for kwargs, expected in [
    ({}, feature_map[:, :, :2, :2].max(axis=(2, 3))),
    (
      dict(pool_last_block=False, global_pool=True),
      feature_map.mean(axis=(2, 3)),
    ),
  ]:
    backbone = backbones.Conv4(**kwargs)
    backbone.build(images.shape)
    backbone.set_weights(unpooled.get_weights())
    np.testing.assert_allclose(_embed(backbone, images), expected, atol=1e-5)
    assert backbone.compute_output_shape(images.shape) == (2, 3, 64)
  assert unpooled.compute_output_shape((None, 5, 28, 28, 1)) == (None, 5, 576)


def _strided_block_reference(images, kernel, gamma, beta, epsilon):
  """NumPy ConvBlock(stride=2, pool=False): conv, per-task norm, ReLU.

  A stride-2 'same' convolution is the stride-1 one sampled every second
  position, starting where TensorFlow's padding puts the first window: it
  pads (kernel - 1) - (size - 1) % 2 in all, the smaller half first, so an
  even size starts at 1 (no padding before) and an odd one at 0.
  """
  b, n, h, w, _ = images.shape
  padded = np.pad(images, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  full = sum(
    np.einsum(
      "bnhwc,cf->bnhwf", padded[:, :, i : i + h, j : j + w], kernel[i, j]
    )
    for i in range(3)
    for j in range(3)
  )
  conv = full[:, :, 1 - h % 2 :: 2, 1 - w % 2 :: 2]
  mean = conv.mean(axis=(1, 2, 3), keepdims=True)
  variance = conv.var(axis=(1, 2, 3), keepdims=True)
  normalized = (conv - mean) / np.sqrt(variance + epsilon) * gamma + beta
  return np.maximum(normalized, 0.0)


@pytest.mark.parametrize("size", [8, 7])
def test_strided_conv_block_matches_numpy(size):
  images = _images(2, 3, size, size, 2)
  block = backbones.ConvBlock(4, epsilon=1e-3, pool=False, stride=2)
  block.build(images.shape)
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, 4).astype(np.float32)
  beta = rng.normal(size=4).astype(np.float32)
  block.set_weights([kernel, gamma, beta])
  expected = _strided_block_reference(images, kernel, gamma, beta, 1e-3)
  half = (size + 1) // 2
  assert expected.shape == (2, 3, half, half, 4)
  np.testing.assert_allclose(block(images).numpy(), expected, atol=1e-4)
  assert block.compute_output_shape(images.shape) == expected.shape


def test_conv4_strided_is_mamls_omniglot_network():
  # MAML's Omniglot Conv-4: four stride-2 blocks, 28 -> 14 -> 7 -> 4 -> 2,
  # no pooling, then the mean of the 2x2 map (flattened: d = 2 * 2 * 64).
  images = _images(2, 3, 28, 28, 1)
  flat = backbones.Conv4(downsample="stride")
  flat_out = _embed(flat, images)
  assert flat_out.shape == (2, 3, 256)
  assert not any(block.pool for block in flat.blocks)
  assert [block.conv.strides for block in flat.blocks] == [(2, 2)] * 4
  mean = backbones.Conv4(downsample="stride", global_pool=True)
  mean.build(images.shape)
  mean.set_weights(flat.get_weights())
  np.testing.assert_allclose(
    _embed(mean, images), flat_out.reshape(2, 3, 4, 64).mean(axis=2), atol=1e-5
  )
  assert mean.compute_output_shape((None, 5, 28, 28, 1)) == (None, 5, 64)
  for kwargs, match in [
    (dict(downsample="avg_pool"), "downsample"),
    (dict(downsample="stride", pool_last_block=False), "pool_last_block"),
  ]:
    with pytest.raises(ValueError, match=match):
      backbones.Conv4(**kwargs)


@pytest.mark.parametrize(
  "make", [backbones.Conv4, lambda: backbones.ResNet12(**TINY_RESNET)]
)
def test_single_task_input(make):
  backbone = make()
  images = _images(1, 4, 28, 28, 3)
  batched = _embed(backbone, images)
  single = _embed(backbone, images[0])
  assert single.shape == batched.shape[1:]
  np.testing.assert_allclose(single, batched[0], atol=1e-5)
  assert backbone.compute_output_shape(images.shape[1:]) == batched.shape[1:]


def test_identity_returns_input():
  embeddings = _images(2, 5, 7)
  backbone = backbones.get_backbone("identity")
  np.testing.assert_array_equal(_embed(backbone, embeddings), embeddings)
  assert backbone.compute_output_shape((None, 5, 7)) == (None, 5, 7)


def test_task_batch_norm_matches_numpy():
  # Tasks with different means, so batch-wide statistics would differ.
  offsets = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1, 1)
  x = 3.0 * _images(3, 4, 5, 5, 2) + offsets
  layer = backbones.TaskBatchNormalization(epsilon=1e-3)
  layer.build(x.shape)
  gamma = np.array([0.5, 2.0], np.float32)
  beta = np.array([1.0, -1.0], np.float32)
  layer.set_weights([gamma, beta])
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = x.var(axis=(1, 2, 3), keepdims=True)
  expected = gamma * (x - mean) / np.sqrt(var + 1e-3) + beta
  for training in (True, False):
    np.testing.assert_allclose(
      _embed(layer, x, training), expected, rtol=1e-5, atol=1e-5
    )
  # One task at a time (the fused kernel) gives the same.
  for task in range(3):
    np.testing.assert_allclose(
      _embed(layer, x[task : task + 1]), expected[task : task + 1], atol=1e-5
    )


@pytest.mark.parametrize("tasks", [1, 3])
def test_task_batch_norm_gradients_match_the_closed_form(tasks):
  # One task takes the fused kernel, several the separate operations.
  x = 3.0 * _images(tasks, 6, 5, 5, 2) + 1.0
  weights = _images(*x.shape, seed=1) - 0.5  # loss = sum(weights * y)
  layer = backbones.TaskBatchNormalization(epsilon=1e-3)
  layer.build(x.shape)
  gamma = np.array([0.5, -2.0], np.float32)
  layer.set_weights([gamma, np.array([1.0, -1.0], np.float32)])
  inputs = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    loss = tf.reduce_sum(weights * layer(inputs))
  grads = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
  # y = gamma x_hat + beta, x_hat = (x - mean) / sigma over each task's
  # images and positions: dL/dx = gamma / sigma (w - mean(w) - x_hat
  # mean(w x_hat)).
  x64, w64 = x.astype(np.float64), weights.astype(np.float64)
  axes = (1, 2, 3)
  sigma = np.sqrt(x64.var(axis=axes, keepdims=True) + 1e-3)
  x_hat = (x64 - x64.mean(axis=axes, keepdims=True)) / sigma
  expected_x = (
    gamma
    / sigma
    * (
      w64
      - w64.mean(axis=axes, keepdims=True)
      - x_hat * (w64 * x_hat).mean(axis=axes, keepdims=True)
    )
  )
  np.testing.assert_allclose(grads[0], expected_x, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(
    grads[1], (w64 * x_hat).sum(axis=(0, 1, 2, 3)), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(grads[2], w64.sum(axis=(0, 1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize(
  "make", [backbones.Conv4, lambda: backbones.ResNet12(**TINY_RESNET)]
)
def test_normalization_is_per_task(make):
  backbone = make()
  images = _images(2, 4, 28, 28, 1)
  reference = _embed(backbone, images, training=True)
  # Task 2 replaced by very different images: task 1 must not move.
  changed = images.copy()
  changed[1] = 10.0 * _images(4, 28, 28, 1, seed=1) - 3.0
  out = _embed(backbone, changed, training=True)
  np.testing.assert_allclose(out[0], reference[0], atol=1e-5)
  assert not np.allclose(out[1], reference[1], atol=1e-3)
  # Task 1 alone gives the same embeddings, and so does evaluation mode.
  alone = _embed(backbone, images[:1], training=False)
  np.testing.assert_allclose(alone[0], reference[0], atol=1e-5)
  np.testing.assert_allclose(
    _embed(backbone, images, training=False), reference, atol=1e-5
  )
  # The statistics do come from the task: changing the other images of
  # task 1 changes the embedding of its first image.
  changed[0, 1:] = 5.0 * changed[0, 1:]
  out = _embed(backbone, changed)
  assert not np.allclose(out[0, 0], reference[0, 0], atol=1e-3)


@pytest.mark.parametrize(
  "name, kwargs, shape",
  [
    ("conv4", {}, (3, 28, 28, 1)),
    ("conv4", dict(global_pool=True, pool_last_block=False), (3, 28, 28, 1)),
    ("conv4", dict(global_pool=True, downsample="stride"), (3, 28, 28, 1)),
    ("resnet12", dict(global_pool=True, **TINY_RESNET), (3, 16, 16, 3)),
    ("identity", {}, (3, 10)),
  ],
)
def test_save_load_round_trip(tmp_path, name, kwargs, shape):
  inputs = keras.Input(shape)
  model = keras.Model(inputs, backbones.get_backbone(name, **kwargs)(inputs))
  path = str(tmp_path / "backbone.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  images = _images(2, *shape)
  np.testing.assert_array_equal(_embed(loaded, images), _embed(model, images))
  layer = loaded.layers[-1]
  assert type(layer) is type(model.layers[-1])
  assert layer.get_config() == model.layers[-1].get_config()


def test_get_config_is_complete():
  backbone = backbones.ResNet12(
    channels=(2, 3, 4, 5), negative_slope=0.2, epsilon=1e-3, global_pool=True
  )
  clone = backbones.ResNet12.from_config(backbone.get_config())
  assert clone.channels == (2, 3, 4, 5)
  assert (clone.negative_slope, clone.epsilon, clone.global_pool) == (
    0.2,
    1e-3,
    True,
  )
  conv4 = backbones.Conv4.from_config(
    backbones.Conv4(
      filters=8, epsilon=1e-2, global_pool=True, pool_last_block=False
    ).get_config()
  )
  assert (
    conv4.filters,
    conv4.epsilon,
    conv4.global_pool,
    conv4.pool_last_block,
  ) == (8, 1e-2, True, False)
  assert not conv4.blocks[3].pool and conv4.blocks[2].pool
  strided = backbones.Conv4.from_config(
    backbones.Conv4(downsample="stride").get_config()
  )
  assert strided.downsample == "stride"
  assert [block.stride for block in strided.blocks] == [2] * 4


def test_get_backbone():
  assert isinstance(backbones.get_backbone("conv4", filters=8), backbones.Conv4)
  assert isinstance(backbones.get_backbone("resnet12"), backbones.ResNet12)
  with pytest.raises(ValueError, match="conv4, identity, resnet12"):
    backbones.get_backbone("resnet18")
