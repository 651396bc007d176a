"""omniglot_characters_20w1s_warm5_t10 continued: 600 steps, seed 6, T held at
10."""

from configs import base
from configs import omniglot_characters_20w1s_warm5_t10


def get_config():
  return base.continuation(omniglot_characters_20w1s_warm5_t10, seed=6)
