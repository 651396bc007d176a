"""omniglot_characters_20w1s_warm4 continued: 600 steps, seed 5, T held at
10."""

from configs import base
from configs import omniglot_characters_20w1s_warm4


def get_config():
  config = base.continuation(omniglot_characters_20w1s_warm4, seed=5)
  return base.fixed_t(config, 10.0)
