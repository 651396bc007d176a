"""omniglot_characters_20w1s_warm7_t10 continued on 60-way 1-shot episodes (600
steps, seed 8)."""

from configs import base
from configs import omniglot_characters_20w1s_warm7_t10


def get_config():
  config = base.continuation(omniglot_characters_20w1s_warm7_t10, seed=8)
  config.data.ways = 60
  return config
