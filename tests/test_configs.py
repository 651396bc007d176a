"""The experiment configs: each recipe builds and validates without training,
the recipes are the commands the results were trained with, every config
the docs cite exists, and loading the configs imports no TensorFlow."""

import importlib
import pathlib
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from comln_tf import training

REPO = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = sorted(
  path.stem
  for path in (REPO / "configs").glob("*.py")
  if path.stem != "__init__"
)
# (file, recipe) of every config: `--config=configs/<file>.py:<recipe>`, or
# `--config=configs/<file>.py` for the recipe None.
CONFIGS = [
  (family, recipe)
  for family in FAMILIES
  for recipe in importlib.import_module(f"configs.{family}").RECIPES
]
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


def _spec(family, recipe):
  """The --config value of a config, relative to the repository."""
  return f"configs/{family}.py" + ("" if recipe is None else f":{recipe}")


def _run_dir(family, recipe):
  """The model_dir of the results' run of a config (docs/results.md)."""
  return f"runs/{family}" + ("" if recipe is None else f"_{recipe}")


RUN_DIRS = {_run_dir(*config): config for config in CONFIGS}


def _config(family, recipe=None):
  return importlib.import_module(f"configs.{family}").get_config(recipe)


def _config_flag(spec):
  """The config of `--config=<spec>` as launch.train parses it."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values)
  values(["launch.train", f"--config={REPO / spec}"])
  return values.config


def test_every_config_has_its_own_run_dir():
  assert len(RUN_DIRS) == len(CONFIGS)


@pytest.mark.parametrize("family, recipe", CONFIGS, ids=lambda x: str(x))
def test_config_builds_and_validates(family, recipe):
  config = _config(family, recipe)
  # Validates every field and builds the backbone, classifier and model
  # without weights (no data, no training).
  resolved = training.make_config(base=config)
  assert training.flatten(resolved) == training.flatten(config)
  init_from = resolved.run.init_from
  if init_from is not None:
    assert init_from in RUN_DIRS, init_from
    parent_config = _config(*RUN_DIRS[init_from])
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
# config (`--config=` value) that is now their recipe.
@pytest.mark.parametrize(
  "spec, args",
  [
    (
      "configs/omniglot_5w1s.py",
      "--dataset=omniglot --rotations --ways=5 --shots=1 --queries=5 "
      "--meta_batch_size=16 --tie_init_rows --jit_compile --rtol=1e-6 "
      "--atol=1e-6 --steps=300 --validate_every=100 --validation_episodes=100",
    ),
    (
      "configs/omniglot_characters.py:20w1s_6400_t10000_meanpool",
      "--dataset=omniglot_characters --rotations --ways=20 --shots=1 "
      "--queries=5 --meta_batch_size=8 --tie_init_rows --method=backprop "
      "--rtol=1e-7 --atol=1e-7 --steps=6400 --lr_decay_steps=6400 "
      "--notrain_t --initial_t=10000 --clip_norm=2 --validate_every=200 "
      "--validation_episodes=100 --checkpoint_every=25 --global_pool "
      "--nopool_last_block",
    ),
    (
      "configs/omniglot_characters.py:20w1s_9600_t10000_strided",
      "--dataset=omniglot_characters --rotations --ways=20 --shots=1 "
      "--queries=5 --meta_batch_size=8 --tie_init_rows --method=backprop "
      "--rtol=1e-7 --atol=1e-7 --steps=9600 --lr_decay_steps=9600 "
      "--notrain_t --initial_t=10000 --clip_norm=2 --validate_every=400 "
      "--validation_episodes=100 --checkpoint_every=25 --global_pool "
      "--downsample=stride",
    ),
    (
      "configs/omniglot.py:20w1s_warm3",
      "--init_from=runs/omniglot_20w1s_warm2 --seed=3 --dataset=omniglot "
      "--rotations --ways=20 --shots=1 --queries=5 --meta_batch_size=8 "
      "--tie_init_rows --method=backprop --rtol=1e-7 --atol=1e-7 --steps=600 "
      "--lr_decay_steps=600 --learning_rate=0.05 --clip_norm=2 "
      "--validate_every=100 --validation_episodes=100 --checkpoint_every=25",
    ),
    (
      "configs/omniglot_characters.py:20w1s_warm8_t10_trainval",
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
      "configs/omniglot_vinyals.py:20w1s_800_t10_w2",
      "--init_from=runs/omniglot_vinyals_20w1s_800_t10_w1 --seed=2 "
      "--dataset=omniglot_vinyals --rotations --ways=20 --shots=1 --queries=5 "
      "--meta_batch_size=8 --tie_init_rows --method=backprop --rtol=1e-7 "
      "--atol=1e-7 --clip_norm=2 --validate_every=100 "
      "--validation_episodes=100 --checkpoint_every=25 --steps=600 "
      "--lr_decay_steps=600 --learning_rate=0.05 --notrain_t --initial_t=10",
    ),
  ],
)
def test_config_is_the_published_command(spec, args):
  assert training.flatten(_config_flag(spec)) == training.flatten(
    _from_flags(args)
  )


def test_the_docs_cite_only_configs_that_exist():
  texts = {
    path: path.read_text()
    for path in [
      REPO / "README.md",
      REPO / "CHANGELOG.md",
      REPO / "launch" / "main_job.sh",
      *sorted((REPO / "docs").glob("*.md")),
    ]
    if path.exists()
  }
  citations = [
    match
    for text in texts.values()
    for match in re.findall(r"(--config=)?configs/(\w+)\.py(?::(\w+))?", text)
  ]
  # A file named alone is a file; with a recipe, or as --config, a config.
  assert sorted({family for _, family, _ in citations} - set(FAMILIES)) == []
  cited = {
    (family, recipe or None)
    for flag, family, recipe in citations
    if flag or recipe
  }
  assert ("omniglot_5w1s", None) in cited  # The main job's.
  assert sorted(cited - set(CONFIGS), key=str) == []
  for config in cited:
    assert training.flatten(_config_flag(_spec(*config))) == training.flatten(
      _config(*config)
    ), config


def test_the_results_train_each_config_into_its_run_dir():
  # Continuations find their parent's model there (run.init_from).
  text = (REPO / "docs" / "results.md").read_text()
  trained = re.findall(
    r"--config=configs/(\w+)\.py(?::(\w+))?`?(?: \([^)\n]*\))?"
    r"[`|\s\\]*--model_dir=(runs/\w+)",
    text,
  )
  assert len(trained) > 60
  for family, recipe, model_dir in trained:
    assert model_dir == _run_dir(family, recipe or None), model_dir


def test_unknown_recipe_names_the_recipes():
  with pytest.raises(
    ValueError,
    match=r"has no recipe '20w1s_80'.*configs/omniglot\.py:20w1s_800\b",
  ):
    _config("omniglot", "20w1s_80")
  with pytest.raises(ValueError, match=r"configs/omniglot_5w1s\.py has no"):
    _config("omniglot_5w1s", "20w1s_800")
  with pytest.raises(
    ValueError, match=r"configs/omniglot_characters\.py needs a recipe"
  ):
    _config("omniglot_characters")


def test_configs_load_without_tensorflow():
  # A fresh interpreter: this one imported TensorFlow with the tests.
  code = (
    "import importlib, sys\n"
    "for family, recipe in eval(sys.argv[1]):\n"
    "  importlib.import_module('configs.' + family).get_config(recipe)\n"
    "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code, repr(CONFIGS)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]", result.stdout[:300]
