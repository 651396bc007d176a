"""The engine against independent references, in float64.

The reference is the gradient flow integrated directly in W-space by SciPy's
DOP853 at tolerance 1e-13 (`w_space_solution`), and central finite
differences of the query loss computed from it. Nothing here compares the
engine with itself, except the two tangent fields, which the issue requires
to agree to 1e-10.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
import comln_tf
from comln_tf.engine import _reduced
from launch import workloads
from references import TIGHT
from references import TIGHTEST
from references import assert_gradients_match_finite_differences
from references import engine_loss_and_gradients
from references import make_problem
from references import reference_loss
from references import softmax as _softmax
from references import stiff_problem
from references import traced_adapt
from references import w_space_solution

GRADIENT_METHODS = {
  "forward": "forward",
  "forward_accumulator": comln_tf.Forward(tangent_field="accumulator"),
  "backprop": "backprop",
  "adjoint": "adjoint",
}


@pytest.fixture(scope="module")
def problem():
  return make_problem()


@pytest.mark.parametrize("method_name", sorted(GRADIENT_METHODS))
def test_gradients_match_finite_differences(problem, method_name):
  assert_gradients_match_finite_differences(
    problem, GRADIENT_METHODS[method_name]
  )


def test_backprop_step_control_keeps_the_gradient_accurate_at_large_t():
  """At large T, steps chosen for the state alone ruin backprop's gradient.

  A 5-way 1-shot task with non-negative (post-ReLU-like) embeddings, tied
  W0 = 0 and T = 1000, at the default tolerance 1e-5: the discrete solution
  that backprop differentiates is accurate, but its derivative is not
  unless the step control also watches a tangent (see `Backprop`).
  Reference: central differences of the SciPy W-space solution.
  """
  problem, direction, finite_difference = stiff_problem()

  def relative_error(method):
    _, grads = engine_loss_and_gradients(
      problem, method, rtol=1e-5, atol=1e-5, max_steps=100_000
    )
    return abs(np.sum(grads[1] * direction) / finite_difference - 1)

  # Measured: 3.2% (backprop), 2.0% (forward): errors of the tolerance
  # 1e-5 grown over T = 1000; 3,500% with the state alone under control.
  assert relative_error("backprop") < 0.05
  assert relative_error("forward") < 0.05
  # The problem does exercise the failure.
  assert relative_error(comln_tf.Backprop(tangent_control=False)) > 1.0


def _support_gradients_by_finite_differences(workload, t_final, eps=1e-5):
  """Per task of a `workloads.make_workload`, d(query loss)/d(support).

  Central differences, entry by entry, of `reference_loss` (the SciPy
  W-space flow) in float64: the reference of `launch.gradient_accuracy`'s
  quantities, independent of the engine.
  """
  init_weights, support, queries = (
    np.asarray(workload[key], np.float64)
    for key in ("init_weights", "support", "queries")
  )
  gradients = []
  for task in range(len(support)):
    problem = {
      "labels": workload["support_labels"][task : task + 1],
      "query_labels": workload["query_labels"][task : task + 1],
    }
    gradient = np.zeros_like(support[task])
    for index in np.ndindex(gradient.shape):
      losses = []
      for sign in (1, -1):
        moved = support[task : task + 1].copy()
        moved[(0,) + index] += sign * eps
        losses.append(
          reference_loss(
            problem, init_weights, moved, queries[task : task + 1], t_final
          )
        )
      gradient[index] = (losses[0] - losses[1]) / (2 * eps)
    gradients.append(gradient)
  return gradients


def test_gradient_accuracy_tool_reference_matches_finite_differences():
  """`launch.gradient_accuracy`'s reference: float64, tight, task by task.

  Measured: under 1e-9 from the finite differences; 1e-7 in float32, 1e-6
  and 1e-7 at rtol = atol = 1e-7 and 1e-8 (the tool's is 1e-10); 1.6 with
  the tasks swapped. A short T: the tool solves eagerly, step by step.
  """
  from launch import gradient_accuracy  # pylint: disable=g-import-not-at-top
  from launch import workloads  # pylint: disable=g-import-not-at-top

  workload = workloads.make_workload(
    2, 3, 1, 2, 4, shared_mean=1.0, noise=0.3, tied_init=True
  )
  references = gradient_accuracy.reference_gradients(workload, 0.2, 100_000)
  expected = _support_gradients_by_finite_differences(workload, 0.2)
  assert len(references) == 2
  for reference, gradient in zip(references, expected):
    error = np.linalg.norm(reference - gradient) / np.linalg.norm(gradient)
    assert error < 1e-8, error


def test_gradient_accuracy_tool_measures_the_error():
  """`launch.gradient_accuracy` on a stiff task: plain control's error shows.

  Embeddings scaled by 10 make the flow stiff: T = 10 already spans many
  of its fastest time constants. Measured in float32 against finite
  differences: 3e-5 (backprop), 7e-5 (forward), 2e-3 with the state alone
  under control (at T = 1000: 5e-6, 1e-4 and 3e-4). Before the solvers
  weighed the state's error as it enters W, and kept P - Y summing to zero
  in float32, the last was wrong by more than 100%.
  """
  from launch import gradient_accuracy  # pylint: disable=g-import-not-at-top
  from launch import workloads  # pylint: disable=g-import-not-at-top

  workload = workloads.make_workload(
    1, 5, 1, 3, 8, shared_mean=1.0, noise=0.3, tied_init=True
  )
  for key in ("support", "queries"):
    workload[key] = workload[key] * 10
  t_final = 10.0
  # The tool's own reference (the forward method in float64 at 1e-10,
  # checked above) agrees with these to 1.5e-8 here.
  references = _support_gradients_by_finite_differences(workload, t_final)
  errors = {
    method: gradient_accuracy.gradient_errors(
      workload, t_final, method, 1e-5, 100_000, references
    )[0]
    for method in ("forward", "backprop", "backprop_plain")
  }
  assert errors["forward"][0] < 0.05 and errors["backprop"][0] < 0.05, errors
  assert errors["backprop_plain"][0] > 10 * errors["backprop"][0], errors
  assert all(num_evals > 0 for _, num_evals in errors.values())


@pytest.mark.parametrize(
  "module, args, message",
  [
    ("launch.benchmark", ["--t_finals=1,ten"], "--t_finals="),
    ("launch.benchmark", ["--shots=1.5"], "--shots="),
    ("launch.benchmark", ["--methods=forwrd"], "--methods="),
    ("launch.gradient_accuracy", ["--tolerances=0"], "--tolerances="),
  ],
)
def test_benchmark_clis_name_a_bad_list_flag(module, args, message):
  result = cli_helpers.run(module, args, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr and "expected a comma-separated list" in (
    result.stderr
  )
  assert "Traceback" not in result.stderr


def test_benchmark_times_the_plain_solve_interleaved_with_the_method():
  # The method's ratio to the plain solve comes from calls taken in turn.
  order = []

  def function(name):
    def run(value):
      order.append(name)
      return (tf.constant(value),)

    return run, [1.0]

  results = workloads.measure([function("method"), function("plain")], 3)
  assert order == ["method", "plain"] * 4
  for first, compile_seconds, times, peaks in results:
    assert first == (1.0,) and compile_seconds >= 0
    assert len(times) == 3 and len(peaks) == 3


@pytest.mark.parametrize("method_name", ["forward", "backprop"])
def test_tasks_solved_in_groups_match_finite_differences(method_name):
  # 3 tasks in groups of 2: the last group is padded.
  problem = make_problem(num_tasks=3, seed=5)
  assert_gradients_match_finite_differences(
    problem, method_name, tasks_per_solve=2
  )


@pytest.mark.parametrize("method_name", ["forward", "backprop", "adjoint"])
def test_reduced_state_equals_w_space_integration(problem, method_name):
  # Traced: eagerly the same ops run one by one, which
  # test_eager_function_and_xla_agree compares.
  weights = traced_adapt(problem, method=method_name, **TIGHTEST)
  for b in range(len(problem["support"])):
    expected = w_space_solution(
      problem["init_weights"],
      problem["support"][b],
      problem["labels"][b],
      problem["t_final"],
    )
    np.testing.assert_allclose(weights[b], expected, rtol=0, atol=1e-10)


def test_euler_is_gradient_descent(problem):
  """Euler with step h for T/h steps is ANIL with learning rate h."""
  step, num_steps = 0.05, 40
  weights = comln_tf.adapt(
    problem["init_weights"],
    problem["support"][0],
    problem["labels"][0],
    step * num_steps,
    solver="euler",
    num_steps=num_steps,
  ).numpy()
  expected = problem["init_weights"].copy()
  support, labels = problem["support"][0], np.eye(3)[problem["labels"][0]]
  for _ in range(num_steps):
    residual = _softmax(support @ expected.T) - labels
    expected -= step * residual.T @ support / len(support)
  np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)


def test_rk4_converges_to_the_flow(problem):
  weights = comln_tf.adapt(
    problem["init_weights"],
    problem["support"][0],
    problem["labels"][0],
    problem["t_final"],
    solver="rk4",
    # The error is O(h^4): 8.5e-11 at 40 steps, 1.4e-9 at 20.
    num_steps=40,
  ).numpy()
  expected = w_space_solution(
    problem["init_weights"],
    problem["support"][0],
    problem["labels"][0],
    problem["t_final"],
  )
  np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("tolerance, most_steps", [(1e-5, 5), (1e-8, 12)])
def test_dopri5_from_a_zero_state_is_accurate_without_a_slow_start(
  tolerance, most_steps
):
  # dy/dt = 1 - y from y = 0: y(1) = 1 - 1/e. Hairer's rule would start
  # at 1e-4 and need 7 and 13 steps; the first step from h1 is accepted.
  solver = comln_tf.Dopri5(rtol=tolerance, atol=tolerance)
  y, stats = solver.integrate(
    lambda y: 1.0 - y,
    tf.zeros([2, 3], tf.float64),
    tf.constant(1.0, tf.float64),
    1000,
  )
  np.testing.assert_allclose(
    y.numpy(), 1.0 - np.exp(-1.0), rtol=0, atol=tolerance
  )
  assert int(stats.num_steps) <= most_steps
  # No probe evaluation from a zero state: f(y0), then 6 per step.
  assert int(stats.num_evals) == 1 + 6 * int(stats.num_steps)


def _loss_and_gradients_function(method, **options):
  """As `engine_loss_and_gradients`, one tf.function for several problems.

  Problems of the same shapes share its trace.

  Args:
    method: the gradient method of `adapt`. **options: of `adapt`.

  Returns:
    A function of a `make_problem` dict returning (query loss, gradients
    w.r.t. (W0, X, Xq, T) as numpy arrays).
  """

  @tf.function
  def run(labels, support, queries, query_labels, init_weights, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, queries, t_final])
      weights = comln_tf.adapt(
        init_weights, support, labels, t_final, method=method, **options
      )
      logits = tf.matmul(queries, weights, transpose_b=True)
      loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(query_labels, logits)
      )
    return loss, tape.gradient(loss, [init_weights, support, queries, t_final])

  def loss_and_gradients(problem):
    names = ("labels", "support", "queries", "query_labels", "init_weights")
    loss, grads = run(
      *(tf.constant(problem[k]) for k in names),
      tf.constant(problem["t_final"], tf.float64),
    )
    return float(loss), [g.numpy() for g in grads]

  return loss_and_gradients


@pytest.mark.parametrize("method_name", ["forward", "backprop", "adjoint"])
def test_batch_equals_each_task_alone(method_name):
  # Tasks of different difficulty take different adaptive steps.
  problem = make_problem(num_tasks=3, seed=3)
  problem["support"][1] *= 3.0
  # The adjoint's backward solve controls the error of dL/ds, whose scale
  # differs between the batch (loss averaged over 3 tasks) and a task alone,
  # so its steps differ: compare it at a tight tolerance.
  options, rtol = (TIGHT, 1e-7) if method_name == "adjoint" else ({}, 1e-9)
  # One function: the tasks alone (of the same shapes) share a trace.
  loss_and_gradients = _loss_and_gradients_function(method_name, **options)
  _, batched = loss_and_gradients(problem)
  for b in range(3):
    alone = {
      k: (
        v[b : b + 1]
        if k in ("support", "labels", "queries", "query_labels")
        else v
      )
      for k, v in problem.items()
    }
    _, single = loss_and_gradients(alone)
    # The loss is a mean over tasks: task b alone has 3x its batch share.
    for index in (1, 2):
      np.testing.assert_allclose(
        batched[index][b] * 3, single[index][0], rtol=rtol, atol=1e-12
      )


def test_tangent_fields_agree():
  rng = np.random.default_rng(4)
  batch, examples, classes = 2, 5, 3
  directions = _reduced.num_directions(examples, classes)
  support = rng.normal(size=(batch, examples, 4))
  args = (
    tf.constant(rng.normal(size=(batch, examples, classes))),
    tf.constant(rng.normal(size=(batch, examples, directions, classes - 1))),
    tf.constant(rng.normal(size=(batch, examples, classes))),
    tf.constant(support @ np.swapaxes(support, 1, 2)),
    tf.constant(_softmax(rng.normal(size=(batch, examples, classes)))),
  )
  closed_form = tf.function(_reduced.TANGENT_FIELDS["closed_form"])(*args)
  accumulator = tf.function(_reduced.TANGENT_FIELDS["accumulator"])(*args)
  np.testing.assert_allclose(
    closed_form.numpy(), accumulator.numpy(), rtol=0, atol=1e-10
  )
  # And through a whole solve and gradient assembly.
  problem = make_problem(seed=5)
  _, fast = engine_loss_and_gradients(problem, "forward")
  _, generic = engine_loss_and_gradients(
    problem, comln_tf.Forward(tangent_field="accumulator")
  )
  for a, b in zip(fast, generic):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_tiny_time_returns_initial_weights(problem):
  weights = comln_tf.adapt(
    problem["init_weights"], problem["support"], problem["labels"], 1e-9
  )
  np.testing.assert_allclose(
    weights.numpy(),
    np.broadcast_to(problem["init_weights"], weights.shape),
    atol=1e-8,
  )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_time_stays_finite(problem, dtype):
  cast = lambda x: tf.constant(np.asarray(x, dtype))
  init_weights, support = (
    cast(problem["init_weights"]),
    cast(problem["support"]),
  )
  t_final = cast(1000.0)
  with tf.GradientTape() as tape:
    tape.watch([init_weights, support, t_final])
    weights = comln_tf.adapt(init_weights, support, problem["labels"], t_final)
  grads = tape.gradient(weights, [init_weights, support, t_final])
  assert weights.dtype == dtype
  assert np.all(np.isfinite(weights.numpy()))
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_soft_labels(problem):
  rng = np.random.default_rng(6)
  soft = _softmax(rng.normal(size=(6, 3)))
  weights = comln_tf.adapt(
    problem["init_weights"],
    problem["support"][0],
    soft,
    problem["t_final"],
    **TIGHTEST,
  ).numpy()
  expected = w_space_solution(
    problem["init_weights"], problem["support"][0], soft, problem["t_final"]
  )
  np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
  "method, tasks_per_solve",
  [("forward", None), ("forward", 2), ("backprop", None)],
)
def test_eager_function_and_xla_agree(method, tasks_per_solve):
  # Backprop under XLA: its probe tangent's ForwardAccumulator inside the
  # solver's conditionals (tf2xla once refused its gradient).
  problem = make_problem(num_tasks=3, seed=7)
  args = [tf.constant(problem[k]) for k in ("init_weights", "support")]
  t_final = tf.constant(problem["t_final"], tf.float64)

  def gradient(init_weights, support, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, t_final])
      weights = comln_tf.adapt(
        init_weights,
        support,
        problem["labels"],
        t_final,
        method=method,
        tasks_per_solve=tasks_per_solve,
      )
      loss = tf.reduce_sum(tf.sin(weights))
    return [weights] + tape.gradient(loss, [init_weights, support, t_final])

  eager = gradient(*args, t_final)
  for compiled in (
    tf.function(gradient),
    tf.function(gradient, jit_compile=True),
  ):
    for a, b in zip(eager, compiled(*args, t_final)):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_matches_float64(problem):
  weights64 = comln_tf.adapt(
    problem["init_weights"],
    problem["support"],
    problem["labels"],
    2.0,
    rtol=1e-8,
    atol=1e-8,
  )
  weights32 = comln_tf.adapt(
    problem["init_weights"].astype(np.float32),
    problem["support"].astype(np.float32),
    problem["labels"],
    np.float32(2.0),
  )
  assert weights32.dtype == tf.float32
  np.testing.assert_allclose(weights32.numpy(), weights64.numpy(), atol=1e-3)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_max_steps_exceeded_raises(problem, mode):
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
      max_steps=3,
    )


def test_max_steps_exceeded_under_xla_is_nan_not_silent(problem):
  run = tf.function(
    lambda: comln_tf.adapt(
      problem["init_weights"],
      problem["support"],
      problem["labels"],
      50.0,
      max_steps=3,
    ),
    jit_compile=True,
  )
  assert np.all(np.isnan(run().numpy()))


# Peak memory of eager meta-gradients at times T, in a fresh process (the
# CPU allocator only keeps statistics in BFC mode, chosen before TF starts):
# one line "method T peak" per method and T, each peak from its own reset.
_EAGER_PEAK_SCRIPT = """
import gc
import sys
import numpy as np
import tensorflow as tf
import comln_tf
rng = np.random.default_rng(0)
support = tf.constant(np.abs(rng.normal(size=(1, 10, 16))) + 0.5)
queries = tf.constant(rng.normal(size=(1, 20, 16)))

def peak(method, t_final):
  t_final = tf.constant(t_final, tf.float64)
  tf.config.experimental.reset_memory_stats("CPU:0")
  with tf.GradientTape() as tape:
    tape.watch([support, queries, t_final])
    weights = comln_tf.adapt(tf.zeros([10, 16], tf.float64), support,
                             np.arange(10)[None], t_final, method=method)
    loss = tf.reduce_sum(tf.matmul(queries, weights, transpose_b=True) ** 2)
  tape.gradient(loss, [support, queries, t_final])
  return tf.config.experimental.get_memory_info("CPU:0")["peak"]

for method in sys.argv[1].split(","):
  for t_final in sys.argv[2].split(","):
    print(method, t_final, peak(method, float(t_final)))
    gc.collect()
"""

_MEMORY_TIMES = (1.0, 10.0)


@pytest.fixture(scope="module")
def eager_peak_bytes():
  """{(method, T): peak bytes} of eager meta-gradients, one process for all."""
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _EAGER_PEAK_SCRIPT,
      "forward,adjoint",
      ",".join(str(t) for t in _MEMORY_TIMES),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
    env=dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true"),
  )
  peaks = {}
  for line in result.stdout.splitlines():
    method, t_final, peak = line.split()
    peaks[method, float(t_final)] = int(peak)
  return peaks


@pytest.mark.parametrize("method", ["forward", "adjoint"])
def test_eager_memory_does_not_grow_with_time(eager_peak_bytes, method):
  # In eager mode a tape records whatever runs inside tf.custom_gradient
  # unless the engine cuts it; then every solver step would be kept.
  # T = 1 and 10: 4 and 13 solver steps. Growth with T would add at least
  # a step's 7 Runge-Kutta stages of s and its sensitivities (7 x 105 KB
  # here) per step (without the cut, measured: 12.8 MB per step for
  # forward; 1.1 MB in all from T = 1 to 10 for the adjoint). The slack,
  # half of the 7 x 105 KB, covers where eager allocation order puts the
  # peak (the same at T = 1 and 10, 0.26 MB apart from T = 1 to 3,000).
  # Each peak follows a reset of the statistics, after the runs before it
  # in the process: anything they left allocated only adds to it.
  short, long = (eager_peak_bytes[method, t] for t in _MEMORY_TIMES)
  assert long <= short + 7 * 105_000 // 2, (short, long)
