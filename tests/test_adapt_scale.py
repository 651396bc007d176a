"""The adapted weights at every scale of the embeddings, against SciPy's LSODA.

The solvers' tolerances hold for the adapted weights W, not only for the
reduced state s (W = W0 - s^T X magnifies s's error by the embeddings'
scale), and float32 does not drift along the shift of all rows of W that
the softmax ignores. The reference is the gradient flow in W-space,
integrated by SciPy's LSODA (ODEPACK's Adams, or BDF with the exact
Jacobian where the flow is stiff) in float64: independent of the engine's
reduction, its solvers and its precision. Its W agrees with SciPy's
implicit Radau (exact Jacobian, same tolerances) within 3e-10 in every
case here, without Radau's dense LU factorisations of the N d x N d
system at every few steps.
"""

import functools

import numpy as np
import pytest
from scipy import integrate
import tensorflow as tf

import comln_tf
import references

SCALES = (1.0, 10.0, 100.0, 1000.0)
TIMES = (10.0, 1000.0)
WAYS, SHOTS, SIZE = 5, 2, 32


def _problem(scale):
  rng = np.random.default_rng(0)
  embeddings = scale * rng.standard_normal((WAYS * SHOTS, SIZE))
  labels = np.repeat(np.arange(WAYS), SHOTS)
  return np.zeros((WAYS, SIZE)), embeddings, labels


@functools.cache
def _reference_weights(scale, t_final):
  """W(T) of dW/dt = -(1/M) (softmax(X W^T) - Y)^T X by LSODA, float64."""
  init_weights, embeddings, labels = _problem(scale)
  num_examples = len(embeddings)
  targets = np.eye(WAYS)[labels]
  outer = np.einsum("ik,il->ikl", embeddings, embeddings)

  def field(_, flat):
    probs = references.softmax(embeddings @ flat.reshape(WAYS, SIZE).T)
    return (-((probs - targets).T @ embeddings) / num_examples).ravel()

  def jacobian(_, flat):
    probs = references.softmax(embeddings @ flat.reshape(WAYS, SIZE).T)
    # d softmax_n / d logit_m = p_n (delta_nm - p_m), one matrix per example.
    softmax_jacobians = np.einsum("in,nm->inm", probs, np.eye(WAYS)) - (
      np.einsum("in,im->inm", probs, probs)
    )
    blocks = -np.einsum("inm,ikl->nkml", softmax_jacobians, outer)
    return blocks.reshape(WAYS * SIZE, WAYS * SIZE) / num_examples

  solution = integrate.solve_ivp(
    field,
    (0.0, t_final),
    init_weights.ravel(),
    method="LSODA",
    jac=jacobian,
    rtol=1e-9,
    atol=1e-12,
  )
  assert solution.success, solution.message
  return solution.y[:, -1].reshape(WAYS, SIZE)


@functools.cache
def _adapt_function(mode, dtype, **options):
  """adapt(W0, X, labels, T) eagerly, or traced once for every scale and T."""

  def run(w0, x, y, t_final):
    return comln_tf.adapt(w0, x, y, t_final, **options)

  if mode == "eager":
    return run
  return tf.function(
    run,
    jit_compile=mode == "xla",
    input_signature=[
      tf.TensorSpec([WAYS, SIZE], dtype),
      tf.TensorSpec([WAYS * SHOTS, SIZE], dtype),
      tf.TensorSpec([WAYS * SHOTS], tf.int64),
      tf.TensorSpec([], dtype),
    ],
  )


def _adapt_in(mode, dtype, scale, t_final, **options):
  init_weights, embeddings, labels = _problem(scale)
  weights = _adapt_function(mode, dtype, **options)(
    tf.constant(init_weights, dtype),
    tf.constant(embeddings, dtype),
    tf.constant(labels, tf.int64),
    tf.constant(t_final, dtype),
  )
  return weights.numpy().astype(np.float64)


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_weights_match_the_reference_at_every_scale(mode, dtype):
  # The default options (method "auto", dopri5, rtol = atol = 1e-5).
  # Eagerly (the same ops as in a graph, one at a time) the smallest and
  # the largest scale, to the shorter T (at the largest scale, some
  # examples' top probability already rounds to 1 in float32 there).
  scales = SCALES if mode != "eager" else (SCALES[0], SCALES[-1])
  times = TIMES if mode != "eager" else TIMES[:1]
  for scale in scales:
    for t_final in times:
      weights = _adapt_in(mode, dtype, scale, t_final)
      error = np.abs(weights - _reference_weights(scale, t_final)).max()
      assert error <= 1e-3, (scale, t_final, error)


@pytest.mark.parametrize("method", ["backprop", "forward", "adjoint"])
def test_every_method_is_accurate_on_large_embeddings(method):
  weights = _adapt_in("graph", tf.float64, 100.0, 1000.0, method=method)
  error = np.abs(weights - _reference_weights(100.0, 1000.0)).max()
  assert error <= 1e-3, error


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
def test_tolerances_hold_for_the_weights_at_every_scale(dtype):
  # Tighter tolerances give proportionally closer weights, whatever the
  # embeddings' scale: the tolerances are on W, not on the reduced state.
  tolerance = 1e-8 if dtype == tf.float64 else 1e-6
  for scale in SCALES:
    reference = _reference_weights(scale, 10.0)
    weights = _adapt_in(
      "xla", dtype, scale, 10.0, rtol=tolerance, atol=tolerance
    )
    error = np.abs(weights - reference).max()
    assert error <= 100 * tolerance * max(1.0, np.abs(reference).max()), (
      scale,
      error,
    )


def test_float32_does_not_drift_along_the_ignored_shift():
  # Once the top class's probability rounds to 1 in float32, P - Y
  # computed naively no longer sums to zero and every row of W drifts by
  # the same vector (invisible to the softmax, wrong as weights).
  weights = _adapt_in("graph", tf.float32, 1000.0, 1000.0, method="backprop")
  reference = _reference_weights(1000.0, 1000.0)
  mean_row_error = np.abs((weights - reference).mean(axis=0)).max()
  assert mean_row_error <= 1e-5, mean_row_error


def test_a_solve_out_of_steps_says_the_flow_may_be_stiff():
  init_weights, embeddings, labels = _problem(1000.0)
  with pytest.raises(tf.errors.InvalidArgumentError, match="stiff") as info:
    comln_tf.adapt(
      tf.constant(init_weights),
      tf.constant(embeddings),
      tf.constant(labels),
      1000.0,
      max_steps=5,
    )
  message = str(info.value)
  assert "did not reach t_final within max_steps=5" in message
  assert "tfp_bdf" in message and "normalise" in message
