"""omniglot_characters_20w1s_800 with Conv-4's last map averaged (mean-pooled
Conv-4)."""

from configs import base
from configs import omniglot_characters_20w1s_800


def get_config():
  config = omniglot_characters_20w1s_800.get_config()
  config = base.mean_pool(config)
  return config
