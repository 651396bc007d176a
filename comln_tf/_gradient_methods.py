"""How the meta-gradient of the adapted weights is computed: strategy objects.

All methods compute the same adapted weights W(T) = W0 - s(T)^T X (up to the
solver tolerance) and differ only in how `tf.GradientTape` differentiates
them with respect to W0, the support embeddings X and t_final:

* `Forward`: the paper's algorithm. The solve carries the forward
  sensitivities of s with respect to L0 = X W0^T and G = X X^T; the
  vector-Jacobian product is assembled at T. Memory does not depend on T
  (the loop state has a fixed size) nor on d.
* `Backprop`: the tape differentiates through the solver's steps
  (discretise-then-differentiate); memory grows with the number of steps.
  Its step control also watches one probe tangent, so that the steps it
  differentiates are accurate for the linearized flow too. With
  `tangent_control=False` it is the plain solve of s: the cheapest way to
  adapt at inference.
* `Adjoint`: the continuous adjoint, solving s backwards from s(T) together
  with the adjoint state; constant memory, numerically fragile for long T.

Shapes inside: W0 [N, d], X [B, M, d], Y [B, M, N] label distributions,
t_final a scalar; every tensor of one float dtype.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from comln_tf import _reduced
from comln_tf import _solvers


def _logits_and_gram(init_weights, support_embeddings):
  """L0 = X W0^T [B, M, N] and G = X X^T [B, M, M]."""
  logits0 = tf.einsum("bmd,nd->bmn", support_embeddings, init_weights)
  gram = tf.matmul(support_embeddings, support_embeddings, transpose_b=True)
  return logits0, gram


def state_error_weight(support_embeddings, gram):
  """How much an error of the reduced state s can weigh in W: [B], >= 1.

  W = W0 - s^T X, so an error e of s [M, N] is the error -e^T X of the
  weights [N, d], and |e^T X|_F <= |e|_F |X|_2 <= |e|_F |X|_F. In RMS over
  the entries, rms(e^T X) <= rms(e) |X|_F sqrt(M / d). Controlling the
  solver's error on s alone leaves W's error free to grow with the
  embeddings' scale (on embeddings of norm 800, a solve accepted within
  rtol = atol = 1e-5 on s was wrong by 2,000% in W). The solvers control
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


def _weights_from_state(init_weights, support_embeddings, s):
  """W = W0 - s^T X: [B, N, d]."""
  return init_weights[None] - tf.matmul(s, support_embeddings, transpose_a=True)


def _vjp(
  init_weights,
  support_embeddings,
  logits0,
  gram,
  labels,
  t_final,
  s_final,
  d_weights,
  d_state,
  d_logits0,
  d_gram_sym,
):
  """Gradients of the loss with respect to (W0, X, t_final).

  Given dL/dW(T), dL/ds(T), dL/dL0 and dL/dG + (dL/dG)^T (the latter two
  through s), chains through W(T) = W0 - s^T X, L0 = X W0^T and G = X X^T.

  Args:
    init_weights: [N, d]. support_embeddings: [B, M, d].
    logits0: [B, M, N], L0. gram: [B, M, M], G (the forward's: recomputing
      G costs as much as the plain solve's own product at 20-way 5-shot).
    labels: [B, M, N]. t_final: scalar. s_final: [B, M, N], s(T).
    d_weights: [B, N, d]. d_state: [B, M, N], `_state_cotangent` of
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


def _state_cotangent(support_embeddings, d_weights):
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
    solver: _solvers.Solver,
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


def _unwatched(*tensors):
  """The tensors, cut from any tape, for the body of a tf.custom_gradient.

  In eager mode a `tf.custom_gradient` function runs with the caller's
  tapes still recording, so every op of the solve (thousands of loop
  iterations) and its inputs would be kept alive until the tape is done:
  memory growing with T, the very thing the method avoids. Ops on tensors
  no tape watches are not recorded; the custom gradient links the outputs
  to the original inputs.
  """
  return [tf.stop_gradient(t) for t in tensors]


def _zero_state(support_embeddings, labels):
  return tf.zeros(tf.shape(labels), support_embeddings.dtype)


def _probe_direction(logits0, gram):
  """A fixed pseudo-random direction (dL0 [M, N], dG [M, M]), every task's.

  Entries are standard normal (dG symmetrised), divided by sqrt(K), the
  number of independent entries, so that the probe tangent has the size of
  one of the forward method's unit sensitivities. A fixed seed: the same
  inputs always give the same steps. With static M and N the direction is
  a constant of the graph: drawing it per call cost 6 ms per meta-batch at
  20-way 5-shot (16 tasks), 60% of the plain solve.
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


