"""omniglot_characters_20w1s_800 without Conv-4's last pooling (its 3x3x64 map
flattened)."""

from configs import omniglot_characters_20w1s_800


def get_config():
  config = omniglot_characters_20w1s_800.get_config()
  config.model.pool_last_block = False
  return config
