r"""Benchmark of the adaptation engine: each method beside the plain solve.

Workload: a meta-batch of 16 tasks, N-way k-shot, embedding size d = 640,
15 queries per class, float32, dopri5 with rtol = atol = 1e-5. A gradient
method's case computes the query loss and the full meta-gradient with
respect to W0, the support and query embeddings and T; the "plain" case
computes the query loss after the plain solve of s (no gradient, no
tangent), the floor every meta-gradient pays. The table shows each
method's time and its ratio to the plain solve of the same shape and T,
timed in the method's process with the two functions' calls interleaved
(timings of separate processes differed by up to 30% from one process to
the next). Compiled with XLA (`jit_compile=True`) except
the methods in --no_xla (backprop's tape under XLA preallocates
`max_steps` iterations).

Each case runs in its own process so that the peak memory
(`tf.config.experimental.get_memory_info("CPU:0")["peak"]`, exact bytes on
CPU, XLA buffers included) belongs to that case alone. TensorFlow keeps
allocator statistics on CPU only with its BFC allocator, which the case
processes select with TF_CPU_ALLOCATOR_USE_BFC=true.

The machine's float32 matmul peak is measured first, in the parent process.

Usage:
  python -m launch.benchmark                    # the whole table
  python -m launch.benchmark --methods=plain,discrete_adjoint --ways=20 \
      --shots=1,5 --t_finals=1,100,10000
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

import launch
from launch import machine
from launch import workloads

_METHODS = flags.DEFINE_list(
  "methods",
  ["plain", "discrete_adjoint", "forward", "adjoint", "backprop"],
  "Cases per shape and T: plain (the solve of s and the query loss, no "
  "gradient), or a gradient method: "
  + ", ".join(workloads.METHODS)
  + " (backprop_plain: backprop with the step control on the state alone, "
  "comln_tf.Backprop(tangent_control=False)).",
)
_WAYS = flags.DEFINE_list("ways", ["5", "20"], "Classes per task.")
_SHOTS = flags.DEFINE_list("shots", ["1", "5"], "Shots per class.")
_T_FINALS = flags.DEFINE_list(
  "t_finals", ["1", "100", "10000"], "Integration times T."
)
_SKIP = flags.DEFINE_list(
  "skip",
  ["forward@20:5"],
  "Cases not run, as method@ways:shots (forward at 20-way 5-shot carries "
  "6,950 sensitivity directions per task: about 0.9 GB and minutes per "
  "meta-batch).",
)
_NO_XLA = flags.DEFINE_list(
  "no_xla",
  ["backprop", "backprop_plain"],
  "Methods run in tf.function without XLA.",
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 5, "Timed runs per case (the median is shown)."
)
_TASKS = flags.DEFINE_integer("tasks", 16, "Tasks per meta-batch.")
_TASKS_PER_SOLVE = flags.DEFINE_integer(
  "tasks_per_solve",
  4,
  "adapt's tasks_per_solve: tasks solved together (0: all at once). "
  "Groups of 4 keep the solver state in a 2-core CPU's cache.",
  lower_bound=0,
)
_QUERIES = flags.DEFINE_integer("queries", 15, "Queries per class.")
_SIZE = flags.DEFINE_integer("embedding_size", 640, "Embedding size d.")
_CASE = flags.DEFINE_string(
  "case", None, "Internal: run one case (JSON) and print JSON."
)
_MAX_STEPS = flags.DEFINE_integer(
  "max_steps",
  10_000,
  "Solver step bound (adapt's default). Under XLA, backprop preallocates "
  "its tape for this many steps, so its memory grows with it.",
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Also write the results as JSON here."
)

PLAIN = workloads.PLAIN

launch.require_choices(_METHODS, (PLAIN,) + workloads.METHODS)
launch.require_choices(_NO_XLA, workloads.METHODS)
launch.require_positive_list(_WAYS, int)
launch.require_positive_list(_SHOTS, int)
launch.require_positive_list(_T_FINALS)


def run_case(case):
  """Times one (method, ways, shots, T) case in this process; returns a dict.

  A gradient method's case also times the plain solve of the same workload
  in the same process, its calls interleaved with the method's
  ("plain_ms"): the ratio of the two is what the table reports.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  data = workloads.make_workload(
    case["tasks"],
    case["ways"],
    case["shots"],
    case["queries"],
    case["embedding_size"],
  )
  names = [case["method"]] + ([] if case["method"] == PLAIN else [PLAIN])
  results = workloads.measure(
    [
      workloads.query_loss_function(
        data,
        name,
        "dopri5",
        case["t_final"],
        case["max_steps"],
        case["tasks_per_solve"],
        case["xla"] or name == PLAIN,
      )
      for name in names
    ],
    case["repeats"],
  )
  (loss, grads, stats), compile_seconds, times, peaks = results[0]
  finite = bool(np.isfinite(loss)) and all(
    bool(np.all(np.isfinite(g))) for g in grads
  )
  result = dict(
    case,
    ms=1000 * float(np.median(times)),
    compile_s=compile_seconds,
    peak_mb=max(peaks) / 2**20,
    num_evals=int(stats.num_evals),
    finite=finite,
  )
  if len(results) > 1:
    result["plain_ms"] = 1000 * float(np.median(results[1][2]))
  return result


