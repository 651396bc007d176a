"""Backprop: the tape differentiates through the solver's steps."""

import dataclasses

import tensorflow as tf

from comln_tf.engine import _reduced
from comln_tf.engine.methods import _method


@dataclasses.dataclass(frozen=True)
class Backprop(_method.GradientMethod):
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
  sensitivities are all controlled. The probe is cut from the tape: it
  costs solver work and no memory (docs/benchmarks.md).

  Memory grows with the number of steps (the tape keeps each one).

  Attributes:
    tangent_control: carry the probe tangent (True) or control s alone
      (False: cheaper, for a plain solve with no gradient, e.g. inference).
  """

  tangent_control: bool = True
  name = "backprop"

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    logits0, gram = _method.logits_and_gram(init_weights, support_embeddings)
    s0 = _method.zero_state(support_embeddings, labels)
    field_of = lambda s: _reduced.reduced_vector_field(s, logits0, gram, labels)
    error_weight = _method.state_error_weight(support_embeddings, gram)
    if not self.tangent_control:
      s_final, stats = solver.integrate(
        field_of, s0, t_final, max_steps, error_weight
      )
      return _method.weights_from_state(
        init_weights, support_embeddings, s_final
      ), stats
    fixed_logits0, fixed_gram = _method.unwatched(logits0, gram)
    probe_logits0, probe_gram = (
      tf.broadcast_to(direction, tf.shape(fixed))
      for direction, fixed in zip(
        _method.probe_direction(fixed_logits0, fixed_gram),
        (fixed_logits0, fixed_gram),
      )
    )

    def vector_field(state):
      s, probe = state
      # The probe only steers the step control: it is computed from
      # tensors cut from the tape, so no gradient flows through it. (One
      # evaluation under the accumulator on the watched tensors, with the
      # probe's JVP cut by tf.stop_gradient, gives wrong tape gradients in
      # this solver.)
      fixed_s, probe = _method.unwatched(s, probe)
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
    return _method.weights_from_state(
      init_weights, support_embeddings, s_final
    ), stats
