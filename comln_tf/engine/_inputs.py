"""Checks of `adapt`'s inputs, and the label formats it accepts."""

import tensorflow as tf

# Floating dtypes the solver supports (its tolerances need >= float32).
SUPPORTED_DTYPES = (tf.float32, tf.float64)


def _static_dim(tensor, axis):
  return tensor.shape[axis] if tensor.shape.rank is not None else None


def check_equal_dims(
  name_a: str,
  tensor_a: tf.Tensor,
  axis_a: int,
  name_b: str,
  tensor_b: tf.Tensor,
  axis_b: int,
  what: str,
) -> list[tf.Operation | None]:
  """Static check where both sizes are known, runtime assertion otherwise."""
  a, b = _static_dim(tensor_a, axis_a), _static_dim(tensor_b, axis_b)
  message = (
    f"{name_a} and {name_b} must have the same {what}: "
    f"got shapes {tensor_a.shape} and {tensor_b.shape}."
  )
  if a is not None and b is not None:
    if a != b:
      raise ValueError(message)
    return []
  return [
    tf.debugging.assert_equal(
      tf.shape(tensor_a)[axis_a], tf.shape(tensor_b)[axis_b], message=message
    )
  ]


def _label_distributions(support_labels, num_classes, dtype, rank):
  """Integer labels [B, M] -> one-hot [B, M, N]; float [B, M, N] kept.

  Returns:
    (labels [B, M, N] of `dtype`, runtime checks, validity scalar bool).
  """
  if support_labels.dtype.is_integer:
    if support_labels.shape.rank != rank - 1:
      raise ValueError(
        f"support_labels must be integers of shape [M] (or [B, M] for a "
        f"batch of tasks), got shape {support_labels.shape}."
      )
    in_range = tf.reduce_all(
      (support_labels >= 0)
      & (support_labels < tf.cast(num_classes, support_labels.dtype))
    )
    message = (
      f"support_labels must lie in [0, N) where N is the number of "
      f"rows of init_weights (N={num_classes})."
    )
    checks = [tf.debugging.Assert(in_range, [message])]
    return (
      tf.one_hot(support_labels, num_classes, dtype=dtype),
      checks,
      in_range,
    )
  if support_labels.dtype.is_floating:
    if support_labels.shape.rank != rank:
      raise ValueError(
        f"float support_labels are label distributions of shape [M, N] (or "
        f"[B, M, N]), got shape {support_labels.shape}."
      )
    labels = tf.cast(support_labels, dtype)
    valid = (
      tf.reduce_all(tf.math.is_finite(labels))
      & tf.reduce_all(labels >= 0)
      & tf.reduce_all(tf.abs(tf.reduce_sum(labels, -1) - 1) <= 1e-3)
    )
    message = (
      "float support_labels must be label distributions: finite, "
      "non-negative, each row summing to 1."
    )
    # Rows summing to 1 within 1e-3 are made to sum to 1: the flow keeps
    # P - Y summing to zero (see `_reduced.residual`).
    totals = tf.reduce_sum(labels, -1, keepdims=True)
    labels = labels / tf.where(totals > 0, totals, tf.ones_like(totals))
    return labels, [tf.debugging.Assert(valid, [message])], valid
  raise TypeError(
    f"support_labels must be integer class indices or float "
    f"label distributions, got dtype {support_labels.dtype}."
  )


