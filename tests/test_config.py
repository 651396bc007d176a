"""Tests of run configurations: comln_tf.config (the schema, its checks,
merging, resume checks) and comln_tf.training's config.json files."""

import json
import re
import subprocess
import sys

import pytest

import cli_helpers
from comln_tf import config as config_lib
from comln_tf import training


def test_importing_the_schema_leaves_tensorflow_out():
  # Configuration files (configs/*.py) load without TensorFlow.
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; import comln_tf.config; print('tensorflow' in sys.modules)",
    ],
    cwd=cli_helpers.REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "False", result.stderr[-3000:]


def test_training_reexports_the_schema():
  for name in (
    "CONFIG_FILE",
    "ConfigError",
    "DERIVED_FIELDS",
    "OPTIMIZERS",
    "RESUMABLE_FIELDS",
    "STRATEGIES",
    "check_resume",
    "default_config",
    "flatten",
    "from_json",
    "get_field",
    "updated",
  ):
    assert getattr(training, name) is getattr(config_lib, name), name


def test_adaptation_fields_reach_the_classifier_under_their_names():
  config = training.make_config(
    {
      "adaptation.solver": "rk4",
      "adaptation.num_steps": 7,
      "adaptation.max_steps": 50,
      "adaptation.tasks_per_solve": 2,
    }
  )
  layer = training.make_classifier(config).get_config()
  for name, value in config.adaptation.items():
    if name != "jit_compile":  # make_classifier's own argument.
      assert layer[name] == value, name


def test_config_json_with_the_old_adaptation_names_loads(tmp_path):
  config = training.make_config(
    {
      "adaptation.solver": "euler",
      "adaptation.num_steps": 7,
      "adaptation.max_steps": 50,
      "data.example_shape": [28, 28, 1],
    }
  )
  values = config.to_dict()
  adaptation = values["adaptation"]
  adaptation["solver_steps"] = adaptation.pop("num_steps")
  adaptation["max_solver_steps"] = adaptation.pop("max_steps")
  (tmp_path / "config.json").write_text(json.dumps(values))
  loaded = training.load_config(str(tmp_path))
  assert training.flatten(loaded) == training.flatten(config)
  flat = {"solver": "euler", "solver_steps": 7, "max_solver_steps": 50}
  assert training.from_json(flat).adaptation.num_steps == 7
  assert training.from_json(flat).adaptation.max_steps == 50


def test_make_config_names_the_bad_field():
  assert training.flatten(training.make_config()) == training.flatten(
    training.default_config()
  )
  for overrides, field in [
    ({"data.ways": 1}, "config.data.ways"),
    ({"optim.learning_rate": 0.0}, "config.optim.learning_rate"),
    ({"adaptation.label_smoothing": 1.0}, "config.adaptation.label_smoothing"),
    ({"adaptation.solver": "euler"}, "config.adaptation.num_steps"),
    ({"adaptation.method": "magic"}, "config.adaptation.method"),
    ({"adaptation.solver": "magic"}, "config.adaptation.solver"),
    ({"model.backbone": "magic"}, "config.model.backbone"),
    ({"data.dataset": "magic"}, "config.data.dataset"),
    ({"data.class_sampling": "magic"}, "config.data.class_sampling"),
    ({"data.affine.scale": 1.0}, "config.data.affine.scale"),
    ({"run.devices": ["/cpu:0"]}, "config.run.devices"),
    (
      {"adaptation.jit_compile": True, "adaptation.method": "backprop"},
      "config.adaptation.jit_compile",
    ),
    ({"adaptation.tasks_per_solve": 0}, "config.adaptation.tasks_per_solve"),
    ({"optim.lr_decay_steps": 0}, "config.optim.lr_decay_steps"),
    ({"optim.clip_norm": 0.0}, "config.optim.clip_norm"),
    ({"optim.weight_decay": -1.0}, "config.optim.weight_decay"),
    (
      {"adaptation.jit_compile": True, "adaptation.tasks_per_solve": 4},
      "config.adaptation.tasks_per_solve",
    ),
    (
      {"data.train_on_validation": True},
      "config.data.train_on_validation .*config.schedule.validate_every=0",
    ),
    (
      {"model.backbone": "identity", "model.global_pool": True},
      "config.model.global_pool",
    ),
    (
      {"model.backbone": "resnet12", "model.pool_last_block": False},
      "config.model.pool_last_block",
    ),
    ({"model.downsample": "avg_pool"}, "config.model.downsample"),
    (
      {"model.backbone": "resnet12", "model.downsample": "stride"},
      "config.model.downsample",
    ),
    (
      {"model.downsample": "stride", "model.pool_last_block": False},
      "config.model.pool_last_block",
    ),
    ({"data.ways": "five"}, "config.data.ways"),
    ({"data.wayz": 5}, "config.data.wayz"),
  ]:
    with pytest.raises(training.ConfigError, match=field):
      training.make_config(overrides)