@dataclasses.dataclass(frozen=True)
class Backprop(GradientMethod):
  """Differentiate through the solver steps (the reference engine).

  The tape differentiates the discrete solution for the steps the solver
  chose; that derivative is the solver's solution of the linearized flow
  (the tangents) on the same steps. Step control on s alone does not keep
  it accurate: at large T a step that is accurate for s can amplify the
  tangents without bound (1e15 times the true gradient on a trained
  20-way episode at T = 2e4, see README). So by default the solve also
  carries one probe tangent, ds/dtheta along a fixed random direction of
  theta = (L0, G), under the same error control: a step that would amplify
  the linearized flow is rejected, as in the forward method, whose K
  sensitivities are all controlled. The probe is cut from the tape; it
  costs 20-45% more time per meta-gradient and no memory (README, Engine
  benchmark).

  Attributes:
    tangent_control: carry the probe tangent (True) or control s alone
      (False: cheaper, for a plain solve with no gradient, e.g. inference).
  """

  tangent_control: bool = True
  name = "backprop"

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    logits0, gram = _logits_and_gram(init_weights, support_embeddings)
    s0 = _zero_state(support_embeddings, labels)
    field_of = lambda s: _reduced.reduced_vector_field(s, logits0, gram, labels)
    error_weight = state_error_weight(support_embeddings, gram)
    if not self.tangent_control:
      s_final, stats = solver.integrate(
        field_of, s0, t_final, max_steps, error_weight
      )
      return _weights_from_state(
        init_weights, support_embeddings, s_final
      ), stats
    fixed_logits0, fixed_gram = _unwatched(logits0, gram)
    probe_logits0, probe_gram = (
      tf.broadcast_to(direction, tf.shape(fixed))
      for direction, fixed in zip(
        _probe_direction(fixed_logits0, fixed_gram),
        (fixed_logits0, fixed_gram),
      )
    )

    def vector_field(state):
      s, probe = state
      # The probe only steers the step control: it is computed from
      # tensors cut from the tape, so no gradient flows through it. (One
      # evaluation under the accumulator on the watched tensors, with the
      # probe's JVP cut by tf.stop_gradient, gave wrong tape gradients in
      # this solver, errors of 50-90% on synthetic tasks; the cause was not
      # isolated.)
      fixed_s, probe = _unwatched(s, probe)
      with tf.autodiff.ForwardAccumulator(
        primals=(fixed_s, fixed_logits0, fixed_gram),
        tangents=(probe, probe_logits0, probe_gram),
      ) as accumulator:
        fixed_field = _reduced.reduced_vector_field(
          fixed_s, fixed_logits0, fixed_gram, labels
        )
      # tf.stop_gradient on the JVP too: without it tf2xla fails to build
      # the gradient of the solver's conditional around this function.
      return field_of(s), tf.stop_gradient(accumulator.jvp(fixed_field))

    (s_final, _), stats = solver.integrate(
      vector_field, (s0, s0), t_final, max_steps, error_weight
    )
    return _weights_from_state(init_weights, support_embeddings, s_final), stats


@dataclasses.dataclass(frozen=True)
class Forward(GradientMethod):
  """Forward-mode sensitivities integrated with s (Deleu et al. 2022).

  Attributes:
    tangent_field: "closed_form" (fast, hand-derived for cross-entropy) or
      "accumulator" (`tf.autodiff.ForwardAccumulator` on the vector field;
      follows any change of the inner loss). Both give the same result.
  """

  tangent_field: str = "closed_form"
  name = "forward"

  def __post_init__(self):
    if self.tangent_field not in _reduced.TANGENT_FIELDS:
      raise ValueError(
        f"tangent_field must be one of {sorted(_reduced.TANGENT_FIELDS)}, "
        f"got {self.tangent_field!r}."
      )

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    tangent_field = _reduced.TANGENT_FIELDS[self.tangent_field]

    @tf.custom_gradient
    def adapt_with_sensitivities(init_weights, support_embeddings, t_final):
      init_weights, support_embeddings, t_final = _unwatched(
        init_weights, support_embeddings, t_final
      )
      logits0, gram = _logits_and_gram(init_weights, support_embeddings)
      s0 = _zero_state(support_embeddings, labels)
      batch, num_examples, num_classes = tf.unstack(tf.shape(s0))
      # The solve carries N - 1 classes of each tangent (the last is minus
      # their sum, see _reduced.drop_last_class): 20% less memory at N = 5.
      tangents0 = tf.zeros(
        [
          batch,
          num_examples,
          _reduced.num_directions(num_examples, num_classes),
          num_classes - 1,
        ],
        s0.dtype,
      )

      def vector_field(state):
        s, tangents = state
        return (
          _reduced.reduced_vector_field(s, logits0, gram, labels),
          tangent_field(s, tangents, logits0, gram, labels),
        )

      (s_final, tangents_final), stats = solver.integrate(
        vector_field,
        (s0, tangents0),
        t_final,
        max_steps,
        state_error_weight(support_embeddings, gram),
      )
      tangents_final = _reduced.restore_last_class(tangents_final)
      weights = _weights_from_state(init_weights, support_embeddings, s_final)

      def grad(d_weights, *unused_stat_grads):
        d_state = _state_cotangent(support_embeddings, d_weights)
        d_logits0, d_gram_sym = _reduced.contract_sensitivities(
          tangents_final, d_state
        )
        return _vjp(
          init_weights,
          support_embeddings,
          logits0,
          gram,
          labels,
          t_final,
          s_final,
          d_weights,
          d_state,
          d_logits0,
          d_gram_sym,
        )

      # Every field, as tensors: TFP's BDF also counts Jacobians.
      return (weights,) + tuple(
        tf.nest.map_structure(tf.convert_to_tensor, stats)
      ), grad

    weights, *stats = adapt_with_sensitivities(
      init_weights, support_embeddings, t_final
    )
    return weights, _solvers.SolveStats(*stats)


