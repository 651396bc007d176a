"""Keras layer: a linear classifier adapted to each task by gradient flow."""

import dataclasses
import functools
import math
from typing import Any

import keras
import tensorflow as tf

from comln_tf import _validation
from comln_tf import engine

# Adaptation without a meta-gradient (inference, evaluation, serving): the
# solve of s alone, the cheapest; the probe tangent of Backprop's step
# control matters only to a gradient.
_PLAIN_SOLVE = engine.Backprop(tangent_control=False)

# The layer's arguments that are `AdaptOptions` fields, of the same names.
_OPTION_NAMES = tuple(
  field.name for field in dataclasses.fields(engine.AdaptOptions) if field.init
)


def _ways_of_labels(support_labels):
  """N = the largest label + 1; 2 (the fewest ways) when there is no label.

  Without labels (B = 0 tasks) the result is empty whatever N is; the
  maximum of no value would be the smallest int32.
  """
  labels = tf.cast(support_labels, tf.int32)
  return tf.where(tf.size(labels) > 0, tf.reduce_max(labels) + 1, 2)


def check_finite_queries(query_embeddings: tf.Tensor) -> tf.Tensor:
  """`query_embeddings`, after a check that every value is finite.

  The engine refuses non-finite support embeddings; the queries never
  reach it, and a NaN query would come out as NaN logits without a word.

  Args:
    query_embeddings: float [..., Q, d].

  Returns:
    The same values, computed after the check; under XLA (no check), with
    every value of a non-finite query NaN, so that its logits are NaN
    (an Inf alone would give an infinite logit, and a class).

  Raises (at run time):
    tf.errors.InvalidArgumentError: a NaN or Inf value, naming
      query_embeddings.
  """
  finite = tf.reduce_all(tf.math.is_finite(query_embeddings), axis=-1)
  check = tf.debugging.Assert(
    tf.reduce_all(finite),
    ["query_embeddings must be finite (no NaN or Inf)."],
  )
  with tf.control_dependencies([check]):
    return tf.where(
      finite[..., None],
      query_embeddings,
      tf.constant(float("nan"), query_embeddings.dtype),
    )


class _Option:
  """A read-only layer attribute: the field of its name of `layer.options`."""

  def __set_name__(self, owner, name):
    self.name = name

  def __get__(self, layer, owner=None):
    return self if layer is None else getattr(layer.options, self.name)

  def __set__(self, layer, value):
    raise AttributeError(
      f"{self.name} is one of the layer's options, fixed at construction."
    )


def _check_jit_compile(method, tasks_per_solve):
  """Raises ValueError if the adaptation cannot be compiled on its own."""
  if method == "backprop":
    # Its gradient runs back through the solver's while loop, whose
    # TensorLists cannot cross the boundary of a compiled function.
    raise ValueError(
      'jit_compile=True needs method="forward", "discrete_adjoint", '
      '"auto" or "adjoint": the '
      'gradient of method="backprop" goes through the solver loop, '
      "which cannot leave an XLA function. Compile the whole training "
      "step instead (tf.function(jit_compile=True))."
    )
  if tasks_per_solve is not None:
    # The groups are a tf.map_fn, whose gradient needs the forward loop's
    # TensorLists: they cannot cross the boundary of a compiled function.
    raise ValueError(
      "jit_compile=True and tasks_per_solve cannot be combined: the "
      "gradient of the grouped solve cannot leave an XLA function. Use "
      "one of them, or compile the whole training step instead "
      "(tf.function(jit_compile=True))."
    )


