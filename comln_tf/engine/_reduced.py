"""The gradient flow in reduced coordinates and its forward sensitivities.

Per task, with support embeddings X [M, d], labels Y [M, N] and the initial
classifier W0 [N, d], the classifier follows the gradient flow of the mean
support cross-entropy. Writing W(t) = W0 - s(t)^T X turns it into an ODE on
s [M, N] alone (`reduced_vector_field`), where X enters only through
L0 = X W0^T [M, N] and the Gram matrix G = X X^T [M, M]; so the cost of the
flow does not depend on the embedding size d.

The forward method also integrates the sensitivities of s with respect to L0
and G. They are the directional derivatives (JVPs) of the same vector field:
    d/dt (ds/dtheta) = J_s f . ds/dtheta + J_theta f,    theta in {L0, G}.
Directions, K = M (N - 1) + M (M + 1) / 2 of them per task:
  * L0 directions k = (i, n), i in [0, M), n in [0, N - 1): dL0 = e_i e_n^T
    (the softmax ignores a shift of a row of logits, so the direction
    e_i 1^T has zero effect and (i, N - 1) is minus the sum of the others);
  * G directions k = (m, j), m <= j: dG = e_m e_j^T + e_j e_m^T (G is
    symmetric, so the M (M - 1) / 2 others are redundant).
Tangents are stored as one tensor [B, M, K, N - 1] (task, example,
direction, class; the last class is implied, see `drop_last_class`) so that
J_s f applied to all directions is one batched matmul with G.

Two interchangeable ways compute the tangent field (`TANGENT_FIELDS`):
  * "accumulator": `tf.autodiff.ForwardAccumulator` applied to
    `reduced_vector_field`, vectorised over the K directions with
    `tf.vectorized_map`. It needs no derivation: change the inner loss in
    `reduced_vector_field` and the sensitivities follow.
  * "closed_form": the same JVP written by hand for the cross-entropy loss,
    using the structure of the directions (the L0 directions force with the
    identity, the G directions with rows of s) instead of dense tangents. It
    is the fast path; tests prove it equal to "accumulator" to 1e-10 in
    float64.
"""

import tensorflow as tf

# Per task, the most multiply-adds for which `gram_matmul` uses a broadcast
# product instead of a dot.
_SMALL_PRODUCT = 256


