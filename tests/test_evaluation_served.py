"""Tests of export/served_check.py with a stand-in server."""

import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow as tf

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from evaluation_helpers import STEP
from evaluation_helpers import make_run_dir
from evaluation_helpers import progress_lines
from evaluation_helpers import run_episodes
from export import saved_model
from export import served_check


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def omniglot_test():
  return data.load_splits("omniglot").test


class _FakeServed:
  """A loaded export stand-in: adapt_and_predict_batch gives seeded logits.

  Task i (in the order served) gets normal random logits of seed i, whose
  row 1 is NaN for task `nan_task`, and their argmax as classes (where NaN
  rows are class 0).
  """

  def __init__(self, ways, nan_task=None):
    self.ways, self.nan_task, self.tasks = ways, nan_task, 0
    self.signatures = {saved_model.ADAPT_AND_PREDICT_BATCH: self._serve}

  @staticmethod
  def logits(task, queries, ways):
    return (
      np.random.default_rng(task)
      .normal(size=(queries, ways))
      .astype(np.float32)
    )

  def _serve(self, support_images, support_labels, query_images):
    del support_images, support_labels
    tasks, queries = query_images.shape[:2]
    logits = np.stack(
      [self.logits(self.tasks + i, queries, self.ways) for i in range(tasks)]
    )
    if self.nan_task is not None and 0 <= self.nan_task - self.tasks < tasks:
      logits[self.nan_task - self.tasks, 1] = np.nan
    self.tasks += tasks
    return {
      "logits": tf.constant(logits),
      "classes": tf.constant(np.argmax(logits, -1), tf.int64),
    }


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
  """The result of an evaluation of the run on 8 episodes, and its JSON."""
  output = tmp_path_factory.mktemp("evaluation") / "evaluation.json"
  return training.evaluate_run(
    str(run_dir), which="latest", num_episodes=8, output=str(output)
  )


def _fake_export(evaluated, tmp_path, monkeypatch, **kwargs):
  """An export folder of the evaluated checkpoint and T whose loading gives
  a _FakeServed(5, **kwargs)."""
  export_dir = tmp_path / "export"
  (export_dir / "assets.extra").mkdir(parents=True)
  (export_dir / "assets.extra" / saved_model.METADATA_FILE).write_text(
    json.dumps(
      {
        "checkpoint": evaluated["checkpoint"],
        "step": STEP,
        "t_final": evaluated["t_final"],
        "max_serving_support": 1000,
        "max_serving_queries": 1000,
      }
    )
  )
  monkeypatch.setattr(
    tf.saved_model, "load", lambda path: _FakeServed(5, **kwargs)
  )
  return str(export_dir)


def test_served_check_counts_disagreements_and_near_ties(
  evaluated, tmp_path, monkeypatch
):
  export_dir = _fake_export(evaluated, tmp_path, monkeypatch)
  recorded = evaluation.read_predictions(evaluated["predictions"])
  served = np.stack([_FakeServed.logits(i, 15, 5).argmax(-1) for i in range(8)])
  differ = int(np.sum(served != recorded.classes))
  assert differ > 0
  result = served_check.compare(evaluated["output"], export_dir)
  np.testing.assert_array_equal(result["served_classes"], served)
  np.testing.assert_array_equal(result["evaluated_classes"], recorded.classes)
  assert (result["disagreements"], result["episodes"]) == (differ, 8)
  assert result["evaluated_accuracy"] == pytest.approx(
    evaluated["accuracy"], abs=1e-12
  )
  assert (result["checkpoint"], result["export_checkpoint"]) == (
    evaluated["checkpoint"],
  ) * 2
  # The same evaluation with every recorded margin a near-tie: each
  # disagreement is one.
  copy = tmp_path / "copy.json"
  shutil.copy(evaluated["output"], copy)
  evaluation.write_predictions(
    evaluation.predictions_path(str(copy)),
    recorded._replace(margins=np.zeros_like(recorded.margins)),
  )
  near = served_check.compare(str(copy), export_dir, progress=False)
  assert result["ties"] < near["ties"] == differ


def test_served_check_refuses_what_it_cannot_compare(
  evaluated, tmp_path, monkeypatch
):
  export_dir = _fake_export(evaluated, tmp_path, monkeypatch)

  def result_file(name, predictions=True, **changes):
    """A copy of the evaluation's JSON (and predictions), with changes."""
    path = str(tmp_path / name)
    evaluation.write_json(path, {**evaluated, **changes})
    if predictions:
      shutil.copy(evaluated["predictions"], evaluation.predictions_path(path))
    return path

  lone = result_file("lone.json")
  short = evaluation.read_predictions(evaluated["predictions"])
  evaluation.write_predictions(
    evaluation.predictions_path(lone),
    evaluation.Predictions(*(field[:5] for field in short)),
  )
  for path, message in [
    (str(tmp_path / "none.json"), "cannot be read as JSON"),
    (
      result_file("prototypes.json", classifier="prototypes"),
      "evaluates the classifier 'prototypes'; an export serves COMLN's",
    ),
    (
      result_file("missing.json", predictions=False),
      r"its predictions .*missing\.predictions\.npz cannot be read .*run "
      r"launch\.evaluate again to record them",
    ),
    (lone, "hold 5 episodes, not 8"),
    (
      result_file("moved.json", model_dir="no_such_run"),
      r"evaluates the run in model_dir='no_such_run', which is not found "
      r"from .*: run export\.check_served from the directory "
      r"launch\.evaluate ran in",
    ),
    (
      result_file("other_t.json", t_final=2.5),
      r"adapts up to T = 2\.5, the export .* up to T = ",
    ),
  ]:
    with pytest.raises(training.ConfigError, match=message):
      served_check.compare(path, export_dir)


def test_served_check_refuses_nan_served_logits(
  evaluated, tmp_path, monkeypatch
):
  export_dir = _fake_export(evaluated, tmp_path, monkeypatch, nan_task=5)
  with pytest.raises(
    evaluation.NonFiniteLogitsError,
    match=r"^The served model: non-finite logits \(NaN or inf\) in 1 "
    r"episode\(s\) \(episode 5 of 8\)",
  ):
    served_check.compare(evaluated["output"], export_dir)


def test_served_check_logs_progress(
  evaluated, omniglot_test, tmp_path, monkeypatch, caplog
):
  export_dir = _fake_export(evaluated, tmp_path, monkeypatch)
  with caplog.at_level(logging.INFO):
    served_check.compare(evaluated["output"], export_dir)
  labels = np.stack(
    [
      episode["query_labels"]
      for episode in run_episodes(omniglot_test, 8).as_numpy_iterator()
    ]
  )
  served = np.stack([_FakeServed.logits(i, 15, 5).argmax(-1) for i in range(8)])
  running = np.cumsum(np.mean(served == labels, axis=1)) / np.arange(1, 9)
  for step in ("Reading the evaluation", "Loading the export"):
    assert step in caplog.text
  lines = progress_lines(caplog.text, "Served check")
  # A line every 10% of the 8 episodes: after each meta-batch of 4.
  assert [(done, total) for done, total, _ in lines] == [(4, 8), (8, 8)]
  for done, _, accuracy in lines:
    assert accuracy == pytest.approx(100 * running[done - 1], abs=0.006)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    served_check.compare(evaluated["output"], export_dir, progress=False)
  assert not progress_lines(caplog.text, "Served check")
  assert "Loading the export" not in caplog.text