@keras.saving.register_keras_serializable(package="comln_tf")
class GradientFlowClassifier(keras.layers.Layer):
  """Adapts W0 to each task's support set up to a learned time T.

  Owns the meta-parameters of the head: the initial classifier W0 [N, d]
  (lecun-normal with fan-in N, as the authors) and tau = log T (T starts at
  `initial_t`). For each task it integrates the gradient flow of the support
  cross-entropy from W0 up to T with `comln_tf.adapt` and classifies the
  queries with the adapted weights. With `training=True` the configured
  gradient method gives exact meta-gradients; otherwise the plain solve is
  used (no sensitivities: the cheapest way to adapt at inference).

  With `tie_init_rows=True` all rows of W0 are equal (Ye & Chao 2022). A row
  shared by every class shifts every logit of an example by the same amount,
  which the softmax ignores, so the flow and the predictions do not depend
  on it: W0 is zero and the layer adapts to any number of ways, given by
  `num_ways` at call time or by the largest label + 1.

  Args:
    num_ways: N, the number of classes per task (None only with
      tie_init_rows).
    initial_t: T at initialisation, > 0.
    train_t: whether tau = log T is trainable.
    method, solver, rtol, atol, max_steps, num_steps, tasks_per_solve:
      the `comln_tf.AdaptOptions` of the adaptation (see `comln_tf.adapt`);
      the method by name. The default method "auto" is the cheapest exact
      one for the solver and episode shape (`comln_tf.Auto`).
    label_smoothing: epsilon of the support labels, Y = (1 - eps) onehot +
      eps / N.
    tie_init_rows: one shared initial row (see above).
    jit_compile: compile the adaptation with XLA. The ODE solve is a loop of
      many small ops, which XLA fuses (docs/benchmarks.md). Not with
      method="backprop" nor with tasks_per_solve (their gradients cannot
      leave an XLA function). Off by default because a SavedModel with XLA
      functions needs a TensorFlow Serving build with XLA.
  """

  method = _Option()
  solver = _Option()
  rtol = _Option()
  atol = _Option()
  max_steps = _Option()
  num_steps = _Option()
  tasks_per_solve = _Option()

  def __init__(
    self,
    num_ways: int | None = None,
    initial_t: float = 1.0,
    train_t: bool = True,
    method: str | engine.GradientMethod = engine.AdaptOptions.method,
    solver: str | engine.Solver = engine.AdaptOptions.solver,
    rtol: float = engine.AdaptOptions.rtol,
    atol: float = engine.AdaptOptions.atol,
    max_steps: int = engine.AdaptOptions.max_steps,
    num_steps: int | None = engine.AdaptOptions.num_steps,
    label_smoothing: float = 0.0,
    tie_init_rows: bool = False,
    jit_compile: bool = False,
    tasks_per_solve: int | None = engine.AdaptOptions.tasks_per_solve,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if num_ways is None and not tie_init_rows:
      raise ValueError("num_ways is required unless tie_init_rows=True.")
    self.num_ways = _validation.integer("num_ways", num_ways, 2, optional=True)
    self.initial_t = _validation.positive("initial_t", initial_t)
    self.train_t = bool(train_t)
    self.label_smoothing = _validation.in_range(
      "label_smoothing", label_smoothing, 0.0, 1.0, include_high=False
    )
    self.tie_init_rows = bool(tie_init_rows)
    self.jit_compile = bool(jit_compile)
    # A name, not a GradientMethod object: `get_config` saves it.
    _validation.one_of("method", method, engine.METHODS)
    if self.jit_compile:
      _check_jit_compile(method, tasks_per_solve)
    # Fails at construction, not at the first call, on a bad solver set-up
    # or a method the solver does not support (e.g. backprop with tfp_bdf).
    self.options = engine.AdaptOptions(
      method=method,
      solver=solver,
      rtol=rtol,
      atol=atol,
      max_steps=max_steps,
      num_steps=num_steps,
      tasks_per_solve=tasks_per_solve,
    )
    self._plain_options = dataclasses.replace(self.options, method=_PLAIN_SOLVE)
    # With jit_compile: one compiled adaptation per options.
    self._compiled_adapt: dict[
      engine.AdaptOptions, tf.types.experimental.PolymorphicFunction
    ] = {}

  def build(
    self,
    support_embeddings_shape: tuple[int | None, ...],
    support_labels_shape: tuple[int | None, ...] | None = None,
    query_embeddings_shape: tuple[int | None, ...] | None = None,
  ) -> None:
    embedding_size = support_embeddings_shape[-1]
    if embedding_size is None:
      raise ValueError(
        "The embedding size (last axis of support_embeddings) "
        "must be known to build GradientFlowClassifier."
      )
    self.init_weights = None
    if not self.tie_init_rows:
      # Keras' fan-in of a 2-D [N, d] weight is N, as in the authors' code.
      self.init_weights = self.add_weight(
        name="init_weights",
        shape=(self.num_ways, embedding_size),
        initializer=keras.initializers.LecunNormal(),
      )
    self.log_t = self.add_weight(
      name="log_t",
      shape=(),
      initializer=keras.initializers.Constant(math.log(self.initial_t)),
      trainable=self.train_t,
    )

  @property
  def t_final(self) -> tf.Tensor:
    """T = exp(tau), scalar tensor."""
    return tf.exp(tf.convert_to_tensor(self.log_t))

  def assign_t_final(self, t_final: float) -> None:
    """Sets T (a float > 0); stored as tau = log T."""
    self.log_t.assign(math.log(t_final))

  def _initial_weights(self, support_embeddings, support_labels, num_ways):
    if not self.tie_init_rows:
      return tf.convert_to_tensor(self.init_weights), self.num_ways
    if num_ways is None:
      num_ways = self.num_ways
    if num_ways is None:
      num_ways = _ways_of_labels(support_labels)
    if support_labels.dtype.is_integer:
      # N comes from the labels: they must make a task (every class
      # 0..N-1 present, so N <= M), or a stray label 999 would silently
      # make 1,000-way logits.
      with tf.control_dependencies(
        engine.check_task_labels(support_labels, num_ways)
      ):
        num_ways = tf.identity(num_ways)
    return tf.zeros(
      tf.stack([num_ways, tf.shape(support_embeddings)[-1]]),
      support_embeddings.dtype,
    ), num_ways

  def adapt(
    self,
    support_embeddings: tf.Tensor,
    support_labels: tf.Tensor,
    training: bool | None = None,
    num_ways: int | None = None,
    return_stats: bool = False,
    max_steps: int | None = None,
  ) -> tf.Tensor | tuple[tf.Tensor, engine.SolveStats]:
    """Adapted weights for each task.

    Args:
      support_embeddings: [B, M, d] (or [M, d]) float.
      support_labels: int [B, M] (or [M]) in [0, N).
      training: use the configured gradient method (True) or the plain
        solve (otherwise).
      num_ways: N for a tied-rows layer (default: largest label + 1).
      return_stats: also return the solve's `SolveStats`.
      max_steps: most solver steps of this call (default: the layer's),
        e.g. a serving budget.

    Returns:
      [B, N, d] (or [N, d]) adapted weights, and the stats if asked.
    """
    support_embeddings = tf.convert_to_tensor(
      support_embeddings, dtype=self.compute_dtype
    )
    support_labels = tf.convert_to_tensor(support_labels)
    init_weights, num_ways = self._initial_weights(
      support_embeddings, support_labels, num_ways
    )
    init_weights = tf.cast(init_weights, support_embeddings.dtype)
    labels = support_labels
    if self.label_smoothing > 0:
      if not support_labels.dtype.is_integer:
        raise TypeError("label_smoothing needs integer support_labels.")
      one_hot = tf.one_hot(
        support_labels, num_ways, dtype=support_embeddings.dtype
      )
      labels = one_hot * (1.0 - self.label_smoothing) + (
        self.label_smoothing / tf.cast(num_ways, support_embeddings.dtype)
      )
      # Out-of-range labels give all-zero rows, which adapt rejects.
    options = self.options if training else self._plain_options
    if max_steps is not None:
      options = dataclasses.replace(options, max_steps=max_steps)
    run = functools.partial(engine.adapt_with_options, options)
    if self.jit_compile:
      # One compiled function per options (the gradient method: training
      # or not; the step budget).
      if options not in self._compiled_adapt:
        self._compiled_adapt[options] = tf.function(run, jit_compile=True)
      run = self._compiled_adapt[options]
    weights, stats = run(
      init_weights,
      support_embeddings,
      labels,
      tf.cast(self.t_final, support_embeddings.dtype),
    )
    return (weights, stats) if return_stats else weights

  @staticmethod
  def logits(query_embeddings: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Query logits [B, Q, N] from embeddings [B, Q, d], weights [B, N, d]."""
    return tf.matmul(query_embeddings, weights, transpose_b=True)

  def call(
    self,
    support_embeddings: tf.Tensor,
    support_labels: tf.Tensor,
    query_embeddings: tf.Tensor,
    training: bool | None = None,
  ) -> tf.Tensor:
    """Query logits [B, Q, N] after adapting to each task's support set.

    Args:
      support_embeddings: [B, M, d] float.
      support_labels: int [B, M] in [0, N); with tied rows, every class
        0..N-1 in every task.
      query_embeddings: [B, Q, d] float, the same B.
      training: see `adapt`.

    Returns B = 0 tasks as an empty result ([0, Q, N]; N = 2 for a
    tied-rows layer without num_ways, which has no label to count them).

    Raises:
      ValueError / tf.errors.InvalidArgumentError: support and query sets
        of different numbers of tasks B (statically known or not), or, with
        tied rows, labels that are not a task.
      tf.errors.InvalidArgumentError: non-finite query_embeddings (as the
        engine for support_embeddings; under XLA, where assertions are
        compiled away, their logits are NaN instead).
    """
    support_embeddings = tf.convert_to_tensor(
      support_embeddings, dtype=self.compute_dtype
    )
    query_embeddings = tf.convert_to_tensor(
      query_embeddings, dtype=support_embeddings.dtype
    )
    # Else a query batch of 1 would broadcast against any support batch.
    checks = engine.check_equal_dims(
      "support_embeddings",
      support_embeddings,
      0,
      "query_embeddings",
      query_embeddings,
      0,
      "number of tasks B (first axis)",
    )
    with tf.control_dependencies(checks):
      support_embeddings = tf.identity(support_embeddings)
    query_embeddings = check_finite_queries(query_embeddings)
    weights = self.adapt(support_embeddings, support_labels, training=training)
    return self.logits(query_embeddings, weights)

  def compute_output_shape(
    self,
    support_embeddings_shape: tuple[int | None, ...],
    support_labels_shape: tuple[int | None, ...] | None = None,
    query_embeddings_shape: tuple[int | None, ...] | None = None,
  ) -> tuple[int | None, ...]:
    if query_embeddings_shape is None:
      # The logits take their leading axes from the queries.
      raise TypeError("compute_output_shape needs query_embeddings_shape.")
    return tuple(query_embeddings_shape[:-1]) + (self.num_ways,)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(
      num_ways=self.num_ways,
      initial_t=self.initial_t,
      train_t=self.train_t,
      label_smoothing=self.label_smoothing,
      tie_init_rows=self.tie_init_rows,
      jit_compile=self.jit_compile,
      **{name: getattr(self, name) for name in _OPTION_NAMES},
    )
    return config
