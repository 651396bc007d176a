"""omniglot_20w1s_warm3 continued on 20-way 5-shot episodes: 300 steps from lr
0.05, seed 5."""

from configs import base
from configs import omniglot_20w1s_warm3


def get_config():
  config = base.continuation(omniglot_20w1s_warm3, seed=5, steps=300)
  config.data.shots = 5
  return config
