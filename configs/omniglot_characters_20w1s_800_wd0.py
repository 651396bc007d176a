"""omniglot_characters_20w1s_800 without weight decay."""

from configs import omniglot_characters_20w1s_800


def get_config():
  config = omniglot_characters_20w1s_800.get_config()
  config.optim.weight_decay = 0.0
  return config
