"""omniglot_characters_20w1s_warm7_t10 continued: 600 steps, seed 8, T held at
10."""

from configs import base
from configs import omniglot_characters_20w1s_warm7_t10


def get_config():
  return base.continuation(omniglot_characters_20w1s_warm7_t10, seed=8)
