"""Omniglot split by alphabet (this project's split): the recipes of the
results.

`--config=configs/omniglot.py:<recipe>` trains into runs/omniglot_<recipe>
(docs/results.md has each one's results); the main job's recipe is
configs/omniglot_5w1s.py. The recipes, on data.dataset="omniglot":

  20w1s_800: `base.omniglot_20w1s`, 800 steps; 20w1s_warm<k> its k-th
    continuation (`base.continuation`: 600 steps from lr 0.05, seed k), and
    20w5s_from_warm3 20w1s_warm3's continued on 20-way 5-shot episodes (300
    steps, seed 5).
  20w1s_clip: the same recipe for 600 steps; 20w1s_tied: 250 steps at a
    constant learning rate, without clipping.
  20w1s_6400_t10000_meanpool: 6,400 steps, mean-pooled Conv-4, T held at
    10,000.
  within_alphabet_20w1s: the shipped pretrained model (`_within_alphabet`);
    within_alphabet_20w1s_56px the same at 56x56 pixels (the shift of the
    distortions doubled with the size).
  5w1s_cosine, 5w1s_long, 5w5s_cosine: `base.omniglot_5w1s` with a cosine
    decay of the learning rate: 1,500 steps; 2,400 steps with meta-gradients
    clipped at norm 2; on 5-shot episodes, 250 steps of a 500-step schedule.
"""

import ml_collections

from comln_tf import config as config_lib
from configs import base

FAMILY = "omniglot"  # The name of this file, and its dataset.


def _within_alphabet() -> ml_collections.ConfigDict:
  """One-shot learning within new alphabets: the shipped pretrained model.

  20-way 1-shot episodes whose 20 characters all come from one alphabet
  (harder negatives, as Lake et al.'s trials), random affine distortions of
  every training image (as Koch et al. 2015), the mean-pooled Conv-4, T
  held at 1,000, 3,000 steps. Validation: the same within-alphabet episodes
  on five held-out background alphabets.
  """
  config = base.omniglot_20w1s(FAMILY, steps=3000, validate_every=200)
  config = base.mean_pool(base.fixed_t(config, 1000.0))
  config.data.class_sampling = "within_alphabet"
  config.data.affine.rotation_degrees = 10.0
  config.data.affine.shear = 0.2
  config.data.affine.scale = 0.15
  config.data.affine.translation_pixels = 1.0
  return config


def _5w1s_cosine(
  steps: int, lr_decay_steps: int, validate_every: int
) -> ml_collections.ConfigDict:
  """The 5-way 1-shot recipe over `steps` steps of a cosine decay of the
  learning rate over `lr_decay_steps`, validated on 200 episodes."""
  config = base.omniglot_5w1s(steps)
  config.optim.lr_decay_steps = lr_decay_steps
  config.schedule.validate_every = validate_every
  config.schedule.validation_episodes = 200
  config.schedule.checkpoint_every = 50
  return config


RECIPES: dict[str, base.Recipe] = {
  "20w1s_800": lambda: base.omniglot_20w1s(FAMILY, steps=800),
  "20w1s_warm": lambda: base.continuation(FAMILY, "20w1s_800", seed=1),
  "20w1s_warm2": lambda: base.continuation(FAMILY, "20w1s_warm", seed=2),
  "20w1s_warm3": lambda: base.continuation(FAMILY, "20w1s_warm2", seed=3),
  "20w1s_warm4": lambda: base.continuation(FAMILY, "20w1s_warm3", seed=4),
  "20w5s_from_warm3": lambda: config_lib.updated(
    base.continuation(FAMILY, "20w1s_warm3", seed=5, steps=300),
    {"data.shots": 5},
  ),
  "20w1s_clip": lambda: base.omniglot_20w1s(FAMILY, steps=600),
  "20w1s_tied": lambda: config_lib.updated(
    base.omniglot_20w1s(FAMILY, steps=250, validate_every=250),
    {
      "optim.lr_decay_steps": None,
      "optim.clip_norm": None,
      "schedule.checkpoint_every": 50,
    },
  ),
  "20w1s_6400_t10000_meanpool": lambda: base.mean_pool(
    base.fixed_t(
      base.omniglot_20w1s(FAMILY, steps=6400, validate_every=200), 10000.0
    )
  ),
  "within_alphabet_20w1s": _within_alphabet,
  "within_alphabet_20w1s_56px": lambda: config_lib.updated(
    _within_alphabet(),
    {"data.image_size": 56, "data.affine.translation_pixels": 2.0},
  ),
  "5w1s_cosine": lambda: _5w1s_cosine(1500, 1500, validate_every=250),
  "5w1s_long": lambda: config_lib.updated(
    _5w1s_cosine(2400, 2400, validate_every=200), {"optim.clip_norm": 2.0}
  ),
  "5w5s_cosine": lambda: config_lib.updated(
    _5w1s_cosine(250, 500, validate_every=250), {"data.shots": 5}
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of recipe `arg` (`--config=configs/<this file>.py:<arg>`)."""
  return base.select(FAMILY, RECIPES, arg)
