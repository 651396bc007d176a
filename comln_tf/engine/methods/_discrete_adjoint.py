"""The discrete adjoint of Dormand-Prince: exact, XLA, bounded memory.

The forward pass is the plain dopri5 solve of the reduced state s (plus,
by default, one probe tangent that only steers the step control, see
`DiscreteAdjoint`). It records the accepted steps in a fixed number of
checkpoint slots. The reverse pass walks the accepted steps backwards and
applies the vector-Jacobian product of one Runge-Kutta step, written by
hand for the cross-entropy flow, to the stages the forward pass recorded
(no evaluation of the vector field in the reverse pass). The result
is the derivative of the discrete solution for the steps taken (what
`Backprop` computes), without a tape: the loop state has a fixed size, so
the method runs under XLA and its memory depends neither on T nor on
`max_steps`.

Checkpoints. A slot of a task holds the solver's state at the start of
an accepted step whose index is a multiple of the stride (s, the probe, t,
the proposed step size), the size of that step and its 6 stages of s. The
stride starts at 1: every accepted step has its slot and the reverse pass
reads them directly. When a task's slots are full, every other one is
freed (no data moves) and its stride doubles; the reverse
pass then rebuilds each step's start from the slot before it by re-running
the step control (same steps, same accept/reject decisions), which costs
up to `stride` extra steps per reversed step. With the default number
of slots (`DiscreteAdjoint.num_slots`), the benchmark's workloads (T up
to 10,000: at most 25 accepted steps) never overflow.

The module's parts: `_Flow` (the flow and its step VJP), `_recording_pass`
(the forward solve that fills the checkpoint slots), `_replay` (a step's
start, size and stages, read or recomputed) and `_reverse_pass`.

Shapes inside: W0 [N, d], X [B, M, d], Y [B, M, N] label distributions,
t_final a scalar; every tensor of one float dtype.
"""

import dataclasses
import functools
from typing import NamedTuple

import tensorflow as tf

from comln_tf.engine import _reduced
from comln_tf.engine.methods import _method
from comln_tf.engine.solvers import _dopri5
from comln_tf.engine.solvers import _solver

# Checkpoint slots per task when DiscreteAdjoint.checkpoints is None: as
# many as fit in _SLOT_BYTES_PER_TASK, within [_MIN_SLOTS, _MAX_SLOTS]. The
# buffers are written, kept for the reverse pass and (with tasks_per_solve)
# stacked over groups whatever the number of steps, so more slots than the
# steps need cost time (docs/benchmarks.md).
_SLOT_BYTES_PER_TASK = 2 * 2**20
_MIN_SLOTS = 16
_MAX_SLOTS = 64


def _probabilities(z, logits0, gram):
  """softmax(L0 - G z): [B, M, N]."""
  return tf.nn.softmax(logits0 - _reduced.gram_matmul(gram, z), axis=-1)


def _scaled(h, tensor):
  """h [B] times a per-task tensor [B, ...]."""
  return _solver.per_task(h, tensor) * tensor


def _gather_slots(buffer, slots):
  """buffer[b, slots[b]] for every task b: [B, ...]."""
  tasks = tf.range(tf.shape(slots)[0])
  return tf.gather_nd(buffer, tf.stack([tasks, slots], axis=1))


def _scatter_slots(buffer, slots, values):
  """buffer with buffer[b, slots[b]] = values[b] for every task b."""
  tasks = tf.range(tf.shape(slots)[0])
  return tf.tensor_scatter_nd_update(
    buffer, tf.stack([tasks, slots], axis=1), values
  )


