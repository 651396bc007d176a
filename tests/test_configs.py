"""The experiment configs: each builds and validates without training, the
recipes are the commands the results were trained with, and every config
the docs cite exists."""

import importlib
import pathlib
import re

import pytest

from comln_tf import training

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(
  path.stem
  for path in (REPO / "configs").glob("*.py")
  if path.stem != "__init__"
)
# What a model is: a run initialized from another must match it here.
ARCHITECTURE = (
  "model.backbone",
  "model.global_pool",
  "model.pool_last_block",
  "model.downsample",
  "model.tie_init_rows",
  "data.dataset",
  "data.image_size",
)


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_validates(name):
  config = _config(name)
  # Validates every field and builds the backbone, classifier and model
  # without weights (no data, no training).
  resolved = training.make_config(base=config)
  assert training.flatten(resolved) == training.flatten(config)
  init_from = resolved.run.init_from
  if init_from is not None:
    parent = init_from.removeprefix("runs/")
    assert parent in CONFIGS, init_from
    parent_config = _config(parent)
    paths = ARCHITECTURE + (
      () if resolved.model.tie_init_rows else ("data.ways",)
    )
    for path in paths:
      assert training.get_field(resolved, path) == training.get_field(
        parent_config, path
      ), path


def _from_flags(args):
  """The configuration of launch.train's former flags (`--ways=20`,
  `--rotations`, `--notrain_t`), read as a flat config.json of that time."""
  defaults = training.flatten(training.default_config())
  by_name = {path.split(".", 1)[1].replace(".", "_"): path for path in defaults}
  flat = {}
  for arg in args.split():
    name, _, value = arg.removeprefix("--").partition("=")
    if not value:
      flat[name.removeprefix("no")] = not (
        name.startswith("no") and name[2:] in by_name
      )
      continue
    default = defaults[by_name[name]]
    kind = {"clip_norm": float, "init_from": str}.get(name, int)
    flat[name] = (kind if default is None else type(default))(value)
  # The commands without --method ran the default of that time.
  flat.setdefault("method", "forward")
  return training.from_json(flat)


# Commands the reported models were trained with, as published, and the
# config file that is now their recipe.
@pytest.mark.parametrize(
  "name, args",
  [
    (
      "omniglot_5w1s",
      "--dataset=omniglot --rotations --ways=5 --shots=1 --queries=5 "
      "--meta_batch_size=16 --tie_init_rows --jit_compile --rtol=1e-6 "
      "--atol=1e-6 --steps=300 --validate_every=100 --validation_episodes=100",
    ),
    (
      "omniglot_characters_20w1s_6400_t10000_meanpool",
      "--dataset=omniglot_characters --rotations --ways=20 --shots=1 "
      "--queries=5 --meta_batch_size=8 --tie_init_rows --method=backprop "
      "--rtol=1e-7 --atol=1e-7 --steps=6400 --lr_decay_steps=6400 "
      "--notrain_t --initial_t=10000 --clip_norm=2 --validate_every=200 "
      "--validation_episodes=100 --checkpoint_every=25 --global_pool "
      "--nopool_last_block",
    ),
    (
      "omniglot_characters_20w1s_9600_t10000_strided",
      "--dataset=omniglot_characters --rotations --ways=20 --shots=1 "
      "--queries=5 --meta_batch_size=8 --tie_init_rows --method=backprop "
      "--rtol=1e-7 --atol=1e-7 --steps=9600 --lr_decay_steps=9600 "
      "--notrain_t --initial_t=10000 --clip_norm=2 --validate_every=400 "
      "--validation_episodes=100 --checkpoint_every=25 --global_pool "
      "--downsample=stride",
    ),
    (
      "omniglot_20w1s_warm3",
      "--init_from=runs/omniglot_20w1s_warm2 --seed=3 --dataset=omniglot "
      "--rotations --ways=20 --shots=1 --queries=5 --meta_batch_size=8 "
      "--tie_init_rows --method=backprop --rtol=1e-7 --atol=1e-7 --steps=600 "
      "--lr_decay_steps=600 --learning_rate=0.05 --clip_norm=2 "
      "--validate_every=100 --validation_episodes=100 --checkpoint_every=25",
    ),
    (
      "omniglot_characters_20w1s_warm8_t10_trainval",
      "--init_from=runs/omniglot_characters_20w1s_warm7_t10 --notrain_t "
      "--initial_t=10 --seed=8 --dataset=omniglot_characters --rotations "
      "--train_on_validation --ways=20 --shots=1 --queries=5 "
      "--meta_batch_size=8 --tie_init_rows --method=backprop --rtol=1e-7 "
      "--atol=1e-7 --steps=600 --lr_decay_steps=600 --learning_rate=0.05 "
      "--clip_norm=2 --validate_every=0 --checkpoint_every=25 "
      # Not in the published command: unused without validation.
      "--validation_episodes=100",
    ),
    (
      "omniglot_vinyals_20w1s_800_t10_w2",
      "--init_from=runs/omniglot_vinyals_20w1s_800_t10_w1 --seed=2 "
      "--dataset=omniglot_vinyals --rotations --ways=20 --shots=1 --queries=5 "
      "--meta_batch_size=8 --tie_init_rows --method=backprop --rtol=1e-7 "
      "--atol=1e-7 --clip_norm=2 --validate_every=100 "
      "--validation_episodes=100 --checkpoint_every=25 --steps=600 "
      "--lr_decay_steps=600 --learning_rate=0.05 --notrain_t --initial_t=10",
    ),
  ],
)
def test_config_is_the_published_command(name, args):
  assert training.flatten(_config(name)) == training.flatten(_from_flags(args))


def test_the_docs_cite_only_configs_that_exist():
  texts = {
    path: path.read_text()
    for path in [
      REPO / "README.md",
      REPO / "launch" / "main_job.sh",
      *sorted((REPO / "docs").glob("*.md")),
    ]
    if path.exists()
  }
  cited = {
    name
    for text in texts.values()
    for name in re.findall(r"configs/(\w+)\.py", text)
  }
  assert "omniglot_5w1s" in cited  # The main job's.
  assert sorted(cited - set(CONFIGS)) == []
