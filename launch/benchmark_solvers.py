r"""Benchmark of the ODE solvers: native dopri5 beside TFP's solvers.

Cases are (solver, method) pairs on a workload and a time T. Workloads: a
meta-batch of 16 tasks, 5-way 1-shot or 5-shot, d = 640, 15 queries per
class (`launch.workloads.make_workload`, Gram eigenvalues up to ~30), and
"stiff": the 5-way 1-shot batch with every embedding scaled so that the
largest Gram eigenvalue of the batch is --stiff_gram_max (large-norm
features, as ResNet-12 without pooling at initialisation). float32,
rtol = atol = 1e-5, tasks solved in groups of --tasks_per_solve. A
gradient method's case computes the query loss and its meta-gradient with
respect to W0, the support and query embeddings and T; "plain" is the
solve of s and the query loss alone (no gradient): for dopri5 and
tfp_dopri5 `Backprop(tangent_control=False)`, for tfp_bdf the forward solve
of TFP's adjoint, which is the same.

Each case runs in its own process (peak memory from
`tf.config.experimental.get_memory_info("CPU:0")["peak"]` with
TF_CPU_ALLOCATOR_USE_BFC=true) and reports the median time of --repeats
runs after a first (compiling) run, the forward solve's vector-field
evaluations, steps and Jacobian evaluations, under XLA or tf.function.

Usage:
  python -m launch.benchmark_solvers
  python -m launch.benchmark_solvers --cases=tfp_bdf:plain \
      --workloads=stiff --t_finals=1 --xla=false
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

import launch
from launch import workloads

# workload name -> (shots, stiff).
WORKLOADS = {"5w1s": (1, False), "5w5s": (5, False), "stiff": (1, True)}
SOLVERS = ("dopri5", "tfp_dopri5", "tfp_bdf")
PLAIN = workloads.PLAIN

_CASES = flags.DEFINE_list(
  "cases",
  [
    "dopri5:plain",
    "tfp_dopri5:plain",
    "tfp_bdf:plain",
    "dopri5:forward",
    "tfp_dopri5:forward",
    "tfp_dopri5:adjoint",
    "tfp_bdf:adjoint",
  ],
  "solver:method pairs; solver in " + ", ".join(SOLVERS) + "; method "
  "plain (no gradient) or a gradient method of adapt.",
)
_WORKLOADS = flags.DEFINE_list(
  "workloads", list(WORKLOADS), "Workloads: " + ", ".join(WORKLOADS) + "."
)
_T_FINALS = flags.DEFINE_list(
  "t_finals", ["1", "100", "10000"], "Integration times T."
)
_XLA = flags.DEFINE_list(
  "xla",
  ["true"],
  "Compile with XLA (true), tf.function only (false) or both (true,false).",
)
_SKIP = flags.DEFINE_list(
  "skip",
  [],
  "Cases not run, as solver:method@workload (e.g. tfp_bdf:forward@5w5s).",
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Timed runs per case (the median is shown)."
)
_TASKS = flags.DEFINE_integer("tasks", 16, "Tasks per meta-batch.")
_TASKS_PER_SOLVE = flags.DEFINE_integer(
  "tasks_per_solve",
  4,
  "adapt's tasks_per_solve (0: all at once).",
  lower_bound=0,
)
_STIFF_GRAM_MAX = flags.DEFINE_float(
  "stiff_gram_max",
  1e5,
  "Largest Gram eigenvalue of the stiff workload's batch.",
  lower_bound=1,
)
_MAX_STEPS = flags.DEFINE_integer(
  "max_steps", 10_000, "adapt's max_steps.", lower_bound=1
)
_TIMEOUT = flags.DEFINE_integer(
  "timeout", 300, "Seconds before a case is given up.", lower_bound=1
)
_CASE = flags.DEFINE_string(
  "case", None, "Internal: run one case (JSON) and print JSON."
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Also write the results as JSON here."
)

launch.require_choices(_WORKLOADS, tuple(WORKLOADS))
launch.require_choices(_XLA, ("true", "false"))
launch.require_positive_list(_T_FINALS)
flags.register_validator(
  _CASES,
  lambda cases: (
    bool(cases)
    and all(
      case.count(":") == 1 and case.split(":")[0] in SOLVERS for case in cases
    )
  ),
  message="expected a comma-separated list of solver:method, solver in "
  + ", ".join(SOLVERS),
)


def make_data(workload, tasks, stiff_gram_max, seed=0):
  """The workload's arrays (see `launch.workloads.make_workload`).

  Returns:
    (dict of numpy arrays, (smallest, largest) Gram eigenvalue over the
    batch's tasks).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  shots, stiff = WORKLOADS[workload]
  data = workloads.make_workload(tasks, 5, shots, 15, 640, seed=seed)

  def gram_eigenvalues():
    support = data["support"].astype(np.float64)
    return np.linalg.eigvalsh(support @ np.swapaxes(support, 1, 2))

  if stiff:
    scale = np.sqrt(stiff_gram_max / gram_eigenvalues().max())
    for key in ("support", "queries"):
      data[key] = (data[key] * scale).astype(np.float32)
  eigenvalues = gram_eigenvalues()
  return data, (float(eigenvalues.min()), float(eigenvalues.max()))


def run_case(case):
  """Times one case in this process; returns a dict of its results."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  data, eigenvalues = make_data(
    case["workload"], case["tasks"], case["stiff_gram_max"]
  )
  loss, grads, stats, compile_seconds, times, peaks = workloads.time_query_loss(
    data,
    case["method"],
    case["solver"],
    case["t_final"],
    case["max_steps"],
    case["tasks_per_solve"],
    case["xla"],
    case["repeats"],
  )
  finite = bool(np.isfinite(loss)) and all(
    bool(np.all(np.isfinite(g))) for g in grads
  )
  return dict(
    case,
    ms=1000 * float(np.median(times)),
    compile_s=compile_seconds,
    peak_mb=max(peaks) / 2**20,
    num_evals=int(stats.num_evals),
    num_steps=int(stats.num_steps),
    num_jacobian_evals=int(stats.num_jacobian_evals),
    finite=finite,
    gram_eigenvalues=eigenvalues,
  )


def _run_in_subprocess(case, timeout):
  try:
    output = subprocess.run(
      [
        sys.executable,
        "-m",
        "launch.benchmark_solvers",
        f"--case={json.dumps(case)}",
      ],
      capture_output=True,
      text=True,
      check=False,
      timeout=timeout,
      env=dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true"),
    )
  except subprocess.TimeoutExpired:
    return dict(case, error=f"over {timeout} s")
  for line in output.stdout.splitlines():
    if line.startswith("{"):
      return json.loads(line)
  lines = [
    line
    for line in output.stderr.strip().splitlines()
    if "Error" in line or "error" in line
  ]
  return dict(case, error=(lines or ["no output"])[-1][:200])


def format_table(results):
  """Markdown table, a row per case."""
  lines = [
    "| workload | T | solver | method | XLA | ms | peak MB | evals | "
    "steps | Jacobians | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    head = (
      f"| {r['workload']} | {r['t_final']:g} | {r['solver']} | "
      f"{r['method']} | {'yes' if r['xla'] else 'no'} |"
    )
    if "error" in r:
      lines.append(f"{head} error: {r['error']} | | | | | |")
      continue
    note = "" if r["finite"] else " (NOT FINITE)"
    lines.append(
      f"{head} {r['ms']:.1f}{note} | {r['peak_mb']:.1f} | "
      f"{r['num_evals']} | {r['num_steps']} | {r['num_jacobian_evals']} | "
      f"{r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


def cases_from_flags():
  """The cases the flags ask for, in table order."""
  cases = []
  for workload in _WORKLOADS.value:
    for t_final in _T_FINALS.value:
      for xla in _XLA.value:
        for pair in _CASES.value:
          if f"{pair}@{workload}" in _SKIP.value:
            continue
          solver, method = pair.split(":")
          cases.append(
            dict(
              workload=workload,
              t_final=float(t_final),
              solver=solver,
              method=method,
              xla=xla == "true",
              tasks=_TASKS.value,
              tasks_per_solve=_TASKS_PER_SOLVE.value,
              stiff_gram_max=_STIFF_GRAM_MAX.value,
              max_steps=_MAX_STEPS.value,
              repeats=_REPEATS.value,
            )
          )
  return cases


def main(argv):
  launch.start(argv)
  if _CASE.value:
    print(json.dumps(run_case(json.loads(_CASE.value))))
    return
  results = []
  for case in cases_from_flags():
    results.append(_run_in_subprocess(case, _TIMEOUT.value))
    print(format_table(results[-1:]).splitlines()[-1], flush=True)
  print()
  print(format_table(results))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
