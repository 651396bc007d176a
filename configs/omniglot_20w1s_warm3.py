"""omniglot_20w1s_warm2 continued: 600 steps from lr 0.05, seed 3."""

from configs import base
from configs import omniglot_20w1s_warm2


def get_config():
  return base.continuation(omniglot_20w1s_warm2, seed=3)