class _Flow:
  """The reduced flow of one batch of tasks, with its step VJP.

  Attributes:
    logits0: [B, M, N]. gram: [B, M, M]. labels: [B, M, N].
    probe: None, or the direction (dL0 [M, N], dG [M, M]) of the probe
      tangent, every task's (`_method.probe_direction`), with
      tangent_control.
  """

  def __init__(self, logits0, gram, labels, tangent_control):
    self.logits0 = logits0
    self.gram = gram
    self.labels = labels
    self.probe = None
    if tangent_control:
      self.probe = _method.probe_direction(logits0, gram)
    self.inverse_m = 1.0 / tf.cast(tf.shape(labels)[-2], labels.dtype)

  def field(self, state):
    """d/dt of the solver state (s,) or (s, probe)."""
    if self.probe is None:
      (s,) = state
      probs = _probabilities(s, self.logits0, self.gram)
      return (_reduced.residual(probs, self.labels) * self.inverse_m,)
    s, probe = state
    num_classes = tf.shape(s)[-1]
    # G @ [s | probe] as one product: two small products cost two kernels.
    both = _reduced.gram_matmul(self.gram, tf.concat([s, probe], -1))
    probs = tf.nn.softmax(self.logits0 - both[..., :num_classes], axis=-1)
    # The JVP along the probe direction. Its G part matters: a probe along
    # L0 alone leaves the gradient of a stiff task at T = 1000 (tests)
    # inaccurate for some directions.
    probe_logits0, probe_gram = self.probe
    d_logits = (
      probe_logits0
      - both[..., num_classes:]
      - _reduced.gram_matmul(probe_gram[None], s)
    )
    d_probs = probs * (
      d_logits - tf.reduce_sum(probs * d_logits, -1, keepdims=True)
    )
    return (
      _reduced.residual(probs, self.labels) * self.inverse_m,
      d_probs * self.inverse_m,
    )

  def step_vjp(self, s, h, stages, cotangent, tableau):
    """Pulls dL/ds_{n+1} back through one Runge-Kutta step of size h.

    s_{n+1} = s_n + h sum_i b_i k_i with stages k_i = f(z_i),
    z_i = s_n + h sum_{j<i} a_ij k_j and f(z) = (softmax(L0 - G z) - Y) / M.
    With u_i = A_i kbar_i (A_i the symmetric softmax Jacobian at z_i,
    divided by M): dL/dz_i = -G u_i, dL/dL0 += u_i, dL/dG -= u_i z_i^T.
    The stages come from the forward pass, so the step costs no evaluation
    of f: the softmax at z_i is p_i = M k_i + Y.

    Args:
      s: [B, M, N] start of the step. h: [B] step sizes (0: the identity).
      stages: [B, S, M, N], the S stages k_i of the step.
      cotangent: [B, M, N], dL/ds_{n+1}.
      tableau: rows of the Runge-Kutta matrix, the last row the weights.

    Returns:
      (dL/ds_n [B, M, N], this step's dL/dL0 [B, M, N], dL/dG [B, M, M]).
    """
    rows, weights = tableau[:-1], tableau[-1]
    num_stages = len(weights)
    stages = tf.unstack(stages, num_stages, axis=1)
    stage_cotangents = [
      _scaled(h, tf.constant(b, s.dtype) * cotangent) if b != 0.0 else None
      for b in weights
    ]
    d_state = cotangent
    forcings, inputs = [], []
    num_examples = 1.0 / self.inverse_m
    for i in reversed(range(num_stages)):
      if stage_cotangents[i] is None:
        continue
      probs = stages[i] * num_examples + self.labels
      k_bar = stage_cotangents[i]
      u = (
        probs
        * (k_bar - tf.reduce_sum(probs * k_bar, -1, keepdims=True))
        * self.inverse_m
      )
      forcings.append(u)
      terms = [
        tf.constant(c, s.dtype) * k for c, k in zip(rows[i], stages) if c != 0.0
      ]
      inputs.append(s + _scaled(h, tf.add_n(terms)) if terms else s)
      d_input = -_reduced.gram_matmul(self.gram, u)
      d_state = d_state + d_input
      for j, c in enumerate(rows[i]):
        if c == 0.0:
          continue
        term = _scaled(h, tf.constant(c, s.dtype) * d_input)
        stage_cotangents[j] = (
          term if stage_cotangents[j] is None else stage_cotangents[j] + term
        )
    d_logits0 = tf.add_n(forcings)
    # sum_i u_i z_i^T as one product over the stages.
    d_gram = -tf.matmul(
      tf.concat(forcings, -1), tf.concat(inputs, -1), transpose_b=True
    )
    return d_state, d_logits0, d_gram


class _Checkpoints(NamedTuple):
  """What the recording pass keeps for the reverse pass.

  Attributes:
    records: dict of buffers, each [B, slots + 1, ...]: "y" (the solver
      state nest at the start of the step), "stages" ([B, slots + 1, 6, M,
      N], the stages of s), "t", "h_start" (the step size proposed at the
      start) and "h_step" (the size taken). Slot `slots` is scratch: tasks
      that record nothing write there.
    held: int32 [B, slots], which accepted step each slot holds (-1: free).
      Thinning only frees slots, so no recorded data ever moves.
    stride: int32 [B], the stride of each task's recorded steps.
    num_accepted: int32 [B], accepted steps of each task.
  """

  records: dict
  held: tf.Tensor
  stride: tf.Tensor
  num_accepted: tf.Tensor


