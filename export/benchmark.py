r"""Serving benchmark of an export: latency, size on disk, load time.

Loads the export with the TF1 session loader (as TF Serving does), replays
its warmup requests, then times `--requests` runs of each case (after 5
untimed ones) and reports p50 and p99:
  adapt_and_predict, 5-way 1-shot and 5-way 5-shot, 15 queries per class;
  and 20-way 1-shot if the export takes any number of ways (tied rows);
  adapt alone, same support sets;
  predict alone, 75 queries (the weights of the 5-way 5-shot adaptation);
  adapt_and_predict_batch, as many 5-way 1-shot tasks as the export's
  request limits allow up to 16 (a meta-batch), if the export has it.
The machine's float32 matmul peak is measured first, in the same process.
Inputs are uniform random pixels of the export's image shape; the time is
that of `Session.run` on numpy inputs (no network, no proto decoding),
with TensorFlow's default thread pools.

Without --export_dir, an untrained Conv-4 model for 28x28x1 images (the
default configuration of comln_tf.training) is exported to a temporary
folder and measured: the cost of a solve depends on the weights and T, so
pass a trained export for representative numbers.

Usage:
  python -m export.benchmark --export_dir=exports/comln/1 --output=bench.json
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from export import saved_model
from export import session
from export import warmup
from launch import machine

_EXPORT_DIR = flags.DEFINE_string(
  "export_dir",
  None,
  "An export version folder; default: export an "
  "untrained Conv-4 Omniglot model to a temporary folder.",
)
_REQUESTS = flags.DEFINE_integer(
  "requests", 200, "Timed requests per case.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Also write the results here (JSON)."
)

_UNTIMED = 5
# The inputs of adapt_and_predict, in the order of its callable's arguments.
_NAMES = ("support_images", "support_labels", "query_images")


def _untrained_export(directory):
  """Exports a freshly initialised default Conv-4 model; returns its path."""
  import keras  # Only this path needs the training code.

  from comln_tf import training

  keras.utils.set_random_seed(0)
  config = training.make_config({"data.example_shape": [28, 28, 1]})
  return saved_model.export_version(
    training.build_model(config), directory, config.data.example_shape
  )


def _size_mb(directory):
  total = sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )
  return total / 2**20


def _latencies_ms(function, arrays, count):
  """Milliseconds of `count` calls of function(*arrays), after _UNTIMED."""
  for _ in range(_UNTIMED):
    function(*arrays)
  times = []
  for _ in range(count):
    start = time.perf_counter()
    function(*arrays)
    times.append(1e3 * (time.perf_counter() - start))
  return np.array(times)


def _case(case, function, arrays, count):
  """Latency percentiles of `count` calls of function(*arrays), as a dict."""
  ms = _latencies_ms(function, arrays, count)
  return {
    "case": case,
    "p50_ms": float(np.percentile(ms, 50)),
    "p99_ms": float(np.percentile(ms, 99)),
    "mean_ms": float(ms.mean()),
    "requests": count,
  }


def _callables(served):
  """The session callables of the cases: adapt_and_predict, adapt, predict
  and adapt_and_predict_batch (None if the export has none)."""
  batch = saved_model.ADAPT_AND_PREDICT_BATCH
  return (
    served.callable("serving_default", _NAMES),
    served.callable("adapt", _NAMES[:2]),
    served.callable("predict", ("query_images", "weights")),
    served.callable(batch, _NAMES) if batch in served.signatures else None,
  )


def _batch_case(adapt_and_predict_batch, metadata, example_shape, count):
  """The adapt_and_predict_batch case: B 5-way 1-shot tasks, 75 queries."""
  task = warmup.task(example_shape, 5, 1)
  tasks = min(
    16,
    metadata["max_serving_support"] // len(task["support_images"]),
    metadata["max_serving_queries"] // len(task["query_images"]),
  )
  batch = [
    np.stack(
      [warmup.task(example_shape, 5, 1, seed)[key] for seed in range(tasks)]
    )
    for key in _NAMES
  ]
  return _case(
    f"adapt_and_predict_batch, {tasks} tasks 5-way 1-shot, 75 queries each",
    adapt_and_predict_batch,
    batch,
    count,
  )


def _cases(callables, tasks, count):
  """The timed cases but the batch one (see the top): `_case` dicts."""
  adapt_and_predict, adapt, predict, _ = callables
  cases = []
  for (ways, shots), task in tasks.items():
    queries = len(task["query_images"])
    cases.append(
      _case(
        f"adapt_and_predict {ways}-way {shots}-shot, {queries} queries",
        adapt_and_predict,
        [task[key] for key in _NAMES],
        count,
      )
    )
  for (ways, shots), task in tasks.items():
    cases.append(
      _case(
        f"adapt {ways}-way {shots}-shot",
        adapt,
        [task[key] for key in _NAMES[:2]],
        count,
      )
    )
  weights = adapt(*[tasks[5, 5][key] for key in _NAMES[:2]])["weights"]
  queries = tasks[5, 5]["query_images"]
  cases.append(
    _case(
      f"predict, {len(queries)} queries", predict, [queries, weights], count
    )
  )
  return cases


def run(export_dir, count):
  """Measures one export.

  Args:
    export_dir: a version folder written by export.saved_model.
    count: timed requests per case.

  Returns:
    dict: matmul_peak_gflops, export_dir, size_mb, warmup_size_mb, load_s,
    first_request_ms, warmup_replay_s, and cases: list of dicts (case,
    p50_ms, p99_ms, mean_ms, requests).
  """
  peak = machine.matmul_peak_gflops()
  metadata = saved_model.read_metadata(export_dir)
  example_shape = metadata["example_shape"]
  shapes = [(5, 1), (5, 5)] + ([(20, 1)] if metadata["tie_init_rows"] else [])
  start = time.perf_counter()
  served = session.SessionModel(export_dir)
  load_s = time.perf_counter() - start

  callables = _callables(served)
  tasks = {
    (ways, shots): warmup.task(example_shape, ways, shots, seed=100 + shots)
    for ways, shots in shapes
  }
  start = time.perf_counter()
  callables[0](*[tasks[5, 1][key] for key in _NAMES])
  first_request_ms = 1e3 * (time.perf_counter() - start)

  start = time.perf_counter()
  for request in warmup.read(export_dir):
    served.run(request)
  warmup_replay_s = time.perf_counter() - start

  cases = _cases(callables, tasks, count)
  if callables[3] is not None:
    cases.append(_batch_case(callables[3], metadata, example_shape, count))
  return {
    "matmul_peak_gflops": peak,
    "export_dir": export_dir,
    "size_mb": _size_mb(export_dir),
    "warmup_size_mb": os.path.getsize(warmup.path(export_dir)) / 2**20,
    "load_s": load_s,
    "first_request_ms": first_request_ms,
    "warmup_replay_s": warmup_replay_s,
    "cpu_count": os.cpu_count(),
    "cases": cases,
  }


def _table(results):
  lines = ["| request | p50 (ms) | p99 (ms) | mean (ms) |", "|---|---|---|---|"]
  lines += [
    f"| {c['case']} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | "
    f"{c['mean_ms']:.1f} |"
    for c in results["cases"]
  ]
  lines += [
    "",
    f"Export {results['export_dir']}: {results['size_mb']:.2f} MB on disk "
    f"(warmup requests {results['warmup_size_mb']:.2f} MB); session load "
    f"{results['load_s']:.2f} s; first request "
    f"{results['first_request_ms']:.0f} ms; warmup replay "
    f"{results['warmup_replay_s']:.2f} s; "
    f"{results['cases'][0]['requests']} timed requests per case, "
    f"{results['cpu_count']} CPUs; float32 matmul peak "
    f"{results['matmul_peak_gflops']:.0f} GFLOP/s.",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as directory:
    export_dir = _EXPORT_DIR.value or _untrained_export(directory)
    results = run(export_dir, _REQUESTS.value)
  print(_table(results))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
