"""Omniglot in Vinyals' split (Prototypical Networks' lists): the recipes of
the results.

`--config=configs/omniglot_vinyals.py:<recipe>` trains into
runs/omniglot_vinyals_<recipe> (docs/results.md has each one's results).
Every recipe is `base.omniglot_20w1s` on data.dataset="omniglot_vinyals" for
800 steps: 20w1s_800 with T learned, 20w1s_800_t10 with T held at 10, and
their k-th continuation `_w<k>` (`base.continuation`: 600 steps from lr
0.05, seed k).
"""

import ml_collections

from configs import base

FAMILY = "omniglot_vinyals"  # The name of this file, and its dataset.

RECIPES: dict[str, base.Recipe] = {
  "20w1s_800": lambda: base.omniglot_20w1s(FAMILY, steps=800),
  "20w1s_800_w1": lambda: base.continuation(FAMILY, "20w1s_800", seed=1),
  "20w1s_800_w2": lambda: base.continuation(FAMILY, "20w1s_800_w1", seed=2),
  "20w1s_800_w3": lambda: base.continuation(FAMILY, "20w1s_800_w2", seed=3),
  "20w1s_800_t10": lambda: base.fixed_t(get_config("20w1s_800"), 10.0),
  "20w1s_800_t10_w1": lambda: base.continuation(
    FAMILY, "20w1s_800_t10", seed=1
  ),
  "20w1s_800_t10_w2": lambda: base.continuation(
    FAMILY, "20w1s_800_t10_w1", seed=2
  ),
  "20w1s_800_t10_w3": lambda: base.continuation(
    FAMILY, "20w1s_800_t10_w2", seed=3
  ),
  "20w1s_800_t10_w4": lambda: base.continuation(
    FAMILY, "20w1s_800_t10_w3", seed=4
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of recipe `arg` (`--config=configs/<this file>.py:<arg>`)."""
  return base.select(FAMILY, RECIPES, arg)
