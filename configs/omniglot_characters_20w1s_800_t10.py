"""omniglot_characters_20w1s_800 with T held at 10."""

from configs import base
from configs import omniglot_characters_20w1s_800


def get_config():
  config = omniglot_characters_20w1s_800.get_config()
  config = base.fixed_t(config, 10.0)
  return config