def test_check_resume_names_differing_fields_and_allows_resumable_ones(
  tmp_path,
):
  saved = training.make_config({"data.example_shape": [28, 28, 1]})
  training.check_resume(
    saved,
    training.updated(saved, {"schedule.steps": 10, "run.strategy": "mirrored"}),
    "dir",
  )
  # A new config does not know its example shape yet.
  training.check_resume(saved, training.make_config(), "dir")
  with pytest.raises(training.ConfigError) as error:
    training.check_resume(
      saved, training.updated(saved, {"data.ways": 20, "run.seed": 1}), "dir"
    )
  assert "config.data.ways=20 (saved run: 5)" in str(error.value)
  assert "config.run.seed=1" in str(error.value)
  assert "steps" not in str(error.value)
  # A run saved before a field existed ran with its default.
  values = saved.to_dict()
  del values["model"]["train_t"]
  (tmp_path / "config.json").write_text(json.dumps(values))
  older = training.load_config(str(tmp_path))
  training.check_resume(older, saved, "dir")
  with pytest.raises(training.ConfigError, match="config.model.train_t=False"):
    training.check_resume(
      older, training.updated(saved, {"model.train_t": False}), "dir"
    )


def test_config_json_round_trips_and_reads_flat_files(tmp_path):
  config = training.make_config(
    {
      "data.ways": 20,
      "optim.clip_norm": 2.0,
      "run.devices": ["/cpu:0"],
      "run.strategy": "mirrored",
      "data.example_shape": [28, 28, 1],
    }
  )
  training.save_config(str(tmp_path), config)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"]["ways"] == 20 and saved["optim"]["clip_norm"] == 2.0
  assert training.flatten(training.load_config(str(tmp_path))) == (
    training.flatten(config)
  )
  # Runs of older versions saved flat files, keyed by the field's name.
  flat = {
    "ways": 20,
    "clip_norm": 2.0,
    "devices": ["/cpu:0"],
    "strategy": "mirrored",
    "example_shape": [28, 28, 1],
    "affine_shear": 0.0,
  }
  assert training.flatten(training.from_json(flat)) == training.flatten(config)
  with pytest.raises(training.ConfigError, match="wayz"):
    training.from_json({"wayz": 20})


@pytest.mark.parametrize(
  "content, problem",
  [
    ('{"data": {"ways": 5,', r"is not valid JSON \(Expecting"),
    ("[1, 2]", "must hold a JSON object of configuration fields, got an array"),
    (b"\xff\xfe{}", r"is not valid JSON \(not UTF-8 text"),
  ],
)
def test_a_damaged_config_json_is_one_clear_line(tmp_path, content, problem):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  path = model_dir / "config.json"
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(
    training.ConfigError, match=re.escape(str(path)) + " " + problem
  ):
    training.load_config(str(model_dir))
  if content != '{"data": {"ways": 5,':
    return
  # The launcher: one line naming the file, no traceback (export_model:
  # tests/test_export.py).
  result = cli_helpers.run("launch.train", [f"--model_dir={model_dir}"], 120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.search(
    f"^error: {re.escape(str(path))} {problem}", result.stderr, re.MULTILINE
  ), result.stderr[-3000:]
