"""Adjoint: the continuous adjoint, solving s backwards with its adjoint."""

import dataclasses

import tensorflow as tf

from comln_tf.engine import _reduced
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _solver


def _backward_solve(
  logits0, gram, labels, s_final, d_state, t_final, solver, max_steps
):
  """dL/dL0 and dL/dG + dL/dG^T, by solving from T down to 0.

  Args:
    logits0: [B, M, N]. gram: [B, M, M]. labels: [B, M, N].
    s_final: [B, M, N], s(T). d_state: [B, M, N], dL/ds(T).
    t_final: scalar. solver: the `Solver`. max_steps: Python int.

  Returns:
    (dL/dL0 [B, M, N], NaN if the backward solve did not finish,
    dL/dG + dL/dG^T [B, M, M]).
  """

  def reversed_field(state):
    s, adjoint_s, _, _ = state
    with tf.GradientTape() as tape:
      tape.watch([s, logits0, gram])
      field = _reduced.reduced_vector_field(s, logits0, gram, labels)
    vjps = tape.gradient(field, [s, logits0, gram], output_gradients=adjoint_s)
    # Time runs from T down to 0: ds/d(-t) = -f, and the adjoints
    # accumulate +a^T df/d(s, L0, G).
    return (-field, vjps[0], vjps[1], vjps[2])

  (_, _, d_logits0, d_gram), backward_stats = solver.integrate(
    reversed_field,
    (s_final, d_state, tf.zeros_like(logits0), tf.zeros_like(gram)),
    t_final,
    max_steps,
  )
  d_logits0 = _method.poison_unless(backward_stats.finished, d_logits0)
  return d_logits0, d_gram + tf.linalg.matrix_transpose(d_gram)


@dataclasses.dataclass(frozen=True)
class Adjoint(_method.GradientMethod):
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
      init_weights, support_embeddings, t_final = _method.unwatched(
        init_weights, support_embeddings, t_final
      )
      logits0, gram = _method.logits_and_gram(init_weights, support_embeddings)
      s_final, stats = solver.integrate(
        lambda s: _reduced.reduced_vector_field(s, logits0, gram, labels),
        _method.zero_state(support_embeddings, labels),
        t_final,
        max_steps,
        _method.state_error_weight(support_embeddings, gram),
      )
      weights = _method.weights_from_state(
        init_weights, support_embeddings, s_final
      )

      def grad(d_weights, *unused_stat_grads):
        # Recomputed here: the forward's tensors belong to its own solve.
        logits0, gram = _method.logits_and_gram(
          init_weights, support_embeddings
        )
        d_state = _method.state_cotangent(support_embeddings, d_weights)
        d_logits0, d_gram_sym = _backward_solve(
          logits0, gram, labels, s_final, d_state, t_final, solver, max_steps
        )
        return _method.vjp(
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
    return weights, _solver.SolveStats(num_evals, num_steps, finished)
