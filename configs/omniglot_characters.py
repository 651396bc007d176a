"""Omniglot split by character (MAML's protocol): the recipes of the results.

`--config=configs/omniglot_characters.py:<recipe>` trains into
runs/omniglot_characters_<recipe> (docs/results.md has each one's results).
Every recipe is `base.omniglot_20w1s` on data.dataset="omniglot_characters",
changed as its name says:

  20w1s, 5w5s, 60w1s: the training episodes (5w5s: 15 queries a class,
    validation on 300 episodes).
  800, 3200, 6400, 9600: the steps.
  t10 ... t10000: T held at that value (learned otherwise).
  meanpool: Conv-4's last map averaged; nopool: its last map flattened;
    strided: MAML's Conv-4 (strided convolutions, last map averaged).
  seed1: other training episodes; wd0: no weight decay; smooth: label
    smoothing 0.1; trainval: trained on the validation classes too (no
    validation; its model is its latest checkpoint).
  warm<k>: 20w1s_800 continued k times (`base.continuation`: 600 steps
    from lr 0.05, seed k); warm5_t10 continues warm4 with T held at 10,
    and warm6_t10 to warm8_t10 continue it in turn.
  6400_meanpool_warm1: 20w1s_6400_t10000_meanpool continued once (20w1s:
    3,200 steps; 5w5s: a 2,400-step schedule from lr 0.02, of which the
    reported run trained 1,450 steps).
"""

import ml_collections

from comln_tf import config as config_lib
from configs import base

FAMILY = "omniglot_characters"  # The name of this file, and its dataset.


def _held_t(
  steps: int, t: float, validate_every: int = 200
) -> ml_collections.ConfigDict:
  """The 20-way 1-shot recipe over `steps` steps with T held at `t`."""
  config = base.omniglot_20w1s(FAMILY, steps, validate_every)
  return base.fixed_t(config, t)


def _strided(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with MAML's Conv-4: strided convolutions, last map averaged."""
  config.model.global_pool = True
  config.model.downsample = "stride"
  return config


def _5w5s(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` on 5-way 5-shot episodes of 15 queries a class, validated on
  300 of them."""
  config.data.ways, config.data.shots, config.data.queries = 5, 5, 15
  config.schedule.validation_episodes = 300
  return config


RECIPES: dict[str, base.Recipe] = {
  # 800 steps, T learned.
  "20w1s_800": lambda: base.omniglot_20w1s(FAMILY, steps=800),
  "20w1s_800_meanpool": lambda: base.mean_pool(get_config("20w1s_800")),
  "20w1s_800_nopool": lambda: config_lib.updated(
    get_config("20w1s_800"), {"model.pool_last_block": False}
  ),
  "20w1s_800_seed1": lambda: config_lib.updated(
    get_config("20w1s_800"), {"run.seed": 1}
  ),
  "20w1s_800_t10": lambda: base.fixed_t(get_config("20w1s_800"), 10.0),
  "20w1s_800_wd0": lambda: config_lib.updated(
    get_config("20w1s_800"), {"optim.weight_decay": 0.0}
  ),
  # Continuations of 20w1s_800.
  "20w1s_warm": lambda: base.continuation(FAMILY, "20w1s_800", seed=1),
  "20w1s_warm2": lambda: base.continuation(FAMILY, "20w1s_warm", seed=2),
  "20w1s_warm3": lambda: base.continuation(FAMILY, "20w1s_warm2", seed=3),
  "20w1s_warm4": lambda: base.continuation(FAMILY, "20w1s_warm3", seed=4),
  "20w1s_warm5": lambda: base.continuation(FAMILY, "20w1s_warm4", seed=5),
  "20w1s_warm5_t10": lambda: base.fixed_t(
    base.continuation(FAMILY, "20w1s_warm4", seed=5), 10.0
  ),
  "20w1s_warm6_t10": lambda: base.continuation(
    FAMILY, "20w1s_warm5_t10", seed=6
  ),
  "20w1s_warm7_t10": lambda: base.continuation(
    FAMILY, "20w1s_warm6_t10", seed=7
  ),
  "20w1s_warm8_t10": lambda: base.continuation(
    FAMILY, "20w1s_warm7_t10", seed=8
  ),
  "20w1s_warm8_t10_smooth": lambda: config_lib.updated(
    base.continuation(FAMILY, "20w1s_warm7_t10", seed=8),
    {"adaptation.label_smoothing": 0.1},
  ),
  "20w1s_warm8_t10_trainval": lambda: config_lib.updated(
    base.continuation(FAMILY, "20w1s_warm7_t10", seed=8),
    {"data.train_on_validation": True, "schedule.validate_every": 0},
  ),
  "60w1s_warm8_t10": lambda: config_lib.updated(
    base.continuation(FAMILY, "20w1s_warm7_t10", seed=8), {"data.ways": 60}
  ),
  # 3,200 to 9,600 steps, T held.
  "20w1s_3200_t10": lambda: _held_t(3200, 10.0),
  "20w1s_3200_t100_meanpool": lambda: base.mean_pool(_held_t(3200, 100.0)),
  "20w1s_3200_t1000_meanpool": lambda: base.mean_pool(_held_t(3200, 1000.0)),
  "20w1s_3200_t3000_meanpool": lambda: base.mean_pool(_held_t(3200, 3000.0)),
  "20w1s_3200_t10000_meanpool": lambda: base.mean_pool(_held_t(3200, 10000.0)),
  "20w1s_3200_t10000_meanpool_seed1": lambda: config_lib.updated(
    get_config("20w1s_3200_t10000_meanpool"), {"run.seed": 1}
  ),
  "20w1s_3200_t10000_strided": lambda: _strided(_held_t(3200, 10000.0)),
  "20w1s_9600_t10000_strided": lambda: _strided(
    _held_t(9600, 10000.0, validate_every=400)
  ),
  "20w1s_6400_t10000_meanpool": lambda: base.mean_pool(_held_t(6400, 10000.0)),
  "20w1s_6400_meanpool_warm1": lambda: base.continuation(
    FAMILY, "20w1s_6400_t10000_meanpool", seed=1, steps=3200
  ),
  # On 5-way 5-shot episodes.
  "5w5s_3200_t1000_meanpool": lambda: _5w5s(
    base.mean_pool(_held_t(3200, 1000.0))
  ),
  "5w5s_3200_t10000_meanpool": lambda: _5w5s(
    base.mean_pool(_held_t(3200, 10000.0))
  ),
  "5w5s_6400_meanpool_warm1": lambda: _5w5s(
    base.continuation(
      FAMILY,
      "20w1s_6400_t10000_meanpool",
      seed=1,
      steps=2400,
      learning_rate=0.02,
    )
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of recipe `arg` (`--config=configs/<this file>.py:<arg>`)."""
  return base.select(FAMILY, RECIPES, arg)
