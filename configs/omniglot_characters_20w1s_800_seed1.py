"""omniglot_characters_20w1s_800 with other training episodes (seed 1)."""

from configs import omniglot_characters_20w1s_800


def get_config():
  config = omniglot_characters_20w1s_800.get_config()
  config.run.seed = 1
  return config
