"""Tests of launch/evaluate.py: progress, refusals, the output file."""

import json
import re
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training

STEP = 7


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A model_dir with config.json and a latest checkpoint at step STEP."""
  model_dir = tmp_path_factory.mktemp("run")
  config = training.make_config(
    {
      "data.ways": 5,
      "data.shots": 1,
      "data.queries": 3,
      "data.meta_batch_size": 4,
      "data.example_shape": [28, 28, 1],
      "model.tie_init_rows": True,
    }
  )
  training.save_config(str(model_dir), config)
  keras.utils.set_random_seed(0)
  checkpoint = training.make_checkpoint(
    training.build_model(config), step=tf.Variable(STEP, dtype=tf.int64)
  )
  tf.train.CheckpointManager(checkpoint, str(model_dir), 1).save(STEP)
  return model_dir


def _direct_accuracies(model_dir, num_episodes):
  """Per-episode test accuracies: one eager call, numpy argmax each."""
  model, _ = training.restore_model(str(model_dir))
  episodes = data.eval_episodes(
    data.load_splits("omniglot").test,
    ways=5,
    shots=1,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=num_episodes,
  )
  accuracies = []
  for episode in episodes.as_numpy_iterator():
    logits = model({key: value[None] for key, value in episode.items()})
    predictions = np.argmax(logits.numpy()[0], axis=-1)
    accuracies.append(np.mean(predictions == episode["query_labels"]))
  return np.array(accuracies)


@pytest.fixture(scope="module")
def direct(run_dir):
  """Per-episode accuracies of the first 6 test episodes (see
  `_direct_accuracies`); episode i is the same in any number of them."""
  return _direct_accuracies(run_dir, 6)


def _progress_lines(text):
  """(done, total, accuracy %) of each evaluation progress line of `text`."""
  return [
    (int(done), int(total), float(accuracy))
    for done, total, accuracy in re.findall(
      r"Evaluation on test episodes: (\d+)/(\d+) episodes \(\d+%\), "
      r"accuracy so far ([\d.]+)%",
      text,
    )
  ]


def _error_lines(text):
  return [line for line in text.splitlines() if line.startswith("error: ")]


def _refusals(run_dir, blocker):
  """(arguments, start of the error line) of refused command lines."""
  config_file = run_dir / "config.json"
  return [
    (["--ways=1"], "error: ways must be an integer >= 2"),
    (
      ["--t_final=1e39"],
      "error: t_final=1e+39 is not a finite number > 0 in the model's "
      "float32 (T would be inf;",
    ),
    (
      [f"--output={config_file}"],
      f"error: output={str(config_file)!r} is named config.json",
    ),
    (
      [f"--output={blocker / 'results.json'}"],
      f"error: output={str(blocker / 'results.json')!r} cannot be written",
    ),
  ]


@pytest.fixture(scope="module")
def invocations(run_dir, tmp_path_factory):
  """The command lines of the next two tests, by one `run_invocations`.

  Returns:
    namespace: evaluation (6 episodes, 2 per call, written to `output`),
    refusals (list of (arguments, error, CompletedProcess), see
    `_refusals`), config (run_dir's config.json before them).
  """
  folder = tmp_path_factory.mktemp("cli")
  output = folder / "results.json"
  blocker = folder / "blocker"
  blocker.write_text("a file, not a folder\n")
  config = (run_dir / "config.json").read_bytes()
  cases = _refusals(run_dir, blocker)
  evaluation_args = ["--episodes=6", "--batch_size=2", f"--output={output}"]
  # The refusals ask for few episodes, so that a regression fails fast.
  refusal_args = [["--episodes=4"] + args for args, _ in cases]
  evaluation_run, *refusals = cli_helpers.run_invocations(
    "launch.evaluate",
    [
      [f"--model_dir={run_dir}"] + args
      for args in [evaluation_args] + refusal_args
    ],
  )
  return types.SimpleNamespace(
    evaluation=evaluation_run,
    output=output,
    refusals=[
      (args, message, refused)
      for (args, message), refused in zip(cases, refusals, strict=True)
    ],
    config=config,
  )


def test_evaluate_cli_logs_progress_with_the_running_accuracy(
  invocations, direct
):
  result = invocations.evaluation
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(invocations.output.read_text())
  assert results["accuracy"] == pytest.approx(direct.mean(), abs=1e-12)
  lines = _progress_lines(result.stderr)
  assert [(done, total) for done, total, _ in lines] == [
    (2, 6),
    (4, 6),
    (6, 6),
  ], result.stderr[-3000:]
  for done, _, accuracy in lines:
    assert accuracy == pytest.approx(100 * direct[:done].mean(), abs=0.006)
  assert f"{100 * direct.mean():.2f}% +- " in result.stdout


def test_evaluate_cli_refuses_bad_arguments_before_any_episode(
  run_dir, invocations
):
  for args, message, failed in invocations.refusals:
    assert failed.returncode != 0, args
    errors = _error_lines(failed.stderr)
    assert len(errors) == 1 and errors[0].startswith(message), failed.stderr[
      -3000:
    ]
    assert "Traceback" not in failed.stderr
    assert not _progress_lines(failed.stderr)
  assert (run_dir / "config.json").read_bytes() == invocations.config
  assert not list(run_dir.glob("evaluation_*.json"))


def test_evaluate_cli_prints_the_result_before_a_failed_write(
  run_dir, direct, tmp_path
):
  folder = tmp_path / "results"
  output = folder / "evaluation.json"
  # launch.evaluate, whose output folder becomes a file during the episodes.
  script = textwrap.dedent(
    f"""
    import pathlib
    import sys

    from absl import app

    from comln_tf import evaluation
    from launch import evaluate

    folder = pathlib.Path({str(folder)!r})
    real_evaluate = evaluation.evaluate

    def evaluate_then_lose_the_folder(*args, **kwargs):
      results = real_evaluate(*args, **kwargs)
      folder.rmdir()
      folder.write_text("the folder is now a file")
      return results

    evaluation.evaluate = evaluate_then_lose_the_folder
    sys.argv = [
      "evaluate",
      "--model_dir={run_dir}",
      "--episodes=4",
      "--output={output}",
      "--noprogress",
    ]
    app.run(evaluate.main)
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=cli_helpers.REPO,
    env=cli_helpers.environment(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=180,
    check=False,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stdout, result.stdout[-3000:]
  summary = evaluation.summarize(direct[:4])
  printed = (
    f"{100 * summary['accuracy']:.2f}% +- {100 * summary['ci95']:.2f}% "
    f"(95% CI); NOT written"
  )
  lines = result.stdout.splitlines()
  errors = _error_lines(result.stdout)
  assert len(errors) == 1 and errors[0].startswith(
    f"error: output={str(output)!r}: the result could not be written: "
  ), result.stdout[-3000:]
  assert printed in lines[lines.index(errors[0]) - 1]
  assert not _progress_lines(result.stdout)
