"""The main job (launch/main_job.sh): Omniglot split by alphabet (this project's
split), the 5-way 1-shot recipe cut to 300 steps, validated every 100 steps.

`--config=configs/omniglot_5w1s.py` (no recipe argument) trains it into
runs/omniglot_5w1s.
"""

import ml_collections

from configs import base


def _main_job() -> ml_collections.ConfigDict:
  """The 5-way 1-shot recipe, 300 steps, validated every 100 steps on 100
  episodes."""
  config = base.omniglot_5w1s(steps=300)
  config.schedule.validate_every = 100
  config.schedule.validation_episodes = 100
  return config


RECIPES: dict[str | None, base.Recipe] = {None: _main_job}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The main job's config; `arg` must be None (this file has one recipe)."""
  return base.select("omniglot_5w1s", RECIPES, arg)
