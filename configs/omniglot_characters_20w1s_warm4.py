"""omniglot_characters_20w1s_warm3 continued: 600 steps from lr 0.05, seed 4."""

from configs import base
from configs import omniglot_characters_20w1s_warm3


def get_config():
  return base.continuation(omniglot_characters_20w1s_warm3, seed=4)
