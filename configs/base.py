"""The library's default config, and the recipes the named configs share.

`get_config()` is `comln_tf.training.default_config()`: Omniglot 5-way
1-shot, Conv-4, meta-gradients by the cheapest exact method ("auto"), SGD
with Nesterov momentum. The recipes pin the method their results were
trained with.
"""

import types

import ml_collections

from comln_tf import training


def get_config() -> ml_collections.ConfigDict:
  return training.default_config()


def omniglot_20w1s(
  dataset: str, steps: int, validate_every: int = 100
) -> ml_collections.ConfigDict:
  """The 20-way 1-shot recipe of the results, for `steps` steps.

  Training classes with their rotations, tied rows of W0, backprop
  meta-gradients at tolerance 1e-7, a cosine decay of the learning rate
  over the whole run, meta-gradients clipped at norm 2.
  """
  config = get_config()
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
  config = get_config()
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
  parent: types.ModuleType,
  seed: int,
  steps: int = 600,
  learning_rate: float = 0.05,
) -> ml_collections.ConfigDict:
  """The config of `parent` (a configs module) continued from its run's model.

  run.init_from is runs/<parent's name>; a new cosine schedule from
  `learning_rate` over `steps` steps, and new training episodes (`seed`);
  everything else as the parent's.
  """
  config = parent.get_config()
  config.run.init_from = f"runs/{parent.__name__.rpartition('.')[2]}"
  config.run.seed = seed
  config.optim.lr_decay_steps = config.schedule.steps = steps
  config.optim.learning_rate = learning_rate
  return config
