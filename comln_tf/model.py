"""The COMLN Keras model: a backbone and a gradient-flow classifier head."""

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from comln_tf import backbones
from comln_tf import engine
from comln_tf import layers


@keras.saving.register_keras_serializable(package="comln_tf")
class COMLN(keras.Model):
  """COMLN (Deleu et al., ICLR 2022) as a Keras model.

  The backbone embeds the support and query images of each task; the
  `GradientFlowClassifier` adapts W0 to the support set by the gradient flow
  of its cross-entropy up to the learned time T and returns the query
  logits. The support and query images of a task go through the backbone
  together, so its per-task batch norm uses both (transductive, as MAML).

  Training (`compile(optimizer=...)`, `fit`) minimises the mean query
  cross-entropy over tasks and queries; the meta-gradient reaches the
  backbone, W0 and tau = log T. The loss and metrics are the model's own
  (a `loss` or `metrics` given to `compile` is not used). Logged: `loss`,
  `accuracy`, `num_evals` (ODE vector-field evaluations of the adaptation,
  mean per meta-batch) and `t_final` (the current T).

  Weight decay is an L2 term added to the gradients of every trainable
  variable except tau (g + weight_decay * v), before the optimizer, exactly
  as the authors' code does. Keras optimizers' own `weight_decay` is
  decoupled (applied to the variables outside momentum, a different
  algorithm) and would decay tau unless each optimizer were configured to
  exclude it, so training refuses an optimizer with `weight_decay` set.

  Args:
    backbone: a backbone layer (see `comln_tf.backbones`) or its name for
      `backbones.get_backbone` ("conv4", "resnet12", "identity").
    classifier: a `layers.GradientFlowClassifier`.
    weight_decay: float >= 0, L2 coefficient on the backbone and W0 (the
      authors use 5e-4); never applied to tau.
    **kwargs: passed to `keras.Model` (e.g. `name`).

  Call args:
    inputs: an episode dict with "support_images" float32 [B, M, H, W, C],
      "support_labels" int32 [B, M] in [0, N) and "query_images" float32
      [B, Q, H, W, C] (with the identity backbone, embeddings [B, M, d] and
      [B, Q, d]); other keys (such as "query_labels") are ignored.
    training: True for the meta-training path (exact meta-gradients).
    return_stats: also return the adaptation's `comln_tf.SolveStats`.

  Returns:
    float32 [B, Q, N] query logits (and the SolveStats if return_stats).
  """

  def __init__(
    self,
    backbone: str | keras.layers.Layer,
    classifier: layers.GradientFlowClassifier,
    weight_decay: float = 0.0,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if isinstance(backbone, str):
      backbone = backbones.get_backbone(backbone)
    if not isinstance(classifier, layers.GradientFlowClassifier):
      raise TypeError(
        "classifier must be a GradientFlowClassifier, got "
        f"{type(classifier).__name__}"
      )
    if not weight_decay >= 0:
      raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    self.backbone = backbone
    self.classifier = classifier
    self.weight_decay = float(weight_decay)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
    self.num_evals_tracker = keras.metrics.Mean(name="num_evals")

  def build(self, input_shape: Mapping[str, tuple[int | None, ...]]) -> None:
    """Builds the backbone and the classifier.

    Args:
      input_shape: dict of shapes with at least "support_images"
        (B, M, H, W, C).
    """
    images_shape = tuple(input_shape["support_images"])
    # When loading a saved model, the sublayers come back already built.
    if not self.backbone.built:
      self.backbone.build(images_shape)
    if not self.classifier.built:
      self.classifier.build(self.backbone.compute_output_shape(images_shape))

  def call(
    self,
    inputs: Mapping[str, tf.Tensor],
    training: bool | None = None,
    return_stats: bool = False,
  ) -> tf.Tensor | tuple[tf.Tensor, engine.SolveStats]:
    """Query logits of each task after adapting to its support set.

    Args:
      inputs: episode dict (see the class docstring).
      training: True for the meta-training path (exact meta-gradients).
      return_stats: also return the adaptation's `comln_tf.SolveStats`.

    Returns:
      float32 [B, Q, N] query logits (and the SolveStats if return_stats).

    Raises:
      tf.errors.InvalidArgumentError: non-finite support or query images or
        embeddings, naming them; under XLA, where assertions are compiled
        away, NaN logits instead.
    """
    support_embeddings, query_embeddings = self.embed_episode(
      inputs, training=training
    )
    query_embeddings = layers.check_finite_queries(query_embeddings)
    support_labels = tf.cast(inputs["support_labels"], tf.int32)
    weights, stats = self.classifier.adapt(
      support_embeddings, support_labels, training=training, return_stats=True
    )
    logits = self.classifier.logits(query_embeddings, weights)
    return (logits, stats) if return_stats else logits

  def embed_episode(
    self, inputs: Mapping[str, tf.Tensor], training: bool | None = None
  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Support and query embeddings of each task.

    Args:
      inputs: episode dict (see the class docstring).
      training: passed to the backbone.

    Returns:
      (support [B, M, d], query [B, Q, d]) embeddings in the compute dtype.

    Raises:
      tf.errors.InvalidArgumentError: non-finite images, naming them (a
        backbone's ReLU and max-pooling can turn a NaN pixel into huge
        finite embeddings, which the engine cannot tell from real ones).
    """
    support_images = tf.cast(inputs["support_images"], self.compute_dtype)
    query_images = tf.cast(inputs["query_images"], self.compute_dtype)
    checks = [
      tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(images)),
        [f"{name} must be finite (no NaN or Inf)."],
      )
      for name, images in (
        ("support_images", support_images),
        ("query_images", query_images),
      )
    ]
    with tf.control_dependencies(checks):
      support_images = tf.identity(support_images)
      query_images = tf.identity(query_images)
    num_support = tf.shape(support_images)[1]
    # One backbone pass per task over support and query together: the
    # per-task batch norm statistics come from both.
    embeddings = self.backbone(
      tf.concat([support_images, query_images], axis=1), training=training
    )
    return embeddings[:, :num_support], embeddings[:, num_support:]

  @staticmethod
  def query_loss(query_labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over tasks and queries.

    Args:
      query_labels: int [B, Q] in [0, N).
      logits: float [B, Q, N].

    Returns:
      float scalar.
    """
    return tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(query_labels, tf.int32), logits=logits
      )
    )

  @staticmethod
  def query_correct(query_labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per query: 1 if classified right, 0 if wrong, NaN if not classified.

    A query whose logits are not all finite has no class (the argmax of
    NaN logits would be class 0, a silent guess): its NaN makes any mean
    accuracy it enters NaN.

    Args:
      query_labels: int [B, Q] in [0, N).
      logits: float [B, Q, N].

    Returns:
      float32 [B, Q].
    """
    correct = tf.cast(
      tf.equal(
        tf.argmax(logits, axis=-1, output_type=tf.int32),
        tf.cast(query_labels, tf.int32),
      ),
      tf.float32,
    )
    finite = tf.reduce_all(tf.math.is_finite(logits), axis=-1)
    return tf.where(finite, correct, tf.constant(float("nan"), tf.float32))

  def _update_metrics(self, episode, logits, loss, stats):
    """Updates the trackers; returns the logs of a train or test step."""
    self.loss_tracker.update_state(loss)
    self.accuracy_tracker.update_state(
      self.query_correct(episode["query_labels"], logits)
    )
    self.num_evals_tracker.update_state(stats.num_evals)
    logs = {metric.name: metric.result() for metric in self.metrics}
    logs["t_final"] = self.classifier.t_final
    return logs

  def regularized_gradients(
    self,
    gradients: Sequence[tf.Tensor | None],
    variables: Sequence[keras.Variable],
  ) -> list[tf.Tensor | None]:
    """Adds weight_decay * v to the gradient of every variable but tau.

    Args:
      gradients: list of gradient tensors (or None), one per variable.
      variables: the matching list of variables.

    Returns:
      The list of gradients with the L2 term added.
    """
    log_t = self.classifier.log_t
    return [
      g if g is None or v is log_t else g + self.weight_decay * v.value
      for g, v in zip(gradients, variables)
    ]

  def replica_gradients(
    self, data: Mapping[str, tf.Tensor]
  ) -> tuple[tf.Tensor, tf.Tensor, engine.SolveStats, list[tf.Tensor]]:
    """This replica's part of the meta-gradient of a meta-batch.

    Under tf.distribute with R replicas each replica gets B/R episodes and
    the optimizer sums what the replicas apply. Each contributes 1/R of
    (the gradient of its mean query loss + the L2 term), so the sum is the
    gradient of the mean loss over the global meta-batch plus the L2 term
    counted once. Outside a strategy R = 1.

    Args:
      data: episode dict (see the class docstring) with "query_labels"
        int32 [B, Q].

    Returns:
      (loss float32 scalar, logits [B, Q, N], SolveStats, gradients: list
      aligned with `self.trainable_variables`).
    """
    with tf.GradientTape() as tape:
      logits, stats = self(data, training=True, return_stats=True)
      loss = self.query_loss(data["query_labels"], logits)
    variables = self.trainable_variables
    gradients = self.regularized_gradients(
      tape.gradient(loss, variables), variables
    )
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss, logits, stats, [g / num_replicas for g in gradients]

  def train_step(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """One meta-training step on a meta-batch of episodes.

    Works under tf.distribute (`model.fit` in a strategy's scope): see
    `replica_gradients`.

    Args:
      data: episode dict (see the class docstring) with "query_labels"
        int32 [B, Q].

    Returns:
      dict of logs: loss, accuracy, num_evals, t_final.

    Raises:
      ValueError: the optimizer has its own weight decay (see the class
        docstring), or its own gradient clipping on several replicas.
    """
    if self.optimizer.weight_decay:
      raise ValueError(
        "Use COMLN(weight_decay=...) instead of the optimizer's "
        "weight_decay, which would also decay tau = log T."
      )
    if tf.distribute.get_strategy().num_replicas_in_sync > 1 and (
      self.optimizer.clipnorm or self.optimizer.global_clipnorm
    ):
      # Measured (Keras 3.15, MirroredStrategy): each replica's part is
      # clipped before the optimizer sums them.
      raise ValueError(
        "The optimizer's clipnorm/global_clipnorm clips each replica's "
        "part of the gradient separately under tf.distribute, not the "
        "gradient. Remove it, or meta-train with comln_tf.training "
        "(launch.train --clip_norm), which clips the summed gradient."
      )
    loss, logits, stats, gradients = self.replica_gradients(data)
    self.optimizer.apply(gradients, self.trainable_variables)
    return self._update_metrics(data, logits, loss, stats)

  def test_step(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Evaluates a meta-batch of episodes; same data and logs as train_step."""
    logits, stats = self(data, training=False, return_stats=True)
    loss = self.query_loss(data["query_labels"], logits)
    return self._update_metrics(data, logits, loss, stats)

  @property
  def metrics(self) -> list[keras.metrics.Metric]:
    # Listed so that Keras resets them at the start of each epoch.
    return [self.loss_tracker, self.accuracy_tracker, self.num_evals_tracker]

  def get_config(self) -> dict[str, Any]:
    return {
      "name": self.name,
      "trainable": self.trainable,
      "backbone": keras.saving.serialize_keras_object(self.backbone),
      "classifier": keras.saving.serialize_keras_object(self.classifier),
      "weight_decay": self.weight_decay,
    }

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> "COMLN":
    config = dict(config)
    for key in ("backbone", "classifier"):
      config[key] = keras.saving.deserialize_keras_object(config[key])
    return cls(**config)
