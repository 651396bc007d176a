"""omniglot_20w1s_warm continued: 600 steps from lr 0.05, seed 2."""

from configs import base
from configs import omniglot_20w1s_warm


def get_config():
  return base.continuation(omniglot_20w1s_warm, seed=2)
