"""Backbones that embed the images of few-shot episodes.

Every backbone takes a meta-batch of tasks, images of shape
[B, n, H, W, C] (B tasks, n images each, channels last), and returns
embeddings of shape [B, n, d]. A single task may also be given without the
task axis, [n, H, W, C], and then comes back as [n, d].

Batch normalization is per task: `TaskBatchNormalization` normalizes each
task with the mean and variance of that task's own images (support and query
together, the transductive batch norm of MAML), in training and evaluation
alike, and keeps no running statistics. Hence a task's embeddings never
depend on the other tasks of the meta-batch, `training=True` and
`training=False` give the same result, and a served model can take a single
task.

The backbones:
- `Conv4`: 4 blocks of 3x3 convolution (64 filters), per-task batch norm,
  ReLU and 2x2 max pooling, then flatten: d = 64 at 28x28 (Omniglot),
  d = 1600 at 84x84 (miniImageNet); or, with `pool_last_block=False,
  global_pool=True`, the mean of the fourth block's unpooled map (d = 64);
  or, with `downsample="stride", global_pool=True`, MAML's Omniglot Conv-4:
  stride-2 convolutions instead of pooling, then the mean of the last map.
- `ResNet12`: the ResNet-12 of MetaOptNet (Lee et al. 2019) used by COMLN:
  4 residual blocks with 64, 160, 320, 640 channels, 3x3 convolutions, leaky
  ReLU (slope 0.1) and 2x2 max pooling; no global pooling by default, so
  d = 640 * 5 * 5 = 16,000 at 84x84 (d = 640 with `global_pool=True`).
- `Identity`: returns its input, for precomputed embeddings.
`get_backbone(name, **kwargs)` builds one by name.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops
import tensorflow as tf

_PACKAGE = "comln_tf"


def _per_image(fn, x):
  """Applies an image-wise function to a meta-batch of images.

  Keras convolutions and pooling take a single batch axis, so the task and
  image axes are merged for `fn` and split again afterwards.

  Args:
    fn: callable mapping float32 [batch, H, W, C] to [batch, H', W', C'].
    x: float32 [B, n, H, W, C].

  Returns:
    float32 [B, n, H', W', C'].
  """
  shape = ops.shape(x)
  y = fn(ops.reshape(x, (-1,) + tuple(shape[2:])))
  return ops.reshape(y, tuple(shape[:2]) + tuple(ops.shape(y)[1:]))


def _pooled_shape(input_shape, channels):
  """Shape after a block's 2x2 max pooling (floor, 'valid' padding).

  Args:
    input_shape: (B, n, H, W, C), entries int or None.
    channels: int, the block's output channels.

  Returns:
    (B, n, H // 2, W // 2, channels).
  """
  b, n, h, w, _ = input_shape
  return (
    b,
    n,
    None if h is None else h // 2,
    None if w is None else w // 2,
    channels,
  )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TaskBatchNormalization(keras.layers.Layer):
  """Batch normalization with the statistics of each task's own images.

  For every task (axis 0) and channel (last axis), the mean and the biased
  variance are taken over all the other axes (the task's images and their
  spatial positions). The same computation runs at training and evaluation
  (`training` is ignored) and there are no running statistics, so a task's
  output depends on that task's images only.

  Args:
    epsilon: float, added to the variance for numerical stability.
    **kwargs: passed to `keras.layers.Layer`.

  Call args:
    inputs: float32 [B, n, ..., C], rank >= 3 (for images [B, n, H, W, C]).
    training: ignored; accepted so callers can pass it through.

  Returns:
    float32, the shape of `inputs`: gamma * (x - mean) / sqrt(var + eps) + beta
    with gamma, beta learnable vectors of size C (initialized to 1 and 0).
  """

  def __init__(self, epsilon=1e-5, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    if len(input_shape) < 3:
      raise ValueError(
        "TaskBatchNormalization expects [tasks, images, ..., channels], "
        f"got shape {input_shape}"
      )
    channels = input_shape[-1]
    self.gamma = self.add_weight(
      shape=(channels,), initializer="ones", name="gamma"
    )
    self.beta = self.add_weight(
      shape=(channels,), initializer="zeros", name="beta"
    )

  def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    if (
      len(inputs.shape) == 5
      and inputs.shape[0] == 1
      and inputs.dtype == tf.float32
    ):
      return self._one_task_fused(inputs)
    axes = list(range(1, len(inputs.shape) - 1))
    mean, variance = ops.moments(inputs, axes=axes, keepdims=True)
    normalized = (inputs - mean) * ops.rsqrt(variance + self.epsilon)
    return normalized * self.gamma + self.beta

  def _one_task_fused(self, inputs: tf.Tensor) -> tf.Tensor:
    """`call` on the images of one task, float32 [1, n, H, W, C].

    The same normalization as TensorFlow's fused batch norm kernel, whose
    forward pass and gradient each read the map twice where the separate
    operations of `call` read it many times. The raw op, because
    `tf.nn.fused_batch_norm` raises epsilon to at least 1.001e-5.
    """
    empty = tf.constant([], tf.float32)
    normalized = tf.raw_ops.FusedBatchNormV3(
      x=inputs[0],
      scale=tf.cast(self.gamma, tf.float32),
      offset=tf.cast(self.beta, tf.float32),
      mean=empty,
      variance=empty,
      epsilon=self.epsilon,
      data_format="NHWC",
      is_training=True,
    )[0]
    return normalized[None]

  def compute_output_shape(
    self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    return input_shape

  def get_config(self) -> dict[str, Any]:
    return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvBlock(keras.layers.Layer):
  """Conv-4 block: 3x3 conv, per-task batch norm, ReLU, 2x2 max pool.

  The convolution has no bias: the batch norm subtracts the mean right after
  it, so a bias would get zero gradient and only be pulled by weight decay.

  Args:
    filters: int, output channels.
    epsilon: float, batch norm epsilon.
    pool: bool, end with the 2x2 max pooling (False: keep the conv's map).
    stride: int, 1 or 2, the convolution's stride ('same' padding, so 2
      gives ceil(H / 2) x ceil(W / 2), as MAML's strided Conv-4).
    **kwargs: passed to `keras.layers.Layer`.

  Call args:
    inputs: float32 [B, n, H, W, C].
    training: ignored (nothing in the block depends on it).

  Returns:
    float32 [B, n, H', W', filters], where the stride and then the pooling
    each halve H and W (ceil for the stride, floor for the pooling).
  """

  def __init__(self, filters, epsilon=1e-5, pool=True, stride=1, **kwargs):
    super().__init__(**kwargs)
    if stride not in (1, 2):
      raise ValueError(f"ConvBlock stride must be 1 or 2, got {stride!r}")
    self.filters = filters
    self.epsilon = epsilon
    self.pool = pool
    self.stride = stride
    self.conv = keras.layers.Conv2D(
      filters, 3, strides=stride, padding="same", use_bias=False, name="conv"
    )
    self.norm = TaskBatchNormalization(epsilon, name="norm")

  def _conv_shape(self, input_shape):
    b, n, h, w, _ = input_shape
    if self.stride == 2:
      h = None if h is None else (h + 1) // 2
      w = None if w is None else (w + 1) // 2
    return (b, n, h, w, self.filters)

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    self.conv.build((None,) + tuple(input_shape[2:]))
    self.norm.build(self._conv_shape(tuple(input_shape)))

  def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    x = ops.relu(self.norm(_per_image(self.conv, inputs)))
    if not self.pool:
      return x
    return _per_image(lambda t: ops.max_pool(t, 2, 2), x)

  def compute_output_shape(
    self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    shape = self._conv_shape(tuple(input_shape))
    if not self.pool:
      return shape
    return _pooled_shape(shape, self.filters)

  def get_config(self) -> dict[str, Any]:
    return {
      **super().get_config(),
      "filters": self.filters,
      "epsilon": self.epsilon,
      "pool": self.pool,
      "stride": self.stride,
    }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetBlock(keras.layers.Layer):
  """ResNet-12 block (MetaOptNet's BasicBlock without DropBlock).

  Three 3x3 convs with per-task batch norm (leaky ReLU after the first two),
  plus a 1x1 conv + batch norm shortcut; the sum goes through leaky ReLU and
  2x2 max pooling. Convs have no bias (batch norm follows) and use
  MetaOptNet's Kaiming-normal fan-out initialization.

  Args:
    filters: int, output channels.
    negative_slope: float, slope of the leaky ReLU for negative inputs.
    epsilon: float, batch norm epsilon.
    **kwargs: passed to `keras.layers.Layer`.

  Call args:
    inputs: float32 [B, n, H, W, C].
    training: ignored (nothing in the block depends on it).

  Returns:
    float32 [B, n, H // 2, W // 2, filters].
  """

  def __init__(self, filters, negative_slope=0.1, epsilon=1e-5, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.negative_slope = negative_slope
    self.epsilon = epsilon
    init = keras.initializers.VarianceScaling(
      scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )
    self.convs = [
      keras.layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer=init,
        name=f"conv{i}",
      )
      for i in range(3)
    ]
    self.norms = [
      TaskBatchNormalization(epsilon, name=f"norm{i}") for i in range(3)
    ]
    self.shortcut_conv = keras.layers.Conv2D(
      filters, 1, use_bias=False, kernel_initializer=init, name="shortcut_conv"
    )
    self.shortcut_norm = TaskBatchNormalization(epsilon, name="shortcut_norm")

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    image_shape = (None,) + tuple(input_shape[2:])
    output_shape = tuple(input_shape[:-1]) + (self.filters,)
    self.shortcut_conv.build(image_shape)
    for conv in self.convs:
      conv.build(image_shape)
      image_shape = image_shape[:-1] + (self.filters,)
    for norm in self.norms + [self.shortcut_norm]:
      norm.build(output_shape)

  def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    x = inputs
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = norm(_per_image(conv, x))
      if i < 2:
        x = ops.leaky_relu(x, self.negative_slope)
    shortcut = self.shortcut_norm(_per_image(self.shortcut_conv, inputs))
    x = ops.leaky_relu(x + shortcut, self.negative_slope)
    return _per_image(lambda t: ops.max_pool(t, 2, 2), x)

  def compute_output_shape(
    self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    return _pooled_shape(input_shape, self.filters)

  def get_config(self) -> dict[str, Any]:
    return {
      **super().get_config(),
      "filters": self.filters,
      "negative_slope": self.negative_slope,
      "epsilon": self.epsilon,
    }


# Meta-batches of at most this many tasks, of a size known when traced, go
# through the blocks one task at a time (see `_EpisodeBackbone.call`).
_MAX_TASKS_ONE_BY_ONE = 64


class _EpisodeBackbone(keras.layers.Layer):
  """Runs `self.blocks` on [B, n, H, W, C] images, then flattens or pools.

  Subclasses set `self.blocks`, a list of layers mapping
  [B, n, H, W, C] to [B, n, H', W', C'].

  Args:
    global_pool: bool; if True, average the final feature map over space
      (d = C'), otherwise flatten it (d = H' * W' * C').
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, global_pool=False, **kwargs):
    super().__init__(**kwargs)
    self.global_pool = global_pool

  @staticmethod
  def _as_tasks(shape):
    """[n, H, W, C] (one task) -> [1, n, H, W, C]; [B, n, H, W, C] kept."""
    shape = tuple(shape)
    if len(shape) == 4:
      return (1,) + shape
    if len(shape) == 5:
      return shape
    raise ValueError(
      "Backbones take images [B, n, H, W, C] or [n, H, W, C], "
      f"got shape {shape}"
    )

  def _feature_map_shape(self, task_shape):
    for block in self.blocks:
      task_shape = block.compute_output_shape(task_shape)
    return task_shape

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    shape = self._as_tasks(input_shape)
    for block in self.blocks:
      block.build(shape)
      shape = block.compute_output_shape(shape)

  def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    """Embeds the images.

    Args:
      images: float32 [B, n, H, W, C], or [n, H, W, C] for one task.
      training: passed to the blocks (their output does not depend on it).

    Returns:
      float32 [B, n, d], or [n, d] for one task.
    """
    one_task = len(images.shape) == 4
    x = images[None] if one_task else images
    tasks = x.shape[0]
    if tasks is not None and 1 < tasks <= _MAX_TASKS_ONE_BY_ONE:
      # Each task through the blocks alone: its batch norms then run as
      # fused kernels (`TaskBatchNormalization`), and the tasks' chains are
      # independent operations TensorFlow runs side by side.
      x = ops.concatenate(
        [self._blocks(x[i : i + 1], training) for i in range(tasks)], axis=0
      )
    else:
      x = self._blocks(x, training)
    if self.global_pool:
      x = ops.mean(x, axis=(2, 3))
    else:
      shape = ops.shape(x)
      # A static d lets the classifier that follows build its weights.
      flat = math.prod(x.shape[2:]) if None not in x.shape[2:] else -1
      x = ops.reshape(x, (shape[0], shape[1], flat))
    return x[0] if one_task else x

  def _blocks(self, x: tf.Tensor, training: bool | None) -> tf.Tensor:
    for block in self.blocks:
      x = block(x, training=training)
    return x

  def compute_output_shape(
    self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    b, n, h, w, c = self._feature_map_shape(self._as_tasks(input_shape))
    if self.global_pool:
      d = c
    elif h is None or w is None:
      d = None
    else:
      d = h * w * c
    return (n, d) if len(input_shape) == 4 else (b, n, d)

  def get_config(self) -> dict[str, Any]:
    return {**super().get_config(), "global_pool": self.global_pool}


# How `Conv4`'s blocks halve the map.
CONV4_DOWNSAMPLING = ("max_pool", "stride")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv4(_EpisodeBackbone):
  """Conv-4 backbone (Vinyals et al. 2016; MAML; COMLN Table 2).

  4 `ConvBlock`s (3x3 conv, per-task batch norm, ReLU, 2x2 max pool), then
  flatten: d = 64 at 28x28 and d = 1600 at 84x84 with the default 64
  filters. Images are channels last.

  At 28x28 the last block's map is 3x3, and its 2x2 pooling (floor) keeps
  only the top-left 2x2 cells. `pool_last_block=False, global_pool=True`
  averages the whole 3x3 map instead (d = 64), as MAML's Omniglot Conv-4
  averages its last map. `downsample="stride", global_pool=True` is MAML's
  Omniglot Conv-4 itself: each block's convolution has stride 2 and no
  pooling follows (28 -> 14 -> 7 -> 4 -> 2), and the 2x2 map is averaged.

  Args:
    filters: int, channels of every block.
    epsilon: float, batch norm epsilon.
    global_pool: bool, average over space instead of flattening (d = filters).
    pool_last_block: bool, max-pool after the fourth block too (False: its
      map is flattened or, with `global_pool`, averaged unpooled). Only with
      `downsample="max_pool"`.
    downsample: str, how each block halves the map: "max_pool" (2x2 max
      pooling after the ReLU) or "stride" (stride-2 convolution).
    **kwargs: passed to `keras.layers.Layer`.

  Call args:
    images: float32 [B, n, H, W, C] (B tasks of n images), or [n, H, W, C]
      for a single task. Batch norm uses each task's own images.
    training: accepted and passed on; the output does not depend on it.

  Returns:
    float32 [B, n, d], or [n, d] for a single task.
  """

  def __init__(
    self,
    filters=64,
    epsilon=1e-5,
    global_pool=False,
    pool_last_block=True,
    downsample="max_pool",
    **kwargs,
  ):
    super().__init__(global_pool=global_pool, **kwargs)
    if downsample not in CONV4_DOWNSAMPLING:
      raise ValueError(
        f"Conv4 downsample must be one of "
        f"{CONV4_DOWNSAMPLING}, got {downsample!r}"
      )
    if downsample == "stride" and not pool_last_block:
      raise ValueError(
        "Conv4 pool_last_block=False is for "
        "downsample='max_pool' (strided blocks do not pool)"
      )
    self.filters = filters
    self.epsilon = epsilon
    self.pool_last_block = pool_last_block
    self.downsample = downsample
    strided = downsample == "stride"
    self.blocks = [
      ConvBlock(
        filters,
        epsilon,
        pool=not strided and (i < 3 or pool_last_block),
        stride=2 if strided else 1,
        name=f"block{i}",
      )
      for i in range(4)
    ]

  def get_config(self) -> dict[str, Any]:
    return {
      **super().get_config(),
      "filters": self.filters,
      "epsilon": self.epsilon,
      "pool_last_block": self.pool_last_block,
      "downsample": self.downsample,
    }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNet12(_EpisodeBackbone):
  """ResNet-12 backbone of MetaOptNet (Lee et al. 2019), as used by COMLN.

  4 `ResNetBlock`s with `channels` output channels, each halving the spatial
  size; by default no global pooling, so d = 640 * 5 * 5 = 16,000 at 84x84
  (d = 640 with `global_pool=True`). MetaOptNet's DropBlock regularization
  is not included. Images are channels last.

  Args:
    channels: sequence of 4 ints, output channels of the blocks.
    negative_slope: float, slope of the leaky ReLU for negative inputs.
    epsilon: float, batch norm epsilon.
    global_pool: bool, average the last feature map over space.
    **kwargs: passed to `keras.layers.Layer`.

  Call args:
    images: float32 [B, n, H, W, C] (B tasks of n images), or [n, H, W, C]
      for a single task. Batch norm uses each task's own images.
    training: accepted and passed on; the output does not depend on it.

  Returns:
    float32 [B, n, d], or [n, d] for a single task.
  """

  def __init__(
    self,
    channels=(64, 160, 320, 640),
    negative_slope=0.1,
    epsilon=1e-5,
    global_pool=False,
    **kwargs,
  ):
    super().__init__(global_pool=global_pool, **kwargs)
    if len(channels) != 4:
      raise ValueError(f"ResNet12 needs 4 channel sizes, got {channels}")
    self.channels = tuple(channels)
    self.negative_slope = negative_slope
    self.epsilon = epsilon
    self.blocks = [
      ResNetBlock(c, negative_slope, epsilon, name=f"block{i}")
      for i, c in enumerate(self.channels)
    ]

  def get_config(self) -> dict[str, Any]:
    return {
      **super().get_config(),
      "channels": list(self.channels),
      "negative_slope": self.negative_slope,
      "epsilon": self.epsilon,
    }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Identity(keras.layers.Layer):
  """Backbone for precomputed embeddings: returns its input unchanged.

  Call args:
    inputs: float32 [B, n, d] (or [n, d] for a single task).
    training: ignored.

  Returns:
    `inputs`, same shape and dtype.
  """

  def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    return inputs

  def compute_output_shape(
    self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    return input_shape


_BACKBONES = {"conv4": Conv4, "resnet12": ResNet12, "identity": Identity}


def get_backbone(name: str, **kwargs: Any) -> keras.layers.Layer:
  """Builds a backbone by name.

  Args:
    name: str, one of "conv4", "resnet12", "identity".
    **kwargs: constructor arguments of that backbone (e.g. `global_pool`).

  Returns:
    A `keras.layers.Layer` mapping [B, n, ...] inputs to [B, n, d].

  Raises:
    ValueError: unknown name (the message lists the known names).
  """
  if name not in _BACKBONES:
    raise ValueError(
      f"Unknown backbone {name!r}; known backbones: "
      f"{', '.join(sorted(_BACKBONES))}"
    )
  return _BACKBONES[name](**kwargs)
