"""The library's default config, and what the config families share.

`get_config()` is `comln_tf.config.default_config()`: Omniglot 5-way 1-shot,
Conv-4, meta-gradients by the cheapest exact method ("auto"), SGD with
Nesterov momentum. The recipes of the families pin the method their results
were trained with.

A family file (`configs/<family>.py`) names its recipes in `RECIPES` and
returns one from `get_config(recipe)`; `--config=configs/<family>.py:<recipe>`
trains it into `run_dir(family, recipe)`, where a continuation of it finds
its model.
"""

from collections.abc import Callable, Mapping
import importlib

import ml_collections

from comln_tf import config as config_lib

# A recipe: a function of no argument returning its config.
Recipe = Callable[[], ml_collections.ConfigDict]

RECIPES: Mapping[str | None, Recipe] = {None: config_lib.default_config}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config (`--config=configs/base.py`; `arg` must be None)."""
  return select("base", RECIPES, arg)


def select(
  family: str, recipes: Mapping[str | None, Recipe], arg: str | None
) -> ml_collections.ConfigDict:
  """The config of recipe `arg` of `recipes`, the recipes of `family`.

  Args:
    family: the name of the config file (configs/<family>.py).
    recipes: {recipe name: recipe}; the name None is the file's config
      without argument.
    arg: the text after ':' in --config=configs/<family>.py:<arg>, or None.

  Raises:
    ValueError: `arg` names no recipe of `recipes`.
  """
  if arg not in recipes:
    names = ", ".join(
      f"configs/{family}.py" + ("" if name is None else f":{name}")
      for name in recipes
    )
    problem = "needs a recipe" if arg is None else f"has no recipe {arg!r}"
    raise ValueError(f"configs/{family}.py {problem}; its configs: {names}.")
  return recipes[arg]()


def run_dir(family: str, recipe: str | None) -> str:
  """runs/<family>_<recipe> (runs/<family> without recipe): where the
  results trained `--config=configs/<family>.py:<recipe>`."""
  return f"runs/{family}" + ("" if recipe is None else f"_{recipe}")


def omniglot_20w1s(
  dataset: str, steps: int, validate_every: int = 100
) -> ml_collections.ConfigDict:
  """The 20-way 1-shot recipe of the results, for `steps` steps.

  Training classes with their rotations, tied rows of W0, backprop
  meta-gradients at tolerance 1e-7, a cosine decay of the learning rate
  over the whole run, meta-gradients clipped at norm 2.
  """
  config = config_lib.default_config()
  config.data.dataset = dataset
  config.data.rotations = True
  config.data.ways, config.data.shots, config.data.queries = 20, 1, 5
  config.data.meta_batch_size = 8
  config.model.tie_init_rows = True
  config.adaptation.method = "backprop"
  config.adaptation.rtol = config.adaptation.atol = 1e-7
  config.optim.lr_decay_steps = config.schedule.steps = steps
  config.optim.clip_norm = 2.0
  config.schedule.validate_every = validate_every
  config.schedule.validation_episodes = 100
  config.schedule.checkpoint_every = 25
  return config


def omniglot_5w1s(steps: int) -> ml_collections.ConfigDict:
  """The 5-way 1-shot recipe: Omniglot with rotations, tied rows of W0,
  forward meta-gradients under XLA at tolerance 1e-6, 5 queries per class,
  meta-batches of 16, for `steps` steps."""
  config = config_lib.default_config()
  config.data.rotations = True
  config.data.ways, config.data.shots, config.data.queries = 5, 1, 5
  config.data.meta_batch_size = 16
  config.model.tie_init_rows = True
  config.adaptation.method = "forward"
  config.adaptation.jit_compile = True
  config.adaptation.rtol = config.adaptation.atol = 1e-6
  config.schedule.steps = steps
  return config


def fixed_t(
  config: ml_collections.ConfigDict, t: float
) -> ml_collections.ConfigDict:
  """`config` with T held at `t` for the whole run (not learned)."""
  config.model.train_t = False
  config.model.initial_t = t
  return config


def mean_pool(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with Conv-4's whole last feature map averaged (no last
  pooling), as MAML's Omniglot Conv-4 averages its last map."""
  config.model.global_pool = True
  config.model.pool_last_block = False
  return config


def continuation(
  family: str,
  parent: str,
  seed: int,
  steps: int = 600,
  learning_rate: float = 0.05,
) -> ml_collections.ConfigDict:
  """Recipe `parent` of configs/<family>.py continued from its run's model.

  run.init_from is run_dir(family, parent); a new cosine schedule from
  `learning_rate` over `steps` steps, and new training episodes (`seed`);
  everything else as the parent's.
  """
  module = importlib.import_module(f"configs.{family}")
  config = module.get_config(parent)
  config.run.init_from = run_dir(family, parent)
  config.run.seed = seed
  config.optim.lr_decay_steps = config.schedule.steps = steps
  config.optim.learning_rate = learning_rate
  return config