def _empty_records(y0, slots, num_stages):
  """The `_Checkpoints.records` buffers, zeros, for the state nest y0."""
  s0 = y0[0]
  batch, dtype = tf.shape(s0)[0], s0.dtype
  shape = tf.shape(s0)[1:]
  return dict(
    y=tuple(
      tf.zeros(tf.concat([[batch, slots + 1], shape], 0), dtype) for _ in y0
    ),
    stages=tf.zeros(
      tf.concat([[batch, slots + 1, num_stages], shape], 0), dtype
    ),
    t=tf.zeros([batch, slots + 1], dtype),
    h_start=tf.zeros([batch, slots + 1], dtype),
    h_step=tf.zeros([batch, slots + 1], dtype),
  )


def _slot_to_record(accept, count, stride, held, slots):
  """Where each task records the step it just took, thinning full slots.

  Args:
    accept: bool [B]. count: int32 [B], the index of this accepted step.
    stride, held: as in `_Checkpoints`. slots: Python int.

  Returns:
    (slot [B], `slots` for the tasks that record nothing; stride; held).
  """
  on_stride = accept & tf.equal(count % stride, 0)
  free = held < 0
  # Full: every multiple of the stride below `count` is held and count
  # = slots * stride; keep the multiples of twice the stride.
  full = on_stride & ~tf.reduce_any(free, axis=1)
  stride = tf.where(full, 2 * stride, stride)
  held = tf.where(full[:, None] & (held % stride[:, None] != 0), -1, held)
  record = on_stride & tf.equal(count % stride, 0)
  slot = tf.where(
    record, tf.argmax(held < 0, axis=1, output_type=tf.int32), slots
  )
  held = tf.where(
    record[:, None] & tf.equal(tf.range(slots)[None], slot[:, None]),
    count[:, None],
    held,
  )
  return slot, stride, held


def _stages_of_s(tried):
  """The 6 stages of s of a `StepAttempt`: [B, 6, M, N]."""
  return tf.stack([k[0] for k in tried.stages[:-1]], axis=1)


def _record_step(
  attempt,
  t_final,
  slots,
  step,
  t,
  h,
  y,
  k1,
  h_start,
  count,
  stride,
  held,
  records,
):
  """One step attempt of the recording pass: the body of its loop."""
  tried = attempt(t, h, y, k1, t < t_final)
  slot, stride, held = _slot_to_record(tried.accept, count, stride, held, slots)
  records = dict(
    y=tuple(
      _scatter_slots(buffer, slot, leaf)
      for buffer, leaf in zip(records["y"], y)
    ),
    stages=_scatter_slots(records["stages"], slot, _stages_of_s(tried)),
    t=_scatter_slots(records["t"], slot, t),
    h_start=_scatter_slots(records["h_start"], slot, h_start),
    h_step=_scatter_slots(records["h_step"], slot, tried.h_step),
  )
  return (
    step + 1,
    tried.t_next,
    tried.h_next,
    tried.y_next,
    tried.k1_next,
    tf.where(tried.accept, tried.h_next, h_start),
    count + tf.cast(tried.accept, tf.int32),
    stride,
    held,
    records,
  )


def _recording_pass(attempt, y0, f0, h0, t_final, slots, max_steps):
  """The forward solve, recording the accepted steps in checkpoint slots.

  Args:
    attempt: maps (t, h, y, k1, running) to a `StepAttempt` of dopri5.
    y0: the initial state nest, (s0,) or (s0, probe0), [B, M, N] each.
    f0: its derivative. h0: [B], the first step sizes.
    t_final: scalar. slots: Python int, slots per task.
    max_steps: Python int.

  Returns:
    (loop iterations, finished: bool scalar, s(T) [B, M, N],
    `_Checkpoints`).
  """
  batch = tf.shape(y0[0])[0]
  num_stages = len(_dopri5.Dopri5._A[-1])  # pylint: disable=protected-access
  (steps, t_end, _, y_end, _, _, num_accepted, stride, held, records) = (
    tf.while_loop(
      lambda step, t, *_: tf.reduce_any(t < t_final),
      functools.partial(_record_step, attempt, t_final, slots),
      (
        tf.constant(0),
        tf.zeros([batch], y0[0].dtype),
        h0,
        y0,
        f0,
        h0,
        tf.zeros([batch], tf.int32),
        tf.ones([batch], tf.int32),
        -tf.ones([batch, slots], tf.int32),
        _empty_records(y0, slots, num_stages),
      ),
      maximum_iterations=max_steps,
    )
  )
  finished = tf.reduce_all(t_end >= t_final)
  checkpoints = _Checkpoints(records, held, stride, num_accepted)
  return steps, finished, y_end[0], checkpoints


