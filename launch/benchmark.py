r"""Benchmark of the adaptation engine: time, memory and ODE evaluations.

Workload (issue 2): a meta-batch of 16 tasks, 5-way 5-shot or 5-way 1-shot,
embedding size d = 640, 15 queries per class, float32, dopri5 with
rtol = atol = 1e-5; one step computes the query loss and the full
meta-gradient with respect to W0, the support and query embeddings and T,
compiled with XLA (`jit_compile=True`).

Each case runs in its own process so that the peak memory
(`tf.config.experimental.get_memory_info("CPU:0")["peak"]`, exact bytes on
CPU, XLA buffers included) belongs to that case alone. TensorFlow keeps
allocator statistics on CPU only with its BFC allocator, which the case
processes select with TF_CPU_ALLOCATOR_USE_BFC=true.

Usage:
  python -m launch.benchmark                    # the whole table
  python -m launch.benchmark --methods=forward --t_finals=1,10,100,1000
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

import launch
from launch import workloads

_METHODS = flags.DEFINE_list(
    "methods", ["forward", "backprop", "adjoint"],
    "Gradient methods to compare: forward, backprop, adjoint, or "
    "backprop_plain (backprop with the step control on the state alone, "
    "comln_tf.Backprop(tangent_control=False)).")
_SHOTS = flags.DEFINE_list("shots", ["5", "1"], "Shots per class.")
_T_FINALS = flags.DEFINE_list("t_finals", ["1", "10", "100", "1000"],
                              "Integration times T.")
_REPEATS = flags.DEFINE_integer("repeats", 5,
                                "Timed runs per case (the median is shown).")
_TASKS = flags.DEFINE_integer("tasks", 16, "Tasks per meta-batch.")
_TASKS_PER_SOLVE = flags.DEFINE_integer(
    "tasks_per_solve", 4,
    "adapt's tasks_per_solve: tasks solved together (0: all 16 at once). "
    "Groups of 4 keep the solver state in a 2-core CPU's cache.",
    lower_bound=0)
_WAYS = flags.DEFINE_integer("ways", 5, "Classes per task.")
_QUERIES = flags.DEFINE_integer("queries", 15, "Queries per class.")
_SIZE = flags.DEFINE_integer("embedding_size", 640, "Embedding size d.")
_CASE = flags.DEFINE_string("case", None,
                            "Internal: run one case (JSON) and print JSON.")
_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", 1000,
    "Solver step bound. Under XLA, backprop preallocates its tape for this "
    "many steps, so its memory grows with it.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Also write the results as JSON here.")

launch.require_choices(_METHODS, workloads.METHODS)
launch.require_positive_list(_SHOTS, int)
launch.require_positive_list(_T_FINALS)


def run_case(case):
  """Times one (method, shots, T) case in this process; returns a dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import comln_tf  # pylint: disable=g-import-not-at-top

  data = workloads.make_workload(case["tasks"], case["ways"], case["shots"],
                                 case["queries"], case["embedding_size"])
  inputs = [tf.constant(data[k]) for k in ("init_weights", "support",
                                           "queries")]
  t_final = tf.constant(float(case["t_final"]), tf.float32)

  @tf.function(jit_compile=True)
  def meta_gradient(init_weights, support, queries, t_final):
    with tf.GradientTape() as tape:
      tape.watch([init_weights, support, queries, t_final])
      weights, stats = comln_tf.adapt(
          init_weights, support, data["support_labels"], t_final,
          method=workloads.method_for(case["method"]), rtol=1e-5, atol=1e-5,
          max_steps=case["max_steps"],
          tasks_per_solve=case["tasks_per_solve"] or None, return_stats=True)
      logits = tf.matmul(queries, weights, transpose_b=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          data["query_labels"], logits))
    grads = tape.gradient(loss, [init_weights, support, queries, t_final])
    return loss, grads, stats.num_evals

  start = time.perf_counter()
  outputs = meta_gradient(*inputs, t_final)
  loss, grads, num_evals = tf.nest.map_structure(lambda x: x.numpy(), outputs)
  compile_seconds = time.perf_counter() - start
  times, peaks = [], []
  for _ in range(case["repeats"]):
    # The previous run's outputs are freed first: the peak is one run's.
    del outputs
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = time.perf_counter()
    outputs = meta_gradient(*inputs, t_final)
    outputs[0].numpy()
    times.append(time.perf_counter() - start)
    peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"])
  peak = max(peaks)
  finite = bool(np.isfinite(loss)) and all(
      bool(np.all(np.isfinite(g))) for g in grads)
  return dict(case, ms=1000 * float(np.median(times)),
              compile_s=compile_seconds, peak_mb=peak / 2**20,
              num_evals=int(num_evals), finite=finite)


def _run_in_subprocess(case):
  output = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", f"--case={json.dumps(case)}"],
      capture_output=True, text=True, check=False,
      env=dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true"))
  for line in output.stdout.splitlines():
    if line.startswith("{"):
      return json.loads(line)
  return dict(case, error=output.stderr.strip().splitlines()[-1:])


def format_table(results):
  """Markdown table of the results, one row per case."""
  lines = ["| method | shots | T | ms / meta-batch | peak MB | ODE evals | "
           "finite | compile s |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['shots']} | {r['t_final']} | "
                   f"error: {r['error']} | | | | |")
      continue
    lines.append(
        f"| {r['method']} | {r['shots']} | {r['t_final']} | {r['ms']:.1f} | "
        f"{r['peak_mb']:.1f} | {r['num_evals']} | {r['finite']} | "
        f"{r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CASE.value:
    print(json.dumps(run_case(json.loads(_CASE.value))))
    return
  results = []
  for shots in _SHOTS.value:
    for method in _METHODS.value:
      for t_final in _T_FINALS.value:
        case = dict(method=method, shots=int(shots), t_final=float(t_final),
                    tasks=_TASKS.value, ways=_WAYS.value,
                    queries=_QUERIES.value, embedding_size=_SIZE.value,
                    repeats=_REPEATS.value, max_steps=_MAX_STEPS.value,
                    tasks_per_solve=_TASKS_PER_SOLVE.value)
        results.append(_run_in_subprocess(case))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
  print()
  print(format_table(results))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