def as_tensors(
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  t_final: float | tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """The inputs of `adapt` as tensors, their dtypes and ranks checked.

  Returns:
    (init_weights [N, d], support_embeddings [M, d] or [B, M, d] of its
    dtype, support_labels, t_final scalar of that dtype).

  Raises:
    TypeError / ValueError: a dtype, a rank, or a size or time known bad
      when tracing.
  """
  init_weights = tf.convert_to_tensor(init_weights)
  if init_weights.dtype not in SUPPORTED_DTYPES:
    # float16 / bfloat16 cannot hold the solver's tolerances: a solve would
    # creep to max_steps before failing.
    raise TypeError(
      f"init_weights must be float32 or float64, got dtype "
      f"{init_weights.dtype.name}."
    )
  dtype = init_weights.dtype
  support_embeddings = tf.convert_to_tensor(support_embeddings)
  if support_embeddings.dtype != dtype:
    raise TypeError(
      f"support_embeddings must have the dtype of init_weights ({dtype.name}),"
      f" got {support_embeddings.dtype.name}."
    )
  support_labels = tf.convert_to_tensor(support_labels)
  # A Python float goes straight to `dtype` (through float32 it loses digits);
  # a tensor of another float dtype is cast.
  t_final = (
    tf.cast(t_final, dtype)
    if tf.is_tensor(t_final)
    else (tf.convert_to_tensor(t_final, dtype=dtype))
  )
  if init_weights.shape.rank != 2:
    raise ValueError(
      f"init_weights must have shape [N, d], got shape {init_weights.shape}."
    )
  if support_embeddings.shape.rank not in (2, 3):
    raise ValueError(
      f"support_embeddings must have shape [M, d] or [B, M, d],"
      f" got shape {support_embeddings.shape}."
    )
  if t_final.shape.rank != 0:
    raise ValueError(f"t_final must be a scalar, got shape {t_final.shape}.")
  _check_static_sizes(init_weights, support_embeddings, t_final)
  return init_weights, support_embeddings, support_labels, t_final


def _shape_checks(init_weights, support_embeddings, labels):
  """`check_equal_dims` of every pair of sizes the inputs share."""
  checks = check_equal_dims(
    "init_weights",
    init_weights,
    -1,
    "support_embeddings",
    support_embeddings,
    -1,
    "embedding size d (last axis)",
  )
  checks += check_equal_dims(
    "support_embeddings",
    support_embeddings,
    -2,
    "support_labels",
    labels,
    -2,
    "number of support examples M",
  )
  checks += check_equal_dims(
    "init_weights",
    init_weights,
    0,
    "support_labels",
    labels,
    -1,
    "number of classes N",
  )
  if support_embeddings.shape.rank == 3:
    checks += check_equal_dims(
      "support_embeddings",
      support_embeddings,
      0,
      "support_labels",
      labels,
      0,
      "number of tasks B (first axis)",
    )
  return checks


def checked(
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  support_labels: tf.Tensor,
  t_final: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The inputs' values checked at run time, and the labels as distributions.

  Args:
    init_weights, support_embeddings, support_labels, t_final: as returned
      by `as_tensors`.

  Returns:
    (support_embeddings, computed after the checks; labels [M, N] or
    [B, M, N] of the embeddings' dtype; runnable: bool scalar, the inputs
    are good, which is what the checks assert: under XLA, which compiles
    assertions away, the caller uses it instead).
  """
  num_classes = tf.shape(init_weights)[0]
  if init_weights.shape[0] is not None:
    num_classes = init_weights.shape[0]
  labels, checks, valid = _label_distributions(
    support_labels,
    num_classes,
    init_weights.dtype,
    support_embeddings.shape.rank,
  )
  checks += _shape_checks(init_weights, support_embeddings, labels)
  finite = tf.reduce_all(tf.math.is_finite(support_embeddings)) & tf.reduce_all(
    tf.math.is_finite(init_weights)
  )
  positive_time = (t_final > 0) & tf.math.is_finite(t_final)
  num_examples = tf.shape(support_embeddings)[-2]
  sizes_ok = (num_examples > 0) & (tf.shape(init_weights)[0] >= 2)
  checks += [
    tf.debugging.Assert(
      finite,
      ["support_embeddings and init_weights must be finite (no NaN or Inf)."],
    ),
    tf.debugging.Assert(
      positive_time, ["t_final must be finite and > 0, got", t_final]
    ),
    tf.debugging.Assert(
      sizes_ok,
      [
        "support_embeddings must hold M >= 1 examples per task and "
        "init_weights N >= 2 classes; got M =",
        num_examples,
        "and N =",
        tf.shape(init_weights)[0],
      ],
    ),
  ]
  with tf.control_dependencies(checks):
    support_embeddings = tf.identity(support_embeddings)
  return support_embeddings, labels, valid & finite & positive_time & sizes_ok


def with_one_neutral_if_empty(
  support_embeddings: tf.Tensor, labels: tf.Tensor, axis: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """(X [B, M, d], Y [B, M, N]) with one neutral entry appended along
  `axis` (0: a task, 1: an example) when that axis is empty.

  Neutral: zero embeddings and uniform labels, on which the flow stands
  still. Both tensors unchanged otherwise.
  """
  dtype = support_embeddings.dtype
  padding = tf.maximum(1 - tf.shape(support_embeddings)[axis], 0)

  def padded(tensor, fill):
    shape = tf.tensor_scatter_nd_update(tf.shape(tensor), [[axis]], [padding])
    return tf.concat([tensor, tf.fill(shape, fill)], axis)

  uniform = 1.0 / tf.cast(tf.shape(labels)[-1], dtype)
  return padded(support_embeddings, tf.zeros([], dtype)), padded(
    labels, uniform
  )


def _check_static_sizes(init_weights, support_embeddings, t_final):
  """Raises ValueError on sizes and times known bad when tracing.

  The runtime assertions of `adapt` catch the same cases when they are only
  known at run time.
  """
  num_classes = _static_dim(init_weights, 0)
  if num_classes is not None and num_classes < 2:
    raise ValueError(
      f"init_weights must have N >= 2 rows (classes), got "
      f"shape {init_weights.shape}."
    )
  if _static_dim(support_embeddings, -2) == 0:
    raise ValueError(
      f"support_embeddings must hold M >= 1 examples per task "
      f"(axis -2), got shape {support_embeddings.shape}."
    )
  value = tf.get_static_value(t_final)
  if value is not None and not 0 < float(value) < float("inf"):
    raise ValueError(f"t_final must be finite and > 0, got {float(value)}.")


def check_task_labels(
  support_labels: tf.Tensor, num_ways: int | tf.Tensor
) -> list[tf.Operation | None]:
  """Runtime checks that integer labels form tasks of `num_ways` classes.

  For classifiers whose number of classes comes from the labels (tied
  rows): every class 0..N-1 must appear in every task, so N <= M.

  Args:
    support_labels: int [B, M] (or [M]).
    num_ways: int scalar (tensor or Python int), N.

  Returns:
    List of assertion ops (run them before using the labels).
  """
  support_labels = tf.convert_to_tensor(support_labels)
  if not support_labels.dtype.is_integer:
    raise TypeError(
      f"support_labels must be integer class indices, got "
      f"dtype {support_labels.dtype.name}."
    )
  labels = tf.reshape(support_labels, [-1, tf.shape(support_labels)[-1]])
  num_ways = tf.cast(num_ways, tf.int32)
  num_examples = tf.shape(labels)[-1]
  low = tf.reduce_min(labels)
  size_check = tf.debugging.Assert(
    (num_ways <= num_examples) & (tf.cast(low, tf.int64) >= 0),
    [
      "support_labels must be classes 0..N-1, each in every task, so "
      "0 <= label and N = max(label) + 1 <= M; got N =",
      num_ways,
      "M =",
      num_examples,
      "min(label) =",
      low,
    ],
    summarize=16,
  )
  # After the size check: the one-hot below is sized by N.
  with tf.control_dependencies([size_check]):
    counts = tf.reduce_sum(
      tf.one_hot(tf.cast(labels, tf.int32), num_ways, dtype=tf.int32), axis=-2
    )
    present = tf.debugging.Assert(
      tf.reduce_all(counts > 0),
      [
        "every class 0..N-1 must appear in the support_labels of every "
        "task; N =",
        num_ways,
        "classes missing per task (1 = missing):",
        tf.cast(tf.equal(counts, 0), tf.int32),
      ],
      summarize=64,
    )
  return [size_check, present]