def _recompute(attempt, field, records, slot, offset, stored, max_steps):
  """Start, size and stages of the step `offset` accepted steps past `slot`.

  Re-runs the step control from the slot for offset + 1 accepted steps
  (the same steps as the recording pass), keeping the start, size and
  stages of the last one; `stored` (the slot's own) where offset is 0.
  """
  start = tuple(_gather_slots(buffer, slot) for buffer in records["y"])

  def replay_body(t, h, y, k1, remaining, s_before, h_taken, stages_taken):
    tried = attempt(t, h, y, k1, remaining > 0)
    accept = tried.accept
    stages = _stages_of_s(tried)
    per_task = _solver.per_task
    s_before = tf.where(per_task(accept, s_before), y[0], s_before)
    h_taken = tf.where(accept, tried.h_step, h_taken)
    stages_taken = tf.where(per_task(accept, stages), stages, stages_taken)
    return (
      tried.t_next,
      tried.h_next,
      tried.y_next,
      tried.k1_next,
      remaining - tf.cast(accept, tf.int32),
      s_before,
      h_taken,
      stages_taken,
    )

  outputs = tf.while_loop(
    lambda *state: tf.reduce_any(state[4] > 0),
    replay_body,
    (
      _gather_slots(records["t"], slot),
      _gather_slots(records["h_start"], slot),
      start,
      field(start),
      tf.where(offset > 0, offset + 1, 0),
    )
    + stored,
    maximum_iterations=max_steps,
  )
  return outputs[5:]


def _replay(attempt, field, checkpoints, index, max_steps):
  """Start s_n, size h_n and stages of accepted step `index` [B] >= 0.

  Read from the step's slot, or recomputed from the slot before it when
  the slots were thinned (`_recompute`).

  Returns:
    (s_n [B, M, N], h_n [B], stages [B, 6, M, N]).
  """
  records = checkpoints.records
  offset = index % checkpoints.stride
  slot = tf.argmax(
    tf.equal(checkpoints.held, (index - offset)[:, None]),
    axis=1,
    output_type=tf.int32,
  )
  stored = (
    _gather_slots(records["y"][0], slot),
    _gather_slots(records["h_step"], slot),
    _gather_slots(records["stages"], slot),
  )
  return tf.cond(
    tf.reduce_any(offset > 0),
    lambda: _recompute(
      attempt, field, records, slot, offset, stored, max_steps
    ),
    lambda: stored,
  )


def _reverse_pass(flow, attempt, checkpoints, d_final, max_steps):
  """Pulls dL/ds(T) back through the accepted steps, last step first.

  Args:
    flow: the `_Flow`. attempt: as in `_recording_pass`.
    checkpoints: the recording pass's `_Checkpoints`.
    d_final: [B, M, N], dL/ds(T). max_steps: Python int.

  Returns:
    (dL/dL0 [B, M, N], dL/dG [B, M, M]), through s.
  """
  num_accepted = checkpoints.num_accepted
  tableau = _dopri5.Dopri5._A  # pylint: disable=protected-access

  def reverse_body(i, cotangent, d_logits0, d_gram):
    index = num_accepted - 1 - i
    active = index >= 0
    s, h, stages = _replay(
      attempt, flow.field, checkpoints, tf.maximum(index, 0), max_steps
    )
    h = tf.where(active, h, tf.zeros_like(h))
    cotangent, step_logits0, step_gram = flow.step_vjp(
      s, h, stages, cotangent, tableau
    )
    return (
      i + 1,
      cotangent,
      d_logits0 + step_logits0,
      d_gram + step_gram,
    )

  _, _, d_logits0, d_gram = tf.while_loop(
    lambda i, *_: i < tf.reduce_max(num_accepted),
    reverse_body,
    (
      tf.constant(0),
      d_final,
      tf.zeros_like(flow.logits0),
      tf.zeros_like(flow.gram),
    ),
    maximum_iterations=max_steps,
  )
  return d_logits0, d_gram


def _check_dopri5(solver):
  """Raises ValueError unless `solver` is a `Dopri5`, whose steps it replays."""
  if not isinstance(solver, _dopri5.Dopri5):
    raise ValueError(
      f'method="discrete_adjoint" needs solver="dopri5" (its reverse '
      f"pass replays dopri5 steps), got solver="
      f"{getattr(solver, 'name', solver)!r}."
    )


