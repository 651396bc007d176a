"""The gradient method interface and the helpers its methods share.

All methods compute the same adapted weights W(T) = W0 - s(T)^T X (up to the
solver tolerance) and differ only in how `tf.GradientTape` differentiates
them with respect to W0, the support embeddings X and t_final.

Shapes inside: W0 [N, d], X [B, M, d], Y [B, M, N] label distributions,
t_final a scalar; every tensor of one float dtype.
"""

import numpy as np
import tensorflow as tf

from comln_tf.engine import _reduced
from comln_tf.engine.solvers import _solver


def logits_and_gram(
  init_weights: tf.Tensor, support_embeddings: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """L0 = X W0^T [B, M, N] and G = X X^T [B, M, M]."""
  logits0 = tf.einsum("bmd,nd->bmn", support_embeddings, init_weights)
  gram = tf.matmul(support_embeddings, support_embeddings, transpose_b=True)
  return logits0, gram


def state_error_weight(
  support_embeddings: tf.Tensor, gram: tf.Tensor
) -> tf.Tensor:
  """How much an error of the reduced state s can weigh in W: [B], >= 1.

  W = W0 - s^T X, so an error e of s [M, N] is the error -e^T X of the
  weights [N, d], and |e^T X|_F <= |e|_F |X|_2 <= |e|_F |X|_F. In RMS over
  the entries, rms(e^T X) <= rms(e) |X|_F sqrt(M / d). Controlling the
  solver's error on s alone leaves W's error free to grow with the
  embeddings' scale (on embeddings of norm 800, a solve accepted within
  rtol = atol = 1e-5 on s can be wrong by 2,000% in W). The solvers control
  the error of s times this factor instead, so the tolerances hold for the
  adapted weights; it is never below 1, so s itself (which the gradient
  with respect to X also uses) stays within them too. Cut from the tape:
  it only chooses step sizes.

  Args:
    support_embeddings: [B, M, d]. gram: [B, M, M], X X^T.

  Returns:
    [B], of the embeddings' dtype.
  """
  dtype = gram.dtype
  num_examples = tf.cast(tf.shape(gram)[-1], dtype)
  size = tf.cast(tf.shape(support_embeddings)[-1], dtype)
  squared_norm = tf.linalg.trace(tf.stop_gradient(gram))  # |X|_F^2
  return tf.maximum(
    tf.sqrt(squared_norm * num_examples / tf.maximum(size, 1.0)),
    tf.ones([], dtype),
  )


def weights_from_state(
  init_weights: tf.Tensor, support_embeddings: tf.Tensor, s: tf.Tensor
) -> tf.Tensor:
  """W = W0 - s^T X: [B, N, d]."""
  return init_weights[None] - tf.matmul(s, support_embeddings, transpose_a=True)


def vjp(
  init_weights: tf.Tensor,
  support_embeddings: tf.Tensor,
  logits0: tf.Tensor,
  gram: tf.Tensor,
  labels: tf.Tensor,
  t_final: tf.Tensor,
  s_final: tf.Tensor,
  d_weights: tf.Tensor,
  d_state: tf.Tensor,
  d_logits0: tf.Tensor,
  d_gram_sym: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Gradients of the loss with respect to (W0, X, t_final).

  Given dL/dW(T), dL/ds(T), dL/dL0 and dL/dG + (dL/dG)^T (the latter two
  through s), chains through W(T) = W0 - s^T X, L0 = X W0^T and G = X X^T.

  Args:
    init_weights: [N, d]. support_embeddings: [B, M, d].
    logits0: [B, M, N], L0. gram: [B, M, M], G (the forward's, not
      recomputed: G is as costly as a product of the plain solve).
    labels: [B, M, N]. t_final: scalar. s_final: [B, M, N], s(T).
    d_weights: [B, N, d]. d_state: [B, M, N], `state_cotangent` of
    d_weights. d_logits0: [B, M, N]. d_gram_sym: [B, M, M].

  Returns:
    (dL/dW0 [N, d], dL/dX [B, M, d], dL/dT scalar).
  """
  d_init = tf.reduce_sum(d_weights, 0) + tf.reduce_sum(
    tf.matmul(d_logits0, support_embeddings, transpose_a=True), 0
  )
  d_support = (
    -tf.matmul(s_final, d_weights)
    + tf.einsum("bmn,nd->bmd", d_logits0, init_weights)
    + tf.matmul(d_gram_sym, support_embeddings)
  )
  # dW/dT = -f(s(T))^T X, so dL/dT = <dL/ds(T), f(s(T))>.
  d_time = tf.reduce_sum(
    d_state * _reduced.reduced_vector_field(s_final, logits0, gram, labels)
  )
  return d_init, d_support, tf.reshape(d_time, tf.shape(t_final))


def state_cotangent(
  support_embeddings: tf.Tensor, d_weights: tf.Tensor
) -> tf.Tensor:
  """dL/ds(T) = -X dL/dW(T)^T: [B, M, N]."""
  return -tf.matmul(support_embeddings, d_weights, transpose_b=True)


class GradientMethod:
  """Base class of the gradient methods: a strategy object for `adapt`."""

  name = "method"

  def __call__(
    self,
    init_weights,
    support_embeddings,
    labels,
    t_final,
    solver: _solver.Solver,
    max_steps: int,
  ):
    """Adapts the weights of a batch of tasks.

    Args:
      init_weights: [N, d]. support_embeddings: [B, M, d].
      labels: [B, M, N] label distributions. t_final: scalar > 0.
      solver: the ODE solver. max_steps: most solver steps allowed.

    Returns:
      (weights [B, N, d], SolveStats of the forward solve).
    """
    raise NotImplementedError


def unwatched(*tensors: tf.Tensor) -> list[tf.Tensor]:
  """The tensors, cut from any tape, for the body of a tf.custom_gradient.

  In eager mode a `tf.custom_gradient` function runs with the caller's
  tapes still recording, so every op of the solve (thousands of loop
  iterations) and its inputs would be kept alive until the tape is done:
  memory growing with T, the very thing the method avoids. Ops on tensors
  no tape watches are not recorded; the custom gradient links the outputs
  to the original inputs.
  """
  return [tf.stop_gradient(t) for t in tensors]


def zero_state(support_embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """s(0) = 0: [B, M, N], of the embeddings' dtype."""
  return tf.zeros(tf.shape(labels), support_embeddings.dtype)


def probe_direction(
  logits0: tf.Tensor, gram: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """A fixed pseudo-random direction (dL0 [M, N], dG [M, M]), every task's.

  Entries are standard normal (dG symmetrised), divided by sqrt(K), the
  number of independent entries, so that the probe tangent has the size of
  one of the forward method's unit sensitivities. A fixed seed: the same
  inputs always give the same steps. With static M and N the direction is
  a constant of the graph, not drawn again at every call.
  """
  num_examples, num_classes = logits0.shape[-2], logits0.shape[-1]
  dtype = logits0.dtype
  if num_examples is not None and num_classes is not None:
    rng = np.random.default_rng(17)
    d_logits0 = tf.constant(
      rng.standard_normal((num_examples, num_classes)), dtype
    )
    upper = tf.constant(
      np.triu(rng.standard_normal((num_examples, num_examples))), dtype
    )
  else:
    num_examples, num_classes = tf.unstack(tf.shape(logits0)[1:])
    d_logits0 = tf.random.stateless_normal(
      [num_examples, num_classes], seed=[17, 0], dtype=dtype
    )
    upper = tf.linalg.band_part(
      tf.random.stateless_normal(
        [num_examples, num_examples], seed=[17, 1], dtype=dtype
      ),
      0,
      -1,
    )
  d_gram = upper + tf.linalg.matrix_transpose(upper)
  scale = tf.math.rsqrt(
    tf.cast(_reduced.num_directions(num_examples, num_classes), dtype)
  )
  return d_logits0 * scale, d_gram * scale


def poison_unless(ok: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
  """`value` where `ok`, NaN otherwise: a failed solve never looks valid.

  Needed under XLA, which compiles away `tf.debugging` assertions.
  """
  return tf.where(
    ok, value, tf.fill(tf.shape(value), tf.constant(float("nan"), value.dtype))
  )