def gram_matmul(gram: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  """G @ x for a batch of small Gram matrices: [B, M, M] x [B, M, C].

  XLA's CPU backend runs tiny batched dots through a generic loop, while
  the same product written as a broadcast multiply and a sum is fused with
  its neighbours. For larger products the dot is as fast or faster, and a
  broadcast product that feeds several consumers is recomputed in each
  fusion, so only products of at most _SMALL_PRODUCT multiply-adds per task
  (static shapes) take the broadcast form (docs/benchmarks.md).

  Args:
    gram: [B, M, M]. x: [B, M, C], same dtype.

  Returns:
    [B, M, C].
  """
  num_examples, columns = gram.shape[-1], x.shape[-1]
  if (
    num_examples is not None
    and columns is not None
    and num_examples * num_examples * columns <= _SMALL_PRODUCT
  ):
    return tf.reduce_sum(gram[..., :, :, None] * x[..., None, :, :], axis=-2)
  return tf.matmul(gram, x)


def reduced_vector_field(
  s: tf.Tensor, logits0: tf.Tensor, gram: tf.Tensor, labels: tf.Tensor
) -> tf.Tensor:
  """ds/dt of the support gradient flow in reduced coordinates.

  The one definition of the inner problem: the gradient of the mean support
  loss with respect to the support logits L0 - G s, divided by M (the loss is
  the mean over M examples). Every gradient method integrates this function.

  Args:
    s: [B, M, N] reduced state.
    logits0: [B, M, N], L0 = X W0^T.
    gram: [B, M, M], G = X X^T.
    labels: [B, M, N] label distributions (one-hot or smoothed).

  Returns:
    [B, M, N], same dtype as s.
  """
  logits = logits0 - gram_matmul(gram, s)
  num_examples = tf.cast(tf.shape(s)[-2], s.dtype)
  return residual(tf.nn.softmax(logits, axis=-1), labels) / num_examples


def residual(probs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """P - Y row by row, with each row summing to zero as it should.

  Both P and Y sum to 1 over classes, so P - Y sums to 0: the flow never
  moves all rows of W together (a shift the softmax ignores). Computed as
  P - Y, the most probable class's entry is 1 - 1 plus rounding once its
  probability is within float32's epsilon of 1 (margins above about 16):
  the row sums to the other classes' probabilities, and over a long solve W
  drifts along that shift (by 10 times its size at T = 1000 on large
  embeddings). So that entry is computed as minus the sum of the others,
  which are small and exact. Mathematically the same function, with the
  same derivatives.

  Args:
    probs: [..., N] softmax probabilities. labels: [..., N] label
      distributions (rows summing to 1).

  Returns:
    [..., N], of probs' dtype.
  """
  top = tf.one_hot(
    tf.argmax(probs, axis=-1), tf.shape(probs)[-1], dtype=probs.dtype
  )
  others = (probs - labels) * (1.0 - top)
  return others - top * tf.reduce_sum(others, axis=-1, keepdims=True)


def gram_directions(num_examples: int | tf.Tensor) -> tf.Tensor:
  """Indices (m, j), m <= j, of the symmetric G directions: int32 [K_G, 2]."""
  upper = tf.linalg.band_part(tf.ones([num_examples, num_examples]), 0, -1)
  return tf.cast(tf.where(upper > 0), tf.int32)


def _logit0_forcing(num_examples, num_classes, dtype):
  """d(logits)/d(L0) for every L0 direction: [M, M (N - 1), N].

  Entry [r, (i, n), c] = 1 if r == i and c == n: direction (i, n), n < N - 1,
  moves only the logit of example i and class n.
  """
  classes = num_classes - 1
  size = num_examples * classes
  eye = tf.reshape(
    tf.eye(size, dtype=dtype), [num_examples, classes, num_examples, classes]
  )
  eye = tf.reshape(
    tf.transpose(eye, [0, 2, 3, 1]), [num_examples, size, classes]
  )
  return tf.pad(eye, [[0, 0], [0, 0], [0, 1]])


def _closed_form_tangent_field(s, tangents, logits0, gram, labels):
  """The JVP of `reduced_vector_field` for cross-entropy, by hand.

  Works on the first N - 1 classes only (see `drop_last_class`), so no
  tensor of the full tangent size is ever formed: the last class of G @ T
  is minus the sum of the others, and so is the last class of T.

  Args:
    s: [B, M, N] reduced state.
    tangents: [B, M, K, N - 1], ds/dtheta for the K directions, last class
      dropped.
    logits0, gram, labels: as in `reduced_vector_field`.

  Returns:
    [B, M, K, N - 1], d(tangents)/dt.
  """
  del labels  # The softmax Jacobian does not depend on them.
  batch, num_examples, num_classes = tf.unstack(tf.shape(s))
  num_directions = tf.shape(tangents)[2]
  probs = tf.nn.softmax(logits0 - gram_matmul(gram, s), axis=-1)
  # Forcing of the logits by each direction: the identity for L0 directions,
  # -(e_m s_j^T + e_j s_m^T) for the G direction (m, j). Built separately
  # for the first N - 1 classes and the last, each used once, so that XLA
  # fuses it into its consumer instead of keeping a full-size tensor.
  pairs = gram_directions(num_examples)
  rows_m = tf.one_hot(pairs[:, 0], num_examples, axis=0, dtype=s.dtype)
  rows_j = tf.one_hot(pairs[:, 1], num_examples, axis=0, dtype=s.dtype)
  logit0_forcing = _logit0_forcing(num_examples, num_classes, s.dtype)

  def forcing(classes):
    s_part = s[..., classes]
    s_at_j = tf.gather(s_part, pairs[:, 1], axis=1)[:, None]  # [B,1,K_G,C]
    s_at_m = tf.gather(s_part, pairs[:, 0], axis=1)[:, None]
    gram_forcing = -(
      rows_m[None, :, :, None] * s_at_j + rows_j[None, :, :, None] * s_at_m
    )  # [B, M, K_G, C]
    eye_part = logit0_forcing[..., classes]
    return tf.concat(
      [
        tf.broadcast_to(
          eye_part[None], tf.concat([[batch], tf.shape(eye_part)], 0)
        ),
        gram_forcing,
      ],
      axis=2,
    )

  # G @ tangents as one matmul over all directions and classes.
  flat = tf.reshape(tangents, [batch, num_examples, -1])
  coupled = tf.reshape(
    gram_matmul(gram, flat),
    [batch, num_examples, num_directions, num_classes - 1],
  )
  dlogits = forcing(slice(None, -1)) - coupled
  dlogits_last = forcing(slice(-1, None)) + tf.reduce_sum(
    coupled, -1, keepdims=True
  )
  # Softmax Jacobian row by row, (A_i v)_c = p_c (v_c - p_i . v), in O(N).
  p = probs[:, :, None, :]
  p_dot_v = tf.reduce_sum(p[..., :-1] * dlogits, axis=-1, keepdims=True) + (
    p[..., -1:] * dlogits_last
  )
  return p[..., :-1] * (dlogits - p_dot_v) / tf.cast(num_examples, s.dtype)


def _direction_tangents(num_examples, num_classes, dtype):
  """Dense tangents (dL0 [K, M, N], dG [K, M, M]) of all K directions."""
  size = num_examples * (num_classes - 1)
  pairs = gram_directions(num_examples)
  num_gram = tf.shape(pairs)[0]
  d_logits0 = tf.concat(
    [
      tf.pad(
        tf.reshape(
          tf.eye(size, dtype=dtype), [size, num_examples, num_classes - 1]
        ),
        [[0, 0], [0, 0], [0, 1]],
      ),
      tf.zeros([num_gram, num_examples, num_classes], dtype),
    ],
    axis=0,
  )
  rows_m = tf.one_hot(pairs[:, 0], num_examples, dtype=dtype)  # [K_G, M]
  rows_j = tf.one_hot(pairs[:, 1], num_examples, dtype=dtype)
  d_gram = tf.concat(
    [
      tf.zeros([size, num_examples, num_examples], dtype),
      rows_m[:, :, None] * rows_j[:, None, :]
      + rows_j[:, :, None] * rows_m[:, None, :],
    ],
    axis=0,
  )
  return d_logits0, d_gram


def _accumulator_tangent_field(s, tangents, logits0, gram, labels):
  """The JVP of `reduced_vector_field` by `tf.autodiff.ForwardAccumulator`.

  Same arguments and result as `_closed_form_tangent_field`.
  """
  tangents = restore_last_class(tangents)
  num_examples, num_classes = tf.unstack(tf.shape(s))[1:]
  d_logits0, d_gram = _direction_tangents(num_examples, num_classes, s.dtype)

  def one_direction(direction):
    ds, dl0, dg = direction
    with tf.autodiff.ForwardAccumulator(
      primals=(s, logits0, gram),
      tangents=(
        ds,
        tf.broadcast_to(dl0, tf.shape(logits0)),
        tf.broadcast_to(dg, tf.shape(gram)),
      ),
    ) as accumulator:
      field = reduced_vector_field(s, logits0, gram, labels)
    return accumulator.jvp(field)

  # The primal does not depend on the direction, so vectorized_map computes
  # it once and batches only the tangent computation.
  per_direction = tf.vectorized_map(
    one_direction, (tf.transpose(tangents, [2, 0, 1, 3]), d_logits0, d_gram)
  )
  return drop_last_class(tf.transpose(per_direction, [1, 2, 0, 3]))


TANGENT_FIELDS = {
  "closed_form": _closed_form_tangent_field,
  "accumulator": _accumulator_tangent_field,
}


def num_directions(
  num_examples: int | tf.Tensor, num_classes: int | tf.Tensor
) -> int | tf.Tensor:
  """K = M (N - 1) + M (M + 1) / 2, the sensitivity directions per task."""
  return (
    num_examples * (num_classes - 1) + num_examples * (num_examples + 1) // 2
  )


def drop_last_class(tangents: tf.Tensor) -> tf.Tensor:
  """[..., N] -> [..., N - 1]: the class axis without its last entry.

  Every tangent sums to zero over classes at all times: it starts at zero,
  and its time derivative is a JVP of the loss gradient with respect to the
  logits, which sums to zero over classes for any loss of softmax
  probabilities (the softmax ignores a shift of all logits; for
  cross-entropy, 1^T A_i = 0). So the last class is redundant.
  """
  return tangents[..., :-1]


def restore_last_class(tangents: tf.Tensor) -> tf.Tensor:
  """[..., N - 1] -> [..., N], the last class minus the sum of the others."""
  return tf.concat(
    [tangents, -tf.reduce_sum(tangents, -1, keepdims=True)], axis=-1
  )


def contract_sensitivities(
  tangents: tf.Tensor, cotangent_s: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """Turns sensitivities and dL/ds(T) into dL/dL0 and dL/dG.

  Args:
    tangents: [B, M, K, N], ds(T)/dtheta for the K directions.
    cotangent_s: [B, M, N], dL/ds(T).

  Returns:
    (dL/dL0 [B, M, N], the symmetric dL/dG + (dL/dG)^T [B, M, M]).
  """
  batch, num_examples, num_classes = tf.unstack(tf.shape(cotangent_s))
  per_direction = tf.einsum("bin,bikn->bk", cotangent_s, tangents)
  size = num_examples * (num_classes - 1)
  d_logits0 = restore_last_class(
    tf.reshape(per_direction[:, :size], [batch, num_examples, num_classes - 1])
  )
  # Direction (m, j) perturbs G[m, j] and G[j, m] (twice G[m, m] when m = j),
  # so its derivative is exactly entry (m, j) of dL/dG + (dL/dG)^T.
  pairs = gram_directions(num_examples)
  upper = tf.scatter_nd(
    pairs,
    tf.transpose(per_direction[:, size:]),
    [num_examples, num_examples, batch],
  )
  upper = tf.transpose(upper, [2, 0, 1])
  d_gram_sym = (
    upper
    + tf.linalg.matrix_transpose(upper)
    - tf.linalg.diag(tf.linalg.diag_part(upper))
  )
  return d_logits0, d_gram_sym
