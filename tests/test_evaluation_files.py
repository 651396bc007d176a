"""Tests of the result files of training.evaluate_run
(comln_tf/training/_evaluate.py, comln_tf/evaluation.py's write_json): their
names, what they may replace, and results that cannot be written."""

import json
import pathlib
import re

import pytest

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from comln_tf.training import _evaluate
from evaluation_helpers import direct_summary
from evaluation_helpers import make_run_dir
from evaluation_helpers import run_episodes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def omniglot_test():
  return data.load_splits("omniglot").test


def test_evaluate_run_never_replaces_what_is_not_an_evaluation(
  run_dir, tmp_path, monkeypatch
):
  def no_episodes(config):
    raise AssertionError("episodes were loaded")

  monkeypatch.setattr(_evaluate._loop, "load_splits", no_episodes)
  other = tmp_path / "notes.json"
  other.write_text('{"lr": 0.1}\n')
  # Where the predictions of tmp_path/data.json would go.
  data_file = tmp_path / "data.predictions.npz"
  data_file.write_text("someone's data\n")
  blocker = tmp_path / "blocker"
  blocker.write_text("a file, not a folder\n")
  latest = training.checkpoint_path(str(run_dir), "latest")
  protected = [
    run_dir / "config.json",
    run_dir / "checkpoint",
    pathlib.Path(f"{latest}.index"),
    other,
    data_file,
  ]
  before = {path: path.read_bytes() for path in protected}
  for output, message in [
    (run_dir / "config.json", "is named config.json"),
    (tmp_path / "elsewhere" / "config.json", "is named config.json"),
    (run_dir / "checkpoint", "must be a file name ending in .json"),
    (pathlib.Path(f"{latest}.index"), "must be a file name ending in .json"),
    (other, "exists and is not an earlier evaluation result"),
    (
      tmp_path / "data.json",
      re.escape(
        f"would replace {data_file}, which is not an earlier evaluation's "
        f"predictions"
      ),
    ),
    (tmp_path / "folder.json", "is a directory"),
    (blocker / "results.json", "cannot be written"),
  ]:
    if output.name == "folder.json":
      output.mkdir()
    with pytest.raises(training.ConfigError, match=message) as raised:
      training.evaluate_run(str(run_dir), which="latest", output=str(output))
    assert str(raised.value).startswith(f"output={str(output)!r} ")
  assert {path: path.read_bytes() for path in protected} == before
  assert not (tmp_path / "elsewhere").exists()


def test_an_earlier_evaluation_result_may_be_replaced(run_dir, tmp_path):
  output = tmp_path / "results" / "evaluation.json"
  first = training.evaluate_run(
    str(run_dir), which="latest", num_episodes=2, output=str(output)
  )
  assert evaluation.is_evaluation_result(str(output))
  second = training.evaluate_run(
    str(run_dir), which="latest", num_episodes=3, output=str(output)
  )
  assert (first["episodes"], second["episodes"]) == (2, 3)
  assert json.loads(output.read_text()) == second
  assert sorted(p.name for p in output.parent.iterdir()) == [
    "evaluation.json",
    "evaluation.predictions.npz",
  ]
  assert second["predictions"] == str(
    output.parent / "evaluation.predictions.npz"
  )
  predictions = evaluation.read_predictions(second["predictions"])
  assert predictions.classes.shape == predictions.margins.shape == (3, 15)


def test_a_result_that_cannot_be_written_is_still_returned(
  run_dir, omniglot_test, tmp_path, monkeypatch
):
  folder = tmp_path / "results"
  real_evaluate = evaluation.evaluate

  def evaluate_then_lose_the_folder(*args, **kwargs):
    results = real_evaluate(*args, **kwargs)
    folder.rmdir()
    folder.write_text("the folder is now a file\n")
    return results

  monkeypatch.setattr(evaluation, "evaluate", evaluate_then_lose_the_folder)
  output = folder / "evaluation.json"
  with pytest.raises(
    evaluation.ResultNotWrittenError,
    match=rf"^output={str(output)!r}: the result could not be written: ",
  ) as raised:
    training.evaluate_run(
      str(run_dir), which="latest", num_episodes=5, output=str(output)
    )
  direct = direct_summary(run_dir, run_episodes(omniglot_test, 5))
  results = raised.value.results
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert results["output"] == str(output) and results["episodes"] == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_evaluations_on_other_episodes_get_their_own_result_file():
  standard = _evaluate.default_output("run", "best", "test", 5, 1, 15)
  names = {standard}
  for options in (
    {"seed": 1},
    {"num_episodes": 100},
    {"seed": 1, "num_episodes": 100},
  ):
    name = _evaluate.default_output("run", "best", "test", 5, 1, 15, **options)
    assert name not in names, options
    names.add(name)
  assert standard == "run/evaluation_test_best_5w1s15q.json"
  assert (
    _evaluate.default_output(
      "run", "best", "test", 5, 1, 15, seed=1, num_episodes=100
    )
    == "run/evaluation_test_best_5w1s15q_seed1_100ep.json"
  )
