"""TensorFlow Probability's solvers in the engine, against the references.

The same float64 references as the native solvers (tests/references.py):
the W-space flow by SciPy's DOP853 at 1e-13 and central finite differences
of the query loss after it, to 1e-6.
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import comln_tf
from references import TIGHT
from references import assert_gradients_match_finite_differences
from references import engine_loss_and_gradients
from references import make_problem
from references import reference_loss
from references import stiff_problem
from references import traced_adapt
from references import w_space_solution

# Every (solver, method) pair the TFP solvers support.
SUPPORTED = [
  ("tfp_dopri5", "forward"),
  ("tfp_dopri5", "adjoint"),
  ("tfp_bdf", "forward"),
  ("tfp_bdf", "adjoint"),
]


def _small_problem(**options):
  # 1-shot: BDF's dense Jacobian of the forward sensitivities stays small.
  return make_problem(shots=1, **options)


@pytest.mark.parametrize("solver, method", SUPPORTED)
def test_gradients_match_finite_differences(solver, method):
  problem = _small_problem() if solver == "tfp_bdf" else make_problem()
  assert_gradients_match_finite_differences(problem, method, solver=solver)


def test_a_configured_tfp_solver_instance_matches_finite_differences():
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

  # Its own max_num_steps is replaced by adapt's max_steps.
  solver = comln_tf.TFPSolver(
    tfp.math.ode.DormandPrince(
      rtol=1e-10, atol=1e-10, first_step_size=1e-4, max_num_steps=2
    )
  )
  assert_gradients_match_finite_differences(
    _small_problem(seed=2), "adjoint", solver=solver
  )


def test_tasks_solved_in_groups_match_finite_differences():
  # 3 tasks in groups of 2: the last group is padded.
  assert_gradients_match_finite_differences(
    make_problem(num_tasks=3, seed=5),
    "forward",
    solver="tfp_dopri5",
    tasks_per_solve=2,
  )


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
def test_auto_runs_a_supported_method(solver):
  assert_gradients_match_finite_differences(
    _small_problem(seed=6), "auto", solver=solver
  )


def test_forward_is_accurate_at_large_t():
  """The native backprop's hard case, at the default tolerance 1e-5.

  Measured: forward 1.2% (native 2.0%). Taping through TFP's steps gave
  14% (with backprop's probe tangent) and 95% (without), hence backprop
  is refused; the continuous adjoints, TFP's and the native, 445% / 412%.
  """
  problem, direction, finite_difference = stiff_problem()
  _, grads = engine_loss_and_gradients(
    problem,
    "forward",
    solver="tfp_dopri5",
    rtol=1e-5,
    atol=1e-5,
    max_steps=100_000,
  )
  assert abs(np.sum(grads[1] * direction) / finite_difference - 1) < 0.05


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
def test_state_equals_w_space_integration(solver):
  problem = make_problem(seed=4)
  # In tf.function: eager BDF runs its Jacobian op by op.
  weights = traced_adapt(
    problem, solver=solver, method="adjoint", rtol=1e-12, atol=1e-12
  )
  for b in range(len(problem["support"])):
    expected = w_space_solution(
      problem["init_weights"],
      problem["support"][b],
      problem["labels"][b],
      problem["t_final"],
    )
    # TFP's DormandPrince returns its 4th-order interpolant at T, whose
    # error the tolerance does not control: 7e-9 here (BDF: < 1e-9).
    np.testing.assert_allclose(
      weights[b],
      expected,
      rtol=0,
      atol=1e-7 if solver == "tfp_dopri5" else 1e-9,
    )


def test_float32():
  problem = make_problem(seed=3)
  # TFP pools the error over the batch and interpolates at T: a tighter
  # tolerance than the default 1e-5 for the native test's 1e-3.
  weights = comln_tf.adapt(
    problem["init_weights"].astype(np.float32),
    problem["support"].astype(np.float32),
    problem["labels"],
    np.float32(2.0),
    solver="tfp_dopri5",
    rtol=1e-6,
    atol=1e-6,
  )
  assert weights.dtype == tf.float32
  expected = w_space_solution(
    problem["init_weights"], problem["support"][0], problem["labels"][0], 2.0
  )
  np.testing.assert_allclose(weights[0].numpy(), expected, atol=1e-3)


def _tiny_problem():
  # Eager BDF runs its Jacobian op by op: keep the state tiny.
  return make_problem(num_tasks=2, ways=2, shots=1, size=3, seed=7)


@pytest.mark.parametrize("solver, method", SUPPORTED)
def test_eager_and_xla_agree(solver, method):
  """Values and gradients, eagerly and under XLA, for every pair.

  tf.function without XLA is checked against finite differences for every
  pair (test_gradients_match_finite_differences). A short T: eager BDF
  re-traces its Jacobian at every step.
  """
  problem = _tiny_problem()
  args = [tf.constant(problem[k]) for k in ("init_weights", "support")]
  t_final = tf.constant(0.1, tf.float64)

  def gradient(init_weights, support, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, t_final])
      weights = comln_tf.adapt(
        init_weights,
        support,
        problem["labels"],
        t_final,
        method=method,
        solver=solver,
        rtol=1e-8,
        atol=1e-8,
      )
      loss = tf.reduce_sum(tf.sin(weights))
    return [weights] + tape.gradient(loss, [init_weights, support, t_final])

  eager = gradient(*args, t_final)
  xla = tf.function(gradient, jit_compile=True)(*args, t_final)
  # BDF's QR factorisations round differently under XLA: 1e-9 apart.
  for a, b in zip(eager, xla):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_max_steps_exceeded_raises(solver, mode):
  problem = _tiny_problem()
  run = comln_tf.adapt if mode == "eager" else tf.function(comln_tf.adapt)
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match="did not reach t_final within max_steps=3",
  ):
    run(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      50.0,
      solver=solver,
      max_steps=3,
    )


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
def test_max_steps_exceeded_under_xla_is_nan_not_silent(solver):
  problem = _tiny_problem()
  run = tf.function(
    lambda: comln_tf.adapt(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      50.0,
      solver=solver,
      max_steps=3,
    ),
    jit_compile=True,
  )
  assert np.all(np.isnan(run().numpy()))


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
def test_adjoint_backward_solve_over_max_steps_gives_nan_gradients(solver):
  """The limit also bounds TFP's backward solve, and a failure shows.

  The forward solve gets just the steps it needs; the backward solve, of
  the larger augmented state, needs more.
  """
  problem = make_problem(seed=8)
  args = [tf.constant(problem[k]) for k in ("init_weights", "support")]

  @tf.function
  def gradient(init_weights, support, max_steps):
    with tf.GradientTape() as tape:
      tape.watch(support)
      weights, stats = comln_tf.adapt(
        init_weights,
        support,
        problem["labels"],
        20.0,
        method="adjoint",
        solver=solver,
        rtol=1e-9,
        atol=1e-9,
        max_steps=max_steps,
        return_stats=True,
      )
      loss = tf.reduce_sum(weights**2)
    return weights, tape.gradient(loss, support), stats

  _, grads, stats = gradient(*args, 100_000)
  assert np.all(np.isfinite(grads.numpy()))
  weights, grads, _ = gradient(*args, int(stats.num_steps))
  assert np.all(np.isfinite(weights.numpy()))
  assert np.all(np.isnan(grads.numpy()))


def test_stats():
  problem = make_problem(seed=9)

  def stats_of(solver):
    _, stats = tf.function(
      lambda: comln_tf.adapt(
        problem["init_weights"],
        problem["support"],
        problem["labels"],
        3.0,
        solver=solver,
        return_stats=True,
      )
    )()
    return [int(value) for value in stats]

  num_evals, num_steps, finished, jacobians = stats_of("tfp_dopri5")
  assert finished and num_steps > 0 and jacobians == 0
  assert num_evals == 1 + 6 * num_steps
  num_evals, num_steps, finished, jacobians = stats_of("tfp_bdf")
  assert finished and num_steps > 0 and num_evals >= num_steps
  # TFP's BDF evaluates its Jacobian at every step by default.
  assert 0 < jacobians <= num_steps
  assert stats_of("dopri5")[3] == 0


def test_bdf_matches_the_reference_with_large_gram_eigenvalues():
  """Embeddings of large norm (Gram eigenvalues ~4e4), W0 = 0 (tied rows).

  Not stiff in practice: the softmax saturates within t ~ 1 / eigenvalue,
  after which the flow's Jacobian is small, so dopri5 takes fewer steps
  than BDF (30 against 125 here; docs/benchmarks.md). BDF must still be
  accurate there.
  """
  problem = make_problem(num_tasks=1, seed=10, scale=60.0)
  gram = problem["support"][0] @ problem["support"][0].T
  assert np.linalg.eigvalsh(gram).max() > 1e4
  init_weights = np.zeros_like(problem["init_weights"])
  # In tf.function: eager BDF runs its Jacobian op by op.
  weights = tf.function(
    lambda: comln_tf.adapt(
      init_weights,
      problem["support"][0],
      problem["labels"][0],
      1.0,
      solver="tfp_bdf",
      method="adjoint",
      rtol=1e-6,
      atol=1e-6,
    )
  )()
  expected = w_space_solution(
    init_weights, problem["support"][0], problem["labels"][0], 1.0
  )
  np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      dict(solver="tfp_bdf", method="backprop"),
      'method="backprop" is not supported with solver="tfp_bdf"',
    ),
    (
      dict(solver="tfp_dopri5", method="backprop"),
      'method="backprop" is not supported with solver="tfp_dopri5"',
    ),
    (
      dict(solver="tfp_dopri5", method="discrete_adjoint"),
      "method='discrete_adjoint' is not supported with solver='tfp_dopri5'",
    ),
    (dict(solver="tfp_bdf", rtol=0.0), "rtol must be > 0 for solver='tfp_bdf'"),
  ],
)
def test_unsupported_combinations_are_refused(kwargs, message):
  problem = _tiny_problem()
  with pytest.raises(ValueError, match=message):
    comln_tf.adapt(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      1.0,
      **kwargs,
    )


def test_layer_refuses_an_unsupported_combination_when_built():
  with pytest.raises(ValueError, match="not supported with solver"):
    comln_tf.layers.GradientFlowClassifier(
      3, solver="tfp_bdf", method="backprop"
    )


def test_tfp_solver_needs_a_tfp_solver():
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

  with pytest.raises(TypeError, match="TFPSolver needs a tfp.math.ode"):
    comln_tf.TFPSolver("bdf")
  with pytest.raises(ValueError, match="evaluate_jacobian_lazily=True"):
    comln_tf.TFPSolver(tfp.math.ode.BDF(evaluate_jacobian_lazily=True))


@pytest.mark.parametrize("solver", ["tfp_dopri5", "tfp_bdf"])
def test_layer_matches_reference_and_serializes(solver):
  problem = make_problem(seed=11)
  layer = comln_tf.layers.GradientFlowClassifier(
    3, initial_t=1.3, solver=solver, rtol=1e-10, atol=1e-10, dtype="float64"
  )
  # training=False: the plain solve (for tfp_bdf, the adjoint's forward).
  # BDF in tf.function: eagerly it runs its Jacobian op by op.
  call = tf.function(layer) if solver == "tfp_bdf" else layer
  logits = call(problem["support"], problem["labels"], problem["queries"])
  weights = w_space_solution(
    layer.init_weights.numpy(), problem["support"][0], problem["labels"][0], 1.3
  )
  # TFP's DormandPrince interpolates at T (see above).
  np.testing.assert_allclose(
    logits[0].numpy(), problem["queries"][0] @ weights.T, atol=1e-7
  )
  clone = comln_tf.layers.GradientFlowClassifier.from_config(layer.get_config())
  assert clone.solver == solver


def test_importing_comln_tf_does_not_import_tfp():
  code = (
    "import sys, comln_tf; "
    "assert 'tensorflow_probability' not in sys.modules; "
    "comln_tf.adapt([[0.], [1.]], [[1.]], [0], 1.0, "
    "solver='tfp_dopri5'); "
    "assert 'tensorflow_probability' in sys.modules"
  )
  subprocess.run(
    [sys.executable, "-c", code], check=True, timeout=300, capture_output=True
  )


def test_tight_tolerances_reach_the_reference_loss():
  # The forward solve alone: TFP's error norm pools s with the
  # sensitivities, which must not leave s less accurate than asked.
  problem = make_problem(seed=12)
  loss, _ = engine_loss_and_gradients(
    problem, "forward", solver="tfp_dopri5", **TIGHT
  )
  point = [
    problem[n] for n in ("init_weights", "support", "queries", "t_final")
  ]
  assert loss == pytest.approx(reference_loss(problem, *point), rel=1e-9)