def _run_in_subprocess(case):
  output = subprocess.run(
    [sys.executable, "-m", "launch.benchmark", f"--case={json.dumps(case)}"],
    capture_output=True,
    text=True,
    check=False,
    env=dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true"),
  )
  for line in output.stdout.splitlines():
    if line.startswith("{"):
      return json.loads(line)
  return dict(case, error=output.stderr.strip().splitlines()[-1:])


def _shape(result):
  return f"{result['ways']}-way {result['shots']}-shot"


def format_table(results):
  """Markdown table: a row per shape and T, a column per method.

  Each cell: ms per meta-batch, its ratio to the plain solve timed in the
  same process, peak MB and ODE evaluations of the forward solve.
  """
  methods = list(dict.fromkeys(r["method"] for r in results))
  rows = {}
  for r in results:
    rows.setdefault((_shape(r), r["t_final"]), {})[r["method"]] = r
  lines = [
    "| shape | T | " + " | ".join(methods) + " |",
    "|---|---|" + "---|" * len(methods),
  ]
  for (shape, t_final), by_method in rows.items():
    cells = []
    for method in methods:
      r = by_method.get(method)
      if r is None:
        cells.append("—")
      elif "error" in r:
        cells.append(f"error: {r['error']}")
      else:
        ratio = f" ({r['ms'] / r['plain_ms']:.1f}x)" if "plain_ms" in r else ""
        note = "" if r["finite"] else ", NOT FINITE"
        xla = "" if r["xla"] else ", no XLA"
        cells.append(
          f"{r['ms']:.1f}{ratio}; {r['peak_mb']:.1f} MB; "
          f"{r['num_evals']} evals{xla}{note}"
        )
    lines.append(f"| {shape} | {t_final:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  launch.start(argv)
  if _CASE.value:
    print(json.dumps(run_case(json.loads(_CASE.value))))
    return
  peak = machine.matmul_peak_gflops()
  results = []
  for ways in _WAYS.value:
    for shots in _SHOTS.value:
      for t_final in _T_FINALS.value:
        for method in _METHODS.value:
          if f"{method}@{ways}:{shots}" in _SKIP.value:
            continue
          case = dict(
            method=method,
            ways=int(ways),
            shots=int(shots),
            t_final=float(t_final),
            tasks=_TASKS.value,
            queries=_QUERIES.value,
            embedding_size=_SIZE.value,
            repeats=_REPEATS.value,
            max_steps=_MAX_STEPS.value,
            tasks_per_solve=_TASKS_PER_SOLVE.value,
            xla=method not in _NO_XLA.value,
          )
          results.append(_run_in_subprocess(case))
          r = results[-1]
          print(
            json.dumps(
              {
                k: r.get(k)
                for k in (
                  "method",
                  "ways",
                  "shots",
                  "t_final",
                  "ms",
                  "peak_mb",
                  "num_evals",
                  "error",
                )
              }
            ),
            flush=True,
          )
  print()
  print(format_table(results))
  print(
    f"\nfloat32 matmul peak, measured before the cases: {peak:.1f} GFLOP/s."
  )
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
