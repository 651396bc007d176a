"""Tests of comln_tf/evaluation.py: accuracies, non-finite logits, progress."""

import logging
import math

import numpy as np
import pytest
import tensorflow as tf

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from evaluation_helpers import direct_accuracies
from evaluation_helpers import direct_predictions
from evaluation_helpers import make_run_dir
from evaluation_helpers import progress_lines
from evaluation_helpers import run_episodes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def omniglot_test():
  return data.load_splits("omniglot").test


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


def test_episode_predictions_match_a_direct_computation(run_dir, omniglot_test):
  model, _ = training.restore_model(str(run_dir))
  episodes = run_episodes(omniglot_test, 7)
  prediction_fn = evaluation.prediction_function(model)
  # 7 episodes in batches of 3: the last batch is padded, not traced again.
  predictions = evaluation.episode_predictions(
    prediction_fn, episodes, batch_size=3
  )
  assert prediction_fn.experimental_get_tracing_count() == 1
  accuracies, classes, margins = direct_predictions(model, episodes)
  assert predictions.accuracies.dtype == np.float64
  assert predictions.accuracies.shape == (7,)
  np.testing.assert_allclose(predictions.accuracies, accuracies, atol=1e-12)
  np.testing.assert_array_equal(predictions.classes, classes)
  np.testing.assert_allclose(predictions.margins, margins, atol=1e-5)


def test_prototype_accuracies_match_numpy(run_dir, omniglot_test):
  model, _ = training.restore_model(str(run_dir))
  episodes = run_episodes(omniglot_test, 5, shots=2)
  accuracies = evaluation.episode_predictions(
    evaluation.prediction_function(model, "prototypes"), episodes, batch_size=2
  ).accuracies
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


def _query_brightness(episodes):
  """float [n]: the mean of each episode's query images."""
  return np.array(
    [e["query_images"].mean() for e in episodes.as_numpy_iterator()]
  )


def test_non_finite_logits_are_refused_naming_the_episodes(omniglot_test):
  episodes = run_episodes(omniglot_test, 12)
  brightness = _query_brightness(episodes)
  # Halfway between two episodes' brightness: no rounding can cross it.
  threshold = np.sort(brightness)[5:7].mean()
  # The first batch of 4 holding a NaN episode, and its NaN episodes.
  bright = np.flatnonzero(brightness > threshold)
  first_batch = bright[0] // 4
  expected = [i for i in bright if i // 4 == first_batch]
  prediction_fn = evaluation.prediction_function(
    _NanOnBrightEpisodes(threshold)
  )
  with pytest.raises(evaluation.NonFiniteLogitsError) as raised:
    evaluation.episode_predictions(prediction_fn, episodes, batch_size=4)
  message = str(raised.value)
  assert (
    f"non-finite logits (NaN or inf) in {len(expected)} episode(s) (episode "
    f"{', '.join(map(str, expected))} of 12)" in message
  )
  assert "T not finite" in message and "fewer than 2 ways" in message
  # Finite episodes still count as usual: all their queries are right.
  dim = evaluation.prediction_function(_NanOnBrightEpisodes(np.inf))
  np.testing.assert_array_equal(
    evaluation.episode_predictions(dim, episodes, batch_size=4).accuracies,
    np.ones(12),
  )


def test_evaluate_refuses_non_finite_logits_of_either_classifier(
  omniglot_test,
):
  kwargs = dict(
    ways=5, shots=2, queries=3, seed=evaluation.TEST_SEED, num_episodes=6
  )
  episodes = data.eval_episodes(omniglot_test, **kwargs)
  brightness = _query_brightness(episodes)
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


def test_evaluation_logs_progress_with_the_running_accuracy(
  run_dir, omniglot_test, caplog
):
  model, _ = training.restore_model(str(run_dir))
  episodes = run_episodes(omniglot_test, 7)
  direct = direct_accuracies(model, episodes)
  with caplog.at_level(logging.INFO, logger="comln_tf.evaluation"):
    accuracies = evaluation.episode_predictions(
      evaluation.prediction_function(model),
      episodes,
      batch_size=2,
      progress=True,
      what="Validation",
    ).accuracies
  np.testing.assert_allclose(accuracies, direct, atol=1e-12)
  lines = progress_lines(caplog.text, "Validation")
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
    evaluation.episode_predictions(
      evaluation.prediction_function(model), episodes, batch_size=2
    )
  assert not progress_lines(caplog.text, "Validation")
