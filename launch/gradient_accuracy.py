r"""Accuracy of the meta-gradient by method, tolerance and T.

For synthetic tasks (`launch.workloads.make_workload`: class-structured
post-ReLU features, times --feature_scale), computes the gradient of the
query loss with respect to the support embeddings with each method in
float32 and compares it with a float64 reference solved at rtol = atol =
1e-10 by the forward method (which the tests check against finite
differences of an independent W-space solution). Prints, per case, the
relative error |g - g_ref| / |g_ref| and the ODE evaluations.

Backprop differentiates the solver's discrete steps; with step control on
the state alone ("backprop_plain") that derivative can be wrong by orders
of magnitude at large T or with large embeddings. See README, "Tolerances
matter".

Usage:
  python -m launch.gradient_accuracy
  python -m launch.gradient_accuracy --t_finals=100,20000 --feature_scale=10
"""

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import comln_tf
import launch
from launch import workloads

_METHODS = flags.DEFINE_list(
  "methods",
  ["forward", "backprop", "backprop_plain"],
  "Gradient methods: forward, backprop, adjoint, backprop_plain.",
)
_TOLERANCES = flags.DEFINE_list(
  "tolerances", ["1e-5", "1e-6", "1e-7"], "rtol = atol of each run."
)
_T_FINALS = flags.DEFINE_list(
  "t_finals", ["100", "1000", "20000"], "Integration times T."
)
_WAYS = flags.DEFINE_integer("ways", 20, "Classes per task.")
_SHOTS = flags.DEFINE_integer("shots", 1, "Shots per class.")
_QUERIES = flags.DEFINE_integer("queries", 5, "Queries per class.")
_SIZE = flags.DEFINE_integer("embedding_size", 64, "Embedding size d.")
_TASKS = flags.DEFINE_integer("tasks", 4, "Tasks (one solve each).")
_SCALE = flags.DEFINE_float(
  "feature_scale", 4.0, "Multiplies the embeddings (larger: stiffer)."
)
_SHARED = flags.DEFINE_float(
  "shared_mean",
  1.0,
  "Scale of a mean shared by a task's classes "
  "(correlated features, as a trained backbone's).",
)
_NOISE = flags.DEFINE_float(
  "noise", 0.3, "Spread of the examples around their class mean."
)
_TIED = flags.DEFINE_bool(
  "tied_init", True, "W0 = 0, as with --tie_init_rows in training."
)
_MAX_STEPS = flags.DEFINE_integer("max_steps", 100_000, "Solver step bound.")

launch.require_choices(_METHODS, workloads.METHODS)
launch.require_positive_list(_TOLERANCES)
launch.require_positive_list(_T_FINALS)


def support_gradient(
  workload, task, t_final, method, tolerance, dtype, max_steps
):
  """Gradient of one task's query loss w.r.t. its support embeddings.

  Args:
    workload: `workloads.make_workload` output (numpy arrays).
    task: index of the task.
    t_final: float, T.
    method: a `--methods` entry.
    tolerance: rtol = atol.
    dtype: tf.float32 or tf.float64.
    max_steps: solver step bound.

  Returns:
    (gradient [M, d] numpy array, ODE evaluations int).
  """
  support = tf.constant(workload["support"][task], dtype)
  with tf.GradientTape() as tape:
    tape.watch(support)
    weights, stats = comln_tf.adapt(
      tf.constant(workload["init_weights"], dtype),
      support,
      workload["support_labels"][task],
      tf.constant(t_final, dtype),
      method=workloads.method_for(method),
      rtol=tolerance,
      atol=tolerance,
      max_steps=max_steps,
      return_stats=True,
    )
    logits = tf.matmul(
      tf.constant(workload["queries"][task], dtype), weights, transpose_b=True
    )
    loss = tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(
        workload["query_labels"][task], logits
      )
    )
  return tape.gradient(loss, support).numpy(), int(stats.num_evals)


def reference_gradients(workload, t_final, max_steps):
  """Per task, the float64 forward gradient at rtol = atol = 1e-10."""
  return [
    support_gradient(
      workload, task, t_final, "forward", 1e-10, tf.float64, max_steps
    )[0]
    for task in range(len(workload["support"]))
  ]


def gradient_errors(
  workload, t_final, method, tolerance, max_steps, references
):
  """Per task: (relative error of the float32 gradient, ODE evaluations).

  Args:
    workload, t_final, method, tolerance, max_steps: as `support_gradient`.
    references: `reference_gradients(workload, t_final, ...)`.

  Returns:
    list of (float, int), one per task.
  """
  results = []
  for task, reference in enumerate(references):
    gradient, num_evals = support_gradient(
      workload, task, t_final, method, tolerance, tf.float32, max_steps
    )
    results.append(
      (
        float(np.linalg.norm(gradient - reference) / np.linalg.norm(reference)),
        num_evals,
      )
    )
  return results


def main(argv):
  del argv
  workload = workloads.make_workload(
    _TASKS.value,
    _WAYS.value,
    _SHOTS.value,
    _QUERIES.value,
    _SIZE.value,
    shared_mean=_SHARED.value,
    noise=_NOISE.value,
    tied_init=_TIED.value,
  )
  for key in ("support", "queries"):
    workload[key] = workload[key] * _SCALE.value
  print("| T | method | rtol = atol | relative error per task | ODE evals |")
  print("|---|---|---|---|---|")
  for t_final in _T_FINALS.value:
    references = reference_gradients(workload, float(t_final), _MAX_STEPS.value)
    for tolerance in _TOLERANCES.value:
      for method in _METHODS.value:
        results = gradient_errors(
          workload,
          float(t_final),
          method,
          float(tolerance),
          _MAX_STEPS.value,
          references,
        )
        errors = " / ".join(f"{e:.1e}" for e, _ in results)
        evals = " / ".join(str(n) for _, n in results)
        print(
          f"| {t_final} | {method} | {tolerance} | {errors} | {evals} |",
          flush=True,
        )


if __name__ == "__main__":
  app.run(main)
