"""omniglot_20w1s_800 continued: 600 steps from lr 0.05, seed 1."""

from configs import base
from configs import omniglot_20w1s_800


def get_config():
  return base.continuation(omniglot_20w1s_800, seed=1)
