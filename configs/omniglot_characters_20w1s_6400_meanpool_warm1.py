"""omniglot_characters_20w1s_6400_t10000_meanpool continued: 3,200 steps from lr
0.05, seed 1."""

from configs import base
from configs import omniglot_characters_20w1s_6400_t10000_meanpool


def get_config():
  return base.continuation(
    omniglot_characters_20w1s_6400_t10000_meanpool, seed=1, steps=3200
  )
