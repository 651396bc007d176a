"""omniglot_characters_20w1s_warm4 continued: 600 steps, seed 5, T learned."""

from configs import base
from configs import omniglot_characters_20w1s_warm4


def get_config():
  return base.continuation(omniglot_characters_20w1s_warm4, seed=5)
