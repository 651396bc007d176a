"""omniglot_characters_20w1s_warm7_t10 continued with label smoothing 0.1 (600
steps, seed 8)."""

from configs import base
from configs import omniglot_characters_20w1s_warm7_t10


def get_config():
  config = base.continuation(omniglot_characters_20w1s_warm7_t10, seed=8)
  config.adaptation.label_smoothing = 0.1
  return config
