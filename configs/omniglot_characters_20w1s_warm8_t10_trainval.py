"""omniglot_characters_20w1s_warm7_t10 continued on the training and validation
classes together (600 steps, seed 8, no validation: its model is its latest
checkpoint)."""

from configs import base
from configs import omniglot_characters_20w1s_warm7_t10


def get_config():
  config = base.continuation(omniglot_characters_20w1s_warm7_t10, seed=8)
  config.data.train_on_validation = True
  config.schedule.validate_every = 0
  return config