@dataclasses.dataclass(frozen=True)
class Adjoint(GradientMethod):
  """Continuous adjoint: solve backwards from T for s and its adjoint.

  The backward solve recomputes s(t) from s(T) by integrating the flow in
  reverse, which is gradient ascent on the support loss: errors grow, and
  for long T the gradient is inaccurate (the paper's Fig. 2).
  """

  name = "adjoint"

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):

    @tf.custom_gradient
    def adapt_with_adjoint(init_weights, support_embeddings, t_final):
      init_weights, support_embeddings, t_final = _unwatched(
        init_weights, support_embeddings, t_final
      )
      logits0, gram = _logits_and_gram(init_weights, support_embeddings)
      s_final, stats = solver.integrate(
        lambda s: _reduced.reduced_vector_field(s, logits0, gram, labels),
        _zero_state(support_embeddings, labels),
        t_final,
        max_steps,
        state_error_weight(support_embeddings, gram),
      )
      weights = _weights_from_state(init_weights, support_embeddings, s_final)

      def grad(d_weights, *unused_stat_grads):
        # Recomputed here: the forward's tensors belong to its own solve.
        logits0, gram = _logits_and_gram(init_weights, support_embeddings)

        def reversed_field(state):
          s, adjoint_s, _, _ = state
          with tf.GradientTape() as tape:
            tape.watch([s, logits0, gram])
            field = _reduced.reduced_vector_field(s, logits0, gram, labels)
          vjps = tape.gradient(
            field, [s, logits0, gram], output_gradients=adjoint_s
          )
          # Time runs from T down to 0: ds/d(-t) = -f, and the adjoints
          # accumulate +a^T df/d(s, L0, G).
          return (-field, vjps[0], vjps[1], vjps[2])

        d_state = _state_cotangent(support_embeddings, d_weights)
        (_, _, d_logits0, d_gram), backward_stats = solver.integrate(
          reversed_field,
          (s_final, d_state, tf.zeros_like(logits0), tf.zeros_like(gram)),
          t_final,
          max_steps,
        )
        d_logits0 = poison_unless(backward_stats.finished, d_logits0)
        d_gram_sym = d_gram + tf.linalg.matrix_transpose(d_gram)
        return _vjp(
          init_weights,
          support_embeddings,
          logits0,
          gram,
          labels,
          t_final,
          s_final,
          d_weights,
          d_state,
          d_logits0,
          d_gram_sym,
        )

      return (weights, stats.num_evals, stats.num_steps, stats.finished), grad

    weights, num_evals, num_steps, finished = adapt_with_adjoint(
      init_weights, support_embeddings, t_final
    )
    return weights, _solvers.SolveStats(num_evals, num_steps, finished)


def poison_unless(ok, value):
  """`value` where `ok`, NaN otherwise: a failed solve never looks valid.

  Needed under XLA, which compiles away `tf.debugging` assertions.
  """
  return tf.where(
    ok, value, tf.fill(tf.shape(value), tf.constant(float("nan"), value.dtype))
  )


# Name -> a callable returning the method with its default settings.
# comln_tf._discrete_adjoint adds "discrete_adjoint" and "auto" when
# comln_tf is imported (it builds on this module).
METHODS = {"forward": Forward, "backprop": Backprop, "adjoint": Adjoint}


def make_method(method) -> GradientMethod:
  """Returns the GradientMethod named by `method` (or `method` itself)."""
  if isinstance(method, GradientMethod):
    return method
  if method in METHODS:
    return METHODS[method]()
  raise ValueError(
    f"method must be one of {sorted(METHODS)} or a comln_tf GradientMethod, "
    f"got {method!r}."
  )
