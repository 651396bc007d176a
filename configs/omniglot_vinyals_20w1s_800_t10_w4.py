"""omniglot_vinyals_20w1s_800_t10_w3 continued: 600 steps from lr 0.05, seed
4."""

from configs import base
from configs import omniglot_vinyals_20w1s_800_t10_w3


def get_config():
  return base.continuation(omniglot_vinyals_20w1s_800_t10_w3, seed=4)