@dataclasses.dataclass(frozen=True)
class DiscreteAdjoint(_method.GradientMethod):
  """Reverse pass over the accepted dopri5 steps (discrete adjoint).

  Exact for the discrete solution, like `Backprop`, but with no tape: the
  forward pass is the plain solve of s and records the accepted steps
  (start, size and stages) in `checkpoints` slots per task; the reverse
  pass applies the hand-written VJP of each step (cross-entropy flow)
  to its recorded stages, last step first. It runs
  under XLA (`jit_compile=True`), and its memory is fixed by `checkpoints`
  (not by T nor `max_steps`); past `checkpoints` accepted steps the slots
  thin out and the reverse pass recomputes (see the module docstring).
  The derivative with respect to T is <dL/ds(T), f(s(T))>, as in the
  forward method.

  As in `Backprop`, the step control also watches one probe tangent (the
  derivative of s along a fixed random direction of L0): the derivative of
  the discrete solution is the solver's solution of the linearized flow on
  the same steps, and steps chosen for s alone can amplify it without
  bound at large T. Its JVP shares the product with G of the state.

  Dopri5 only (the step-size control is part of the method).

  Attributes:
    checkpoints: slots per task, an even number >= 2, or None: as many as
      fit in 2 MiB per task (a slot holds s, the probe and the 6 stages of
      s: 8 M N numbers), at least 16 and at most 64. 64 at 5-way 5-shot
      and 20-way 1-shot, 32 at 20-way 5-shot (float32).
    tangent_control: carry the probe tangent (True) or control s alone
      (False: cheaper, inaccurate at large T).
  """

  checkpoints: int | None = None
  tangent_control: bool = True
  name = "discrete_adjoint"

  def __post_init__(self):
    if self.checkpoints is not None and (
      isinstance(self.checkpoints, bool)
      or not isinstance(self.checkpoints, int)
      or self.checkpoints < 2
      or self.checkpoints % 2
    ):
      raise ValueError(
        f"checkpoints must be None or an even integer >= 2, "
        f"got {self.checkpoints!r}."
      )

  def num_slots(
    self,
    num_examples: int | None,
    num_classes: int | None,
    dtype: tf.DType,
  ) -> int:
    """Checkpoint slots per task for M examples, N classes (ints or None)."""
    if self.checkpoints is not None:
      return self.checkpoints
    if num_examples is None or num_classes is None:
      return _MAX_SLOTS // 2
    slot_bytes = 8 * num_examples * num_classes * tf.as_dtype(dtype).size
    fitting = _SLOT_BYTES_PER_TASK // slot_bytes
    return max(_MIN_SLOTS, min(_MAX_SLOTS, fitting - fitting % 2))

  def __call__(
    self, init_weights, support_embeddings, labels, t_final, solver, max_steps
  ):
    _check_dopri5(solver)
    slots = self.num_slots(labels.shape[-2], labels.shape[-1], labels.dtype)

    @tf.custom_gradient
    def adapt_with_discrete_adjoint(init_weights, support_embeddings, t_final):
      init_weights, support_embeddings, t_final = _method.unwatched(
        init_weights, support_embeddings, t_final
      )
      logits0, gram = _method.logits_and_gram(init_weights, support_embeddings)
      flow = _Flow(logits0, gram, labels, self.tangent_control)
      error_weight = _method.state_error_weight(support_embeddings, gram)
      attempt = functools.partial(
        solver.attempt, flow.field, t_final, error_weight
      )
      s0 = tf.zeros(tf.shape(labels), support_embeddings.dtype)
      y0 = (s0, s0) if self.tangent_control else (s0,)
      f0 = flow.field(y0)
      h0, probe_evals = solver.initial_step(
        flow.field, y0, f0, t_final, error_weight
      )
      steps, finished, s_final, checkpoints = _recording_pass(
        attempt, y0, f0, h0, t_final, slots, max_steps
      )
      weights = _method.weights_from_state(
        init_weights, support_embeddings, s_final
      )

      def grad(d_weights, *unused_stat_grads):
        d_final = _method.state_cotangent(support_embeddings, d_weights)
        d_logits0, d_gram = _reverse_pass(
          flow, attempt, checkpoints, d_final, max_steps
        )
        d_logits0 = _method.poison_unless(finished, d_logits0)
        d_gram_sym = d_gram + tf.linalg.matrix_transpose(d_gram)
        return _method.vjp(
          init_weights,
          support_embeddings,
          logits0,
          gram,
          labels,
          t_final,
          s_final,
          d_weights,
          d_final,
          d_logits0,
          d_gram_sym,
        )

      num_evals = 1 + probe_evals + 6 * steps
      return (weights, num_evals, steps, finished), grad

    weights, num_evals, num_steps, finished = adapt_with_discrete_adjoint(
      init_weights, support_embeddings, t_final
    )
    return weights, _solver.SolveStats(num_evals, num_steps, finished)
