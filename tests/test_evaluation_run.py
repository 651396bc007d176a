"""Tests of training.evaluate_run (comln_tf/training/_evaluate.py) and of
launch/evaluate.py: which checkpoint, episodes and classifier they use."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

import cli_helpers
from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
from comln_tf.training import _evaluate
from evaluation_helpers import STEP
from evaluation_helpers import direct_accuracies
from evaluation_helpers import direct_summary
from evaluation_helpers import make_run_dir
from evaluation_helpers import run_episodes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def omniglot_test():
  return data.load_splits("omniglot").test


# The evaluations of these tests: 2 calls of 3 episodes.
EPISODES, BATCH_SIZE = 6, 3


@pytest.fixture(scope="module")
def upright(run_dir, omniglot_test):
  """`direct_accuracies` of the run's model (its learned T) on the episodes."""
  model, _ = training.restore_model(str(run_dir))
  return direct_accuracies(model, run_episodes(omniglot_test, EPISODES))


def test_evaluate_run_writes_its_results_as_json(run_dir, upright):
  results = training.evaluate_run(
    str(run_dir), which="latest", num_episodes=EPISODES, batch_size=BATCH_SIZE
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_6ep.json"
  )
  assert (
    json.loads((run_dir / "evaluation_test_latest_5w1s3q_6ep.json").read_text())
    == results
  )
  assert results["step"] == STEP and results["episodes"] == EPISODES
  assert (results["ways"], results["shots"], results["queries"]) == (5, 1, 3)
  assert results["seed"] == evaluation.TEST_SEED
  direct = evaluation.summarize(upright)
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert results["ci95"] == pytest.approx(direct["ci95"], abs=1e-12)


def test_evaluate_run_adapts_up_to_the_given_t(run_dir, omniglot_test, upright):
  # The run's T is its initial 1; at T = 1e-3 the classifier barely leaves
  # its random W0, so the accuracies differ from those at T = 1.
  results = training.evaluate_run(
    str(run_dir),
    which="latest",
    num_episodes=EPISODES,
    batch_size=BATCH_SIZE,
    t_final=1e-3,
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_t0.001_6ep.json"
  )
  assert results["t_final"] == pytest.approx(1e-3, rel=1e-6)
  model, _ = training.restore_model(str(run_dir))
  model.classifier.log_t.assign(math.log(1e-3))
  direct = evaluation.summarize(
    direct_accuracies(model, run_episodes(omniglot_test, EPISODES))
  )
  assert direct["accuracy"] != pytest.approx(upright.mean(), abs=1e-3)
  assert results["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
  assert training.evaluate_run(
    str(run_dir), which="latest", num_episodes=1, batch_size=1
  )["t_final"] == pytest.approx(1.0)


def test_evaluate_run_rotates_classes(run_dir, omniglot_test, upright):
  results = training.evaluate_run(
    str(run_dir),
    which="latest",
    num_episodes=EPISODES,
    batch_size=BATCH_SIZE,
    rotate_classes=True,
  )
  assert results["output"] == str(
    run_dir / "evaluation_test_latest_5w1s3q_rotated_6ep.json"
  )
  assert results["rotate_classes"] is True
  rotated = direct_summary(
    run_dir, run_episodes(omniglot_test, EPISODES, rotate_classes=True)
  )
  assert results["accuracy"] == pytest.approx(rotated["accuracy"], abs=1e-12)
  assert results["accuracy"] != pytest.approx(upright.mean(), abs=1e-6)


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
  cases = [
    (["--checkpoint=best"], "--checkpoint='best': No best checkpoint"),
    (["--episodes=0"], "--episodes must be an integer >= 1; got 0"),
    (["--t_final=-1"], "t_final must be a number > 0; got -1.0"),
    (["--ways=0"], "ways must be an integer >= 1; got 0"),
  ]
  # An evaluation, then refusals: separate invocations (processes).
  result, *refusals = cli_helpers.run_invocations(
    "launch.evaluate",
    [
      [
        f"--model_dir={run_dir}",
        "--episodes=6",
        f"--output={output}",
        "--rotate_classes",
        "--classifier=prototypes",
      ]
    ]
    + [[f"--model_dir={run_dir}"] + args for args, _ in cases],
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

  for (args, message), failed in zip(cases, refusals, strict=True):
    assert failed.returncode != 0, args
    assert message in failed.stderr, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
