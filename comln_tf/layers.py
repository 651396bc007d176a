"""Keras layer: a linear classifier adapted to each task by gradient flow."""

import functools
import math
from typing import Optional

import keras
import tensorflow as tf

from comln_tf import _adapt
from comln_tf import _gradient_methods
from comln_tf import _solvers

# Adaptation without a meta-gradient (inference, evaluation, serving): the
# solve of s alone, the cheapest; the probe tangent of Backprop's step
# control matters only to a gradient.
_PLAIN_SOLVE = _gradient_methods.Backprop(tangent_control=False)


def _ways_of_labels(support_labels):
  """N = the largest label + 1; 2 (the fewest ways) when there is no label.

  Without labels (B = 0 tasks) the result is empty whatever N is; the
  maximum of no value would be the smallest int32.
  """
  labels = tf.cast(support_labels, tf.int32)
  return tf.where(tf.size(labels) > 0, tf.reduce_max(labels) + 1, 2)


def check_finite_queries(query_embeddings):
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
      passed to `adapt`. The default method "auto" is the cheapest exact
      one for the solver and episode shape (`comln_tf.Auto`).
    label_smoothing: epsilon of the support labels, Y = (1 - eps) onehot +
      eps / N.
    tie_init_rows: one shared initial row (see above).
    jit_compile: compile the adaptation with XLA. The ODE solve is a loop of
      many small ops; XLA fuses them (3x faster solves for 5-way 1-shot
      Omniglot on CPU). Not with method="backprop" nor with tasks_per_solve
      (their gradients cannot leave an XLA function). Off by default because
      a SavedModel with XLA functions needs a TensorFlow Serving build with
      XLA.
  """

  def __init__(
    self,
    num_ways: Optional[int] = None,
    initial_t: float = 1.0,
    train_t: bool = True,
    method: str = "auto",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = _adapt.DEFAULT_MAX_STEPS,
    num_steps: Optional[int] = None,
    label_smoothing: float = 0.0,
    tie_init_rows: bool = False,
    jit_compile: bool = False,
    tasks_per_solve: Optional[int] = None,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if num_ways is None and not tie_init_rows:
      raise ValueError("num_ways is required unless tie_init_rows=True.")
    if num_ways is not None and (
      isinstance(num_ways, bool) or int(num_ways) != num_ways or num_ways < 2
    ):
      raise ValueError(f"num_ways must be an integer >= 2, got {num_ways!r}.")
    if not initial_t > 0:
      raise ValueError(f"initial_t must be > 0, got {initial_t!r}.")
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(
        f"label_smoothing must be in [0, 1), got {label_smoothing!r}."
      )
    if not isinstance(method, str) or method not in _gradient_methods.METHODS:
      raise ValueError(
        f"method must be one of "
        f"{sorted(_gradient_methods.METHODS)}, got {method!r}."
      )
    self.num_ways = None if num_ways is None else int(num_ways)
    self.initial_t = float(initial_t)
    self.train_t = bool(train_t)
    self.method = method
    self.solver = solver
    self.rtol = float(rtol)
    self.atol = float(atol)
    self.max_steps = int(max_steps)
    self.num_steps = num_steps
    self.label_smoothing = float(label_smoothing)
    self.tie_init_rows = bool(tie_init_rows)
    self.jit_compile = bool(jit_compile)
    self.tasks_per_solve = tasks_per_solve
    self._compiled_adapt = {}
    if self.jit_compile and method == "backprop":
      # Its gradient runs back through the solver's while loop, whose
      # TensorLists cannot cross the boundary of a compiled function.
      raise ValueError(
        'jit_compile=True needs method="forward", "discrete_adjoint", '
        '"auto" or "adjoint": the '
        'gradient of method="backprop" goes through the solver loop, '
        "which cannot leave an XLA function. Compile the whole training "
        "step instead (tf.function(jit_compile=True))."
      )
    if self.jit_compile and tasks_per_solve is not None:
      # The groups are a tf.map_fn, whose gradient needs the forward loop's
      # TensorLists: they cannot cross the boundary of a compiled function.
      raise ValueError(
        "jit_compile=True and tasks_per_solve cannot be combined: the "
        "gradient of the grouped solve cannot leave an XLA function. Use "
        "one of them, or compile the whole training step instead "
        "(tf.function(jit_compile=True))."
      )
    # Fail at construction, not at the first call, on a bad solver set-up
    # or a method the solver does not support (e.g. backprop with tfp_bdf).
    _solvers.make_solver(solver, rtol, atol, num_steps).gradient_method_for(
      _gradient_methods.make_method(method)
    )

  def build(
    self,
    support_embeddings_shape,
    support_labels_shape=None,
    query_embeddings_shape=None,
  ):
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
  def t_final(self):
    """T = exp(tau), scalar tensor."""
    return tf.exp(tf.convert_to_tensor(self.log_t))

  def assign_t_final(self, t_final):
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
        _adapt.check_task_labels(support_labels, num_ways)
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
    training: Optional[bool] = None,
    num_ways: Optional[int] = None,
    return_stats: bool = False,
    max_steps: Optional[int] = None,
  ):
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
    options = dict(
      method=self.method if training else _PLAIN_SOLVE,
      solver=self.solver,
      rtol=self.rtol,
      atol=self.atol,
      max_steps=self.max_steps if max_steps is None else max_steps,
      num_steps=self.num_steps,
      tasks_per_solve=self.tasks_per_solve,
      return_stats=True,
    )
    run = functools.partial(_adapt.adapt, **options)
    if self.jit_compile:
      # One compiled function per gradient method (training or not) and
      # step budget.
      key = (options["method"], options["max_steps"])
      if key not in self._compiled_adapt:
        self._compiled_adapt[key] = tf.function(run, jit_compile=True)
      run = self._compiled_adapt[key]
    weights, stats = run(
      init_weights,
      support_embeddings,
      labels,
      tf.cast(self.t_final, support_embeddings.dtype),
    )
    return (weights, stats) if return_stats else weights

  @staticmethod
  def logits(query_embeddings, weights):
    """Query logits [B, Q, N] from embeddings [B, Q, d], weights [B, N, d]."""
    return tf.matmul(query_embeddings, weights, transpose_b=True)

  def call(
    self,
    support_embeddings: tf.Tensor,
    support_labels: tf.Tensor,
    query_embeddings: tf.Tensor,
    training: Optional[bool] = None,
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
    checks = _adapt._check_equal_dims(  # pylint: disable=protected-access
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
    support_embeddings_shape,
    support_labels_shape=None,
    query_embeddings_shape=None,
  ):
    return tuple(query_embeddings_shape[:-1]) + (self.num_ways,)

  def get_config(self):
    config = super().get_config()
    config.update(
      num_ways=self.num_ways,
      initial_t=self.initial_t,
      train_t=self.train_t,
      method=self.method,
      solver=self.solver,
      rtol=self.rtol,
      atol=self.atol,
      max_steps=self.max_steps,
      num_steps=self.num_steps,
      label_smoothing=self.label_smoothing,
      tie_init_rows=self.tie_init_rows,
      jit_compile=self.jit_compile,
      tasks_per_solve=self.tasks_per_solve,
    )
    return config
