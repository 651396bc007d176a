"""Tests of comln_tf.evaluation, training.evaluate_run, launch/evaluate.py."""

import json
import logging
import math
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from comln_tf.training import _evaluate
from export import saved_model
from export import served_check

STEP = 7


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A model_dir with config.json and a latest checkpoint at step STEP.

  The weights are the initial ones: these tests check the evaluation
  protocol, not training.
  """
  model_dir = tmp_path_factory.mktemp("run")
  config = training.make_config(
    {
      "data.ways": 5,
      "data.shots": 1,
      "data.queries": 3,
      "data.meta_batch_size": 4,
      "data.example_shape": [28, 28, 1],
    }
  )
  training.save_config(str(model_dir), config)
  keras.utils.set_random_seed(0)
  checkpoint = training.make_checkpoint(
    training.build_model(config), step=tf.Variable(STEP, dtype=tf.int64)
  )
  tf.train.CheckpointManager(checkpoint, str(model_dir), 1).save(STEP)
  return model_dir


@pytest.fixture(scope="module")
def omniglot_test():
  return data.load_splits("omniglot").test


def _direct_accuracies(model, episodes):
  """Per-episode accuracy, one eager call and numpy argmax per episode."""
  accuracies = []
  for episode in episodes.as_numpy_iterator():
    logits = model({key: value[None] for key, value in episode.items()})
    predictions = np.argmax(logits.numpy()[0], axis=-1)
    accuracies.append(np.mean(predictions == episode["query_labels"]))
  return np.array(accuracies)


def test_summarize_matches_numpy():
  accuracies = np.random.default_rng(0).uniform(size=1000)
  summary = evaluation.summarize(accuracies)
  assert summary["episodes"] == 1000
  assert summary["accuracy"] == pytest.approx(accuracies.mean(), abs=1e-12)
  expected = (
    1.96
    * np.sqrt(np.mean((accuracies - accuracies.mean()) ** 2))
    / (math.sqrt(1000))
  )
  assert summary["ci95"] == pytest.approx(expected, rel=1e-12)
  assert evaluation.summarize([0.5])["ci95"] == 0.0


def test_episode_accuracies_match_a_direct_computation(run_dir, omniglot_test):
  model, _ = training.restore_model(str(run_dir))
  episodes = data.eval_episodes(
    omniglot_test,
    ways=5,
    shots=1,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=7,
  )
  # 7 episodes in batches of 3: the last batch is smaller.
  accuracies = evaluation.episode_accuracies(
    evaluation.accuracy_function(model), episodes, batch_size=3
  )
  assert accuracies.dtype == np.float64 and accuracies.shape == (7,)
  np.testing.assert_allclose(
    accuracies, _direct_accuracies(model, episodes), atol=1e-12
  )


def test_evaluate_run_writes_its_results_as_json(run_dir, omniglot_test):
  results = training.evaluate_run(
    str(run_dir), which="latest", num_episodes=9, batch_size=4
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_9ep.json"
  )
  assert (
    json.loads((run_dir / "evaluation_test_latest_5w1s3q_9ep.json").read_text())
    == results
  )
  assert results["step"] == STEP and results["episodes"] == 9
  assert (results["ways"], results["shots"], results["queries"]) == (5, 1, 3)
  assert results["seed"] == evaluation.TEST_SEED
  model, _ = training.restore_model(str(run_dir))
  direct = evaluation.summarize(
    _direct_accuracies(
      model,
      data.eval_episodes(
        omniglot_test,
        ways=5,
        shots=1,
        queries=3,
        seed=evaluation.TEST_SEED,
        num_episodes=9,
      ),
    )
  )
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert results["ci95"] == pytest.approx(direct["ci95"], abs=1e-12)


def test_evaluate_run_adapts_up_to_the_given_t(run_dir, omniglot_test):
  # The run's T is its initial 1; at T = 1e-3 the classifier barely leaves
  # its random W0, so the accuracies differ from those at T = 1.
  results = training.evaluate_run(
    str(run_dir), which="latest", num_episodes=9, batch_size=4, t_final=1e-3
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_t0.001_9ep.json"
  )
  assert results["t_final"] == pytest.approx(1e-3, rel=1e-6)
  model, _ = training.restore_model(str(run_dir))
  episodes = data.eval_episodes(
    omniglot_test,
    ways=5,
    shots=1,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=9,
  )
  learned = _direct_accuracies(model, episodes)
  model.classifier.log_t.assign(math.log(1e-3))
  direct = evaluation.summarize(_direct_accuracies(model, episodes))
  assert direct["accuracy"] != pytest.approx(learned.mean(), abs=1e-3)
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert training.evaluate_run(
    str(run_dir), which="latest", num_episodes=1, batch_size=1
  )["t_final"] == pytest.approx(1.0)


def test_evaluate_run_rotates_classes(run_dir, omniglot_test):
  results = training.evaluate_run(
    str(run_dir),
    which="latest",
    num_episodes=9,
    batch_size=4,
    rotate_classes=True,
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_rotated_9ep.json"
  )
  assert results["rotate_classes"] is True
  model, _ = training.restore_model(str(run_dir))
  kwargs = dict(
    ways=5, shots=1, queries=3, seed=evaluation.TEST_SEED, num_episodes=9
  )
  rotated = evaluation.summarize(
    _direct_accuracies(
      model, data.eval_episodes(omniglot_test, rotate_classes=True, **kwargs)
    )
  )
  upright = evaluation.summarize(
    _direct_accuracies(model, data.eval_episodes(omniglot_test, **kwargs))
  )
  assert results["accuracy"] == pytest.approx(rotated["accuracy"], abs=1e-12)
  assert results["accuracy"] != pytest.approx(upright["accuracy"], abs=1e-6)


def test_prototype_accuracies_match_numpy(run_dir, omniglot_test):
  model, _ = training.restore_model(str(run_dir))
  episodes = data.eval_episodes(
    omniglot_test,
    ways=5,
    shots=2,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=5,
  )
  accuracies = evaluation.episode_accuracies(
    evaluation.accuracy_function(model, "prototypes"), episodes, batch_size=2
  )
  expected = []
  for episode in episodes.as_numpy_iterator():
    images = np.concatenate(
      [episode["support_images"], episode["query_images"]]
    )
    embeddings = model.backbone(images[None], training=False).numpy()[0]
    support, query = embeddings[:10], embeddings[10:]
    means = np.stack(
      [support[episode["support_labels"] == n].mean(0) for n in range(5)]
    )
    distances = ((query[:, None] - means[None]) ** 2).sum(-1)
    expected.append(np.mean(distances.argmin(-1) == episode["query_labels"]))
  np.testing.assert_allclose(accuracies, expected, atol=1e-12)
  results = training.evaluate_run(
    str(run_dir),
    which="latest",
    shots=2,
    num_episodes=5,
    classifier="prototypes",
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w2s3q_prototypes_5ep.json"
  )
  assert results["classifier"] == "prototypes" and results["t_final"] is None
  assert results["accuracy"] == pytest.approx(np.mean(expected), abs=1e-12)
  for kwargs, message in [
    (
      {"classifier": "knn"},
      "classifier must be one of comln, prototypes; got 'knn'",
    ),
    (
      {"classifier": "prototypes", "t_final": 2.0},
      "t_final .*classifier='prototypes' has none",
    ),
  ]:
    with pytest.raises(training.ConfigError, match=message):
      training.evaluate_run(
        str(run_dir), which="latest", num_episodes=2, **kwargs
      )


def test_rotate_classes_needs_square_images(run_dir, monkeypatch):
  features = data.ClassSet.from_labels(
    np.zeros([40, 8], np.float32),
    np.repeat(np.arange(10), 4),
    dataset="features",
    split="test",
  )
  monkeypatch.setattr(
    _evaluate._loop,
    "load_splits",
    lambda config: data.Splits(features, features, features),
  )
  with pytest.raises(
    training.ConfigError, match=r"rotate_classes: .*square images"
  ):
    training.evaluate_run(
      str(run_dir), which="latest", num_episodes=2, rotate_classes=True
    )


def test_evaluate_run_errors_name_the_argument(run_dir, tmp_path):
  for kwargs, message in [
    ({"which": "best"}, "which='best': No best checkpoint"),
    ({"ways": 6}, "ways=6: the run was trained with config.data.ways=5"),
    ({"shots": 15, "queries": 10}, "shots=15"),
    # 0 is an error, not "the run's value".
    ({"ways": 0}, "ways must be an integer >= 1; got 0"),
    ({"queries": 0}, "queries must be an integer >= 1; got 0"),
    ({"num_episodes": 0}, "num_episodes must be an integer >= 1; got 0"),
    ({"t_final": 0.0}, "t_final must be a number > 0"),
    ({"t_final": float("nan")}, "t_final .*got nan"),
  ]:
    with pytest.raises(training.ConfigError, match=message):
      training.evaluate_run(
        str(run_dir),
        which=kwargs.pop("which", "latest"),
        **{"num_episodes": 2, **kwargs},
      )
  with pytest.raises(training.ConfigError, match="model_dir"):
    training.evaluate_run(str(tmp_path), which="latest")


def test_checkpoints_without_the_variable_list_are_refused(run_dir, tmp_path):
  # tf.train.Checkpoint(model=model) misses the backbone's weights.
  config = training.load_config(str(run_dir))
  training.save_config(str(tmp_path), config)
  tf.train.Checkpoint(model=training.build_model(config)).save(
    str(tmp_path / "ckpt")
  )
  with pytest.raises(ValueError, match="make_checkpoint"):
    training.restore_model(str(tmp_path))
  with pytest.raises(training.ConfigError, match="model_dir"):
    training.evaluate_run(str(tmp_path), which="latest")


def test_evaluate_cli_prints_and_writes_json(run_dir, tmp_path):
  output = tmp_path / "results.json"
  result = cli_helpers.run(
    "launch.evaluate",
    [
      f"--model_dir={run_dir}",
      "--episodes=6",
      f"--output={output}",
      "--rotate_classes",
      "--classifier=prototypes",
    ],
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(output.read_text())
  assert results["episodes"] == 6 and results["split"] == "test"
  assert results["rotate_classes"] is True
  assert results["classifier"] == "prototypes"
  # The run has no best checkpoint: the default ("auto") is its latest.
  latest = training.checkpoint_path(str(run_dir), "latest")
  assert results["which"] == "latest" and results["checkpoint"] == latest
  assert (
    f"5-way 1-shot, classes rotated, 6 episodes, latest checkpoint "
    f"{latest} (step 7), classifier prototypes" in result.stdout
  )
  assert (
    f"{100 * results['accuracy']:.2f}% +- {100 * results['ci95']:.2f}%"
    in result.stdout
  )

  for args, message in [
    (["--checkpoint=best"], "--checkpoint='best': No best checkpoint"),
    (["--episodes=0"], "--episodes must be an integer >= 1; got 0"),
    (["--t_final=-1"], "t_final must be a number > 0; got -1.0"),
    (["--ways=0"], "ways must be an integer >= 1; got 0"),
  ]:
    failed = cli_helpers.run(
      "launch.evaluate", [f"--model_dir={run_dir}"] + args, timeout=120
    )
    assert failed.returncode != 0
    assert message in failed.stderr, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr


# Non-finite logits, bad arguments, the output file and progress.


class _NanOnBrightEpisodes:
  """A stand-in model: the true labels' one-hot logits, NaN on some episodes.

  The logits (and embeddings) of an episode whose query images' mean
  exceeds `threshold` are all NaN; argmax would read them as class 0.
  """

  def __init__(self, threshold, ways=5):
    self.threshold, self.ways = threshold, ways

  def _nan_if_bright(self, episodes, values):
    bright = tf.reduce_mean(episodes["query_images"], axis=[1, 2, 3, 4])
    return tf.where(bright[:, None, None] > self.threshold, np.nan, values)

  def __call__(self, episodes, training=False):
    del training
    logits = tf.one_hot(episodes["query_labels"], self.ways)
    return self._nan_if_bright(episodes, logits)

  def embed_episode(self, episodes, training=False):
    """Embeddings: one-hot labels, so class means classify all right."""
    del training
    return tuple(
      self._nan_if_bright(episodes, tf.one_hot(episodes[key], self.ways))
      for key in ("support_labels", "query_labels")
    )


def _progress_lines(text, what):
  """(done, total, accuracy %) of each progress line of `what` in `text`."""
  return [
    (int(done), int(total), float(accuracy))
    for done, total, accuracy in re.findall(
      rf"{what}: (\d+)/(\d+) episodes \(\d+%\), accuracy so far "
      r"([\d.]+)%",
      text,
    )
  ]


def test_non_finite_logits_are_refused_naming_the_episodes(omniglot_test):
  episodes = data.eval_episodes(
    omniglot_test,
    ways=5,
    shots=1,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=12,
  )
  brightness = np.array(
    [e["query_images"].mean() for e in episodes.as_numpy_iterator()]
  )
  # Halfway between two episodes' brightness: no rounding can cross it.
  threshold = np.sort(brightness)[5:7].mean()
  # The first batch of 4 holding a NaN episode, and its NaN episodes.
  bright = np.flatnonzero(brightness > threshold)
  first_batch = bright[0] // 4
  expected = [i for i in bright if i // 4 == first_batch]
  accuracy_fn = evaluation.accuracy_function(_NanOnBrightEpisodes(threshold))
  with pytest.raises(evaluation.NonFiniteLogitsError) as raised:
    evaluation.episode_accuracies(accuracy_fn, episodes, batch_size=4)
  message = str(raised.value)
  assert (
    f"non-finite logits (NaN or inf) in {len(expected)} episode(s) (episode "
    f"{', '.join(map(str, expected))} of 12)" in message
  )
  assert "T not finite" in message and "fewer than 2 ways" in message
  # Finite episodes still count as usual: all their queries are right.
  dim = evaluation.accuracy_function(_NanOnBrightEpisodes(np.inf))
  np.testing.assert_array_equal(
    evaluation.episode_accuracies(dim, episodes, batch_size=4), np.ones(12)
  )


def test_evaluate_refuses_non_finite_logits_of_either_classifier(
  omniglot_test,
):
  kwargs = dict(
    ways=5, shots=2, queries=3, seed=evaluation.TEST_SEED, num_episodes=6
  )
  episodes = data.eval_episodes(omniglot_test, **kwargs)
  brightness = np.array(
    [e["query_images"].mean() for e in episodes.as_numpy_iterator()]
  )
  # All NaN but the darkest episode; batches of 3: refused at the first.
  model = _NanOnBrightEpisodes(np.sort(brightness)[:2].mean())
  darkest = int(brightness.argmin())
  expected = [i for i in range(3) if i != darkest]
  for classifier in evaluation.CLASSIFIERS:
    with pytest.raises(
      evaluation.NonFiniteLogitsError,
      match=rf"^Evaluation on test episodes: non-finite logits \(NaN or inf\) "
      rf"in {len(expected)} episode\(s\) \(episode "
      rf"{', '.join(map(str, expected))} of 6\)",
    ):
      evaluation.evaluate(
        model, omniglot_test, batch_size=3, classifier=classifier, **kwargs
      )
  # Without NaN, both classify every query right.
  for classifier in evaluation.CLASSIFIERS:
    results = evaluation.evaluate(
      _NanOnBrightEpisodes(np.inf),
      omniglot_test,
      batch_size=3,
      classifier=classifier,
      **kwargs,
    )
    assert results["accuracy"] == 1.0


def test_evaluate_run_refuses_bad_ways_and_t_final_before_any_work(
  run_dir, monkeypatch
):
  def no_episodes(config):
    raise AssertionError("episodes were loaded")

  monkeypatch.setattr(_evaluate._loop, "load_splits", no_episodes)
  # 1e39 and 1e-50 are finite numbers > 0, but not in the model's float32.
  with np.errstate(over="ignore", under="ignore"):
    assert np.float32(1e39) == np.inf and np.float32(1e-50) == 0.0
  for kwargs, message in [
    ({"ways": 1}, r"ways must be an integer >= 2 .*; got 1\.$"),
    ({"t_final": 1e39}, r"t_final=1e\+39 is not a finite number > 0 .*float32"),
    ({"t_final": 1e-50}, r"t_final=1e-50 is not a finite number > 0 .*float32"),
  ]:
    with pytest.raises(training.ConfigError, match=message):
      training.evaluate_run(str(run_dir), which="latest", **kwargs)
  evaluation_model = _evaluate.evaluation_model
  monkeypatch.setattr(
    _evaluate, "evaluation_model", lambda *args: no_episodes(None)
  )
  # ways is refused before the model is even restored.
  with pytest.raises(
    training.ConfigError, match="ways must be an integer >= 2"
  ):
    training.evaluate_run(str(run_dir), ways=1)
  monkeypatch.setattr(_evaluate, "evaluation_model", evaluation_model)
  with pytest.raises(ValueError, match="ways must be an integer >= 2"):
    evaluation.evaluate(
      training.restore_model(str(run_dir))[0],
      None,
      ways=1,
      shots=1,
      queries=1,
    )
  assert not list(run_dir.glob("evaluation_*_t1e*.json"))


def test_evaluate_run_never_replaces_what_is_not_an_evaluation(
  run_dir, tmp_path, monkeypatch
):
  def no_episodes(config):
    raise AssertionError("episodes were loaded")

  monkeypatch.setattr(_evaluate._loop, "load_splits", no_episodes)
  other = tmp_path / "notes.json"
  other.write_text('{"lr": 0.1}\n')
  blocker = tmp_path / "blocker"
  blocker.write_text("a file, not a folder\n")
  latest = training.checkpoint_path(str(run_dir), "latest")
  protected = [
    run_dir / "config.json",
    run_dir / "checkpoint",
    pathlib.Path(f"{latest}.index"),
    other,
  ]
  before = {path: path.read_bytes() for path in protected}
  for output, message in [
    (run_dir / "config.json", "is named config.json"),
    (tmp_path / "elsewhere" / "config.json", "is named config.json"),
    (run_dir / "checkpoint", "must be a file name ending in .json"),
    (pathlib.Path(f"{latest}.index"), "must be a file name ending in .json"),
    (other, "exists and is not an earlier evaluation result"),
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
  assert sorted(p.name for p in output.parent.iterdir()) == ["evaluation.json"]


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
  model, _ = training.restore_model(str(run_dir))
  direct = evaluation.summarize(
    _direct_accuracies(
      model,
      data.eval_episodes(
        omniglot_test,
        ways=5,
        shots=1,
        queries=3,
        seed=evaluation.TEST_SEED,
        num_episodes=5,
      ),
    )
  )
  results = raised.value.results
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert results["output"] == str(output) and results["episodes"] == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_evaluation_logs_progress_with_the_running_accuracy(
  run_dir, omniglot_test, caplog
):
  model, _ = training.restore_model(str(run_dir))
  episodes = data.eval_episodes(
    omniglot_test,
    ways=5,
    shots=1,
    queries=3,
    seed=evaluation.TEST_SEED,
    num_episodes=7,
  )
  direct = _direct_accuracies(model, episodes)
  with caplog.at_level(logging.INFO, logger="comln_tf.evaluation"):
    accuracies = evaluation.episode_accuracies(
      evaluation.accuracy_function(model),
      episodes,
      batch_size=2,
      progress=True,
      what="Validation",
    )
  np.testing.assert_allclose(accuracies, direct, atol=1e-12)
  lines = _progress_lines(caplog.text, "Validation")
  # A line every 10% of the 7 episodes: after each batch of 2, and the last.
  assert [(done, total) for done, total, _ in lines] == [
    (2, 7),
    (4, 7),
    (6, 7),
    (7, 7),
  ]
  for done, _, accuracy in lines:
    assert accuracy == pytest.approx(100 * direct[:done].mean(), abs=0.006)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="comln_tf.evaluation"):
    evaluation.episode_accuracies(
      evaluation.accuracy_function(model), episodes, batch_size=2
    )
  assert not _progress_lines(caplog.text, "Validation")


# The served check (export/served_check.py) with a stand-in server.


class _FakeServed:
  """Stands in for a loaded export: adapt_and_predict gives seeded logits.

  Call i returns normal random logits of seed i, whose row 1 is NaN at call
  `nan_call`, and their argmax as classes (where NaN rows are class 0).
  """

  def __init__(self, ways, nan_call=None):
    self.ways, self.nan_call, self.calls = ways, nan_call, 0
    self.signatures = {saved_model.ADAPT_AND_PREDICT: self._serve}

  @staticmethod
  def logits(call, queries, ways):
    return (
      np.random.default_rng(call)
      .normal(size=(queries, ways))
      .astype(np.float32)
    )

  def _serve(self, support_images, support_labels, query_images):
    del support_images, support_labels
    logits = self.logits(self.calls, query_images.shape[0], self.ways)
    if self.calls == self.nan_call:
      logits[1] = np.nan
    self.calls += 1
    return {
      "logits": tf.constant(logits),
      "classes": tf.constant(np.argmax(logits, -1), tf.int64),
    }


def _fake_export(run_dir, tmp_path, monkeypatch, **kwargs):
  """An export folder whose loading gives a _FakeServed(5, **kwargs)."""
  export_dir = tmp_path / "export"
  (export_dir / "assets.extra").mkdir(parents=True)
  (export_dir / "assets.extra" / saved_model.METADATA_FILE).write_text(
    json.dumps(
      {
        "checkpoint": training.checkpoint_path(str(run_dir), "latest"),
        "step": STEP,
      }
    )
  )
  monkeypatch.setattr(
    tf.saved_model, "load", lambda path: _FakeServed(5, **kwargs)
  )
  return str(export_dir)


def test_served_check_refuses_nan_served_logits(run_dir, tmp_path, monkeypatch):
  export_dir = _fake_export(run_dir, tmp_path, monkeypatch, nan_call=5)
  with pytest.raises(
    evaluation.NonFiniteLogitsError,
    match=r"^The served model: non-finite logits \(NaN or inf\) in 1 "
    r"episode\(s\) \(episode 5 of 8\)",
  ):
    served_check.compare(
      str(run_dir), export_dir, which="latest", num_episodes=8
    )
  with pytest.raises(
    training.ConfigError, match="ways must be an integer >= 2"
  ):
    served_check.compare(str(run_dir), export_dir, ways=1)


def test_served_check_logs_progress(
  run_dir, omniglot_test, tmp_path, monkeypatch, caplog
):
  export_dir = _fake_export(run_dir, tmp_path, monkeypatch)
  with caplog.at_level(logging.INFO):
    result = served_check.compare(
      str(run_dir), export_dir, which="latest", num_episodes=8
    )
  labels = np.stack(
    [
      episode["query_labels"]
      for episode in data.eval_episodes(
        omniglot_test,
        ways=5,
        shots=1,
        queries=3,
        seed=evaluation.TEST_SEED,
        num_episodes=8,
      ).as_numpy_iterator()
    ]
  )
  served = np.stack([_FakeServed.logits(i, 15, 5).argmax(-1) for i in range(8)])
  np.testing.assert_array_equal(result["served_classes"], served)
  running = np.cumsum(np.mean(served == labels, axis=1)) / np.arange(1, 9)
  for step in ("Restoring launch.evaluate's model", "Loading the export"):
    assert step in caplog.text
  lines = _progress_lines(caplog.text, "Served check")
  # A line every 10% of the 8 episodes: after each meta-batch of 4.
  assert [(done, total) for done, total, _ in lines] == [(4, 8), (8, 8)]
  for done, _, accuracy in lines:
    assert accuracy == pytest.approx(100 * running[done - 1], abs=0.006)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    served_check.compare(
      str(run_dir), export_dir, which="latest", num_episodes=4, progress=False
    )
  assert not _progress_lines(caplog.text, "Served check")
  assert "Loading the export" not in caplog.text
