"""Independent references for the engine's tests, in float64.

The gradient flow integrated directly in W-space by SciPy's DOP853 at
tolerance 1e-13 (`w_space_solution`), the query loss after it, and central
finite differences of that loss, against which the engine's gradients are
checked (`assert_gradients_match_finite_differences`), whatever the solver
and gradient method.
"""

import numpy as np
import pytest
from scipy import integrate
import tensorflow as tf

import comln_tf

TIGHT = dict(rtol=1e-10, atol=1e-10)
TIGHTEST = dict(rtol=1e-12, atol=1e-12)


def softmax(logits):
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


def w_space_solution(init_weights, embeddings, labels, t_final):
  """W(T) of dW/dt = -(1/M) (softmax(X W^T) - Y)^T X, one task, by SciPy."""
  num_classes, size = init_weights.shape
  if labels.ndim == 1:
    labels = np.eye(num_classes)[labels]

  def field(_, flat):
    weights = flat.reshape(num_classes, size)
    residual = softmax(embeddings @ weights.T) - labels
    return (-(residual.T @ embeddings) / len(embeddings)).ravel()

  solution = integrate.solve_ivp(
    field,
    (0.0, float(t_final)),
    init_weights.ravel(),
    method="DOP853",
    rtol=1e-13,
    atol=1e-13,
  )
  assert solution.success
  return solution.y[:, -1].reshape(num_classes, size)


def _query_loss_np(weights, queries, query_labels):
  log_probs = np.log(softmax(queries @ weights.T))
  return -np.mean(np.take_along_axis(log_probs, query_labels[:, None], 1))


def reference_loss(problem, init_weights, support, queries, t_final):
  """Mean over tasks of the query cross-entropy after the W-space flow."""
  losses = [
    _query_loss_np(
      w_space_solution(init_weights, support[b], problem["labels"][b], t_final),
      queries[b],
      problem["query_labels"][b],
    )
    for b in range(len(support))
  ]
  return np.mean(losses)


def traced_adapt(problem, **options):
  """float64 numpy [B, N, d]: `comln_tf.adapt` of a problem's tasks up to
  its T, in a tf.function (eagerly the same ops run one by one)."""
  return tf.function(
    lambda: comln_tf.adapt(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      problem["t_final"],
      **options,
    )
  )().numpy()


def make_problem(
  num_tasks=2, ways=3, shots=2, size=5, queries=4, seed=0, scale=1.0
):
  rng = np.random.default_rng(seed)
  return dict(
    init_weights=rng.normal(size=(ways, size)) / np.sqrt(ways),
    support=scale * rng.normal(size=(num_tasks, ways * shots, size)),
    labels=np.tile(np.repeat(np.arange(ways), shots), (num_tasks, 1)),
    queries=scale * rng.normal(size=(num_tasks, queries, size)),
    query_labels=rng.integers(0, ways, size=(num_tasks, queries)),
    t_final=1.3,
  )


def stiff_problem():
  """A task whose meta-gradient is hard at large T, with a reference.

  One 5-way 1-shot task of separable non-negative features (scaled by 3),
  W0 = 0 and T = 1000: the step control of a discrete gradient must watch
  a tangent, not the state alone, for the derivative to be accurate.

  Returns:
    (problem dict as `make_problem`'s, direction [1, M, d] of the support
    embeddings, the central difference (step 1e-5) of `reference_loss`
    along it: a float64 directional derivative of the W-space solution).
  """
  rng = np.random.default_rng(0)
  ways, size, queries = 5, 8, 3
  centres = np.maximum(
    rng.normal(size=(1, size)) + rng.normal(size=(ways, size)), 0
  )
  support = 3 * np.maximum(centres + 0.3 * rng.normal(size=(ways, size)), 0)
  query = 3 * np.maximum(
    np.repeat(centres, queries, 0)
    + 0.3 * rng.normal(size=(ways * queries, size)),
    0,
  )
  problem = dict(
    init_weights=np.zeros((ways, size)),
    support=support[None],
    labels=np.arange(ways)[None],
    queries=query[None],
    query_labels=np.repeat(np.arange(ways), queries)[None],
    t_final=1000.0,
  )
  direction = rng.normal(size=problem["support"].shape)
  eps = 1e-5
  point = [
    problem[n] for n in ("init_weights", "support", "queries", "t_final")
  ]
  plus, minus = list(point), list(point)
  plus[1], minus[1] = point[1] + eps * direction, point[1] - eps * direction
  finite_difference = (
    reference_loss(problem, *plus) - reference_loss(problem, *minus)
  ) / (2 * eps)
  return problem, direction, finite_difference


def engine_loss_and_gradients(
  problem,
  method,
  solver="dopri5",
  jit_compile=False,
  unknown_shapes=False,
  **options,
):
  """Query loss and its gradients w.r.t. (W0, X, Xq, T) from the engine.

  Args:
    problem: of `make_problem`. method, solver, **options: of `adapt`.
    jit_compile: trace under XLA.
    unknown_shapes: trace with the batch, example and query counts unknown
      (as a serving signature does), the labels int32.
  """

  def run(labels, support, queries, query_labels, init_weights, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, queries, t_final])
      weights = comln_tf.adapt(
        init_weights,
        support,
        labels,
        t_final,
        method=method,
        solver=solver,
        **options,
      )
      logits = tf.matmul(queries, weights, transpose_b=True)
      loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(query_labels, logits)
      )
    return loss, tape.gradient(loss, [init_weights, support, queries, t_final])

  labels_dtype = tf.int32 if unknown_shapes else None
  arguments = [
    tf.constant(problem["labels"], labels_dtype),
    tf.constant(problem["support"]),
    tf.constant(problem["queries"]),
    tf.constant(problem["query_labels"], labels_dtype),
    tf.constant(problem["init_weights"]),
    tf.constant(problem["t_final"], tf.float64),
  ]
  signature = None
  if unknown_shapes:
    signature = [
      tf.TensorSpec([None] * len(a.shape), a.dtype) for a in arguments[:4]
    ] + [tf.TensorSpec.from_tensor(a) for a in arguments[4:]]
  loss, grads = tf.function(
    run, jit_compile=jit_compile, input_signature=signature
  )(*arguments)
  return float(loss), [g.numpy() for g in grads]


def assert_gradients_match_finite_differences(problem, method, **options):
  """Engine gradients vs central differences of the W-space reference."""
  loss, grads = engine_loss_and_gradients(problem, method, **TIGHT, **options)
  names = ["init_weights", "support", "queries", "t_final"]
  point = [problem[n] for n in names]
  assert loss == pytest.approx(reference_loss(problem, *point), rel=1e-8)
  rng = np.random.default_rng(1)
  eps = 1e-5
  for index, name in enumerate(names):
    for _ in range(2):
      direction = rng.normal(size=np.shape(point[index]))
      plus, minus = list(point), list(point)
      plus[index] = point[index] + eps * direction
      minus[index] = point[index] - eps * direction
      finite_difference = (
        reference_loss(problem, *plus) - reference_loss(problem, *minus)
      ) / (2 * eps)
      analytic = np.sum(grads[index] * direction)
      assert abs(analytic - finite_difference) <= 1e-6 * abs(
        finite_difference
      ), (name, analytic, finite_difference)
