"""Tests of comln_tf.evaluation, training.evaluate_run, launch/evaluate.py."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from comln_tf.training import _evaluate

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
