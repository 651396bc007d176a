"""Omniglot split by alphabet (this project's split): the 20-way 1-shot recipe,
250 steps at a constant learning rate, without clipping."""

from configs import base


def get_config():
  config = base.omniglot_20w1s("omniglot", steps=250, validate_every=250)
  config.optim.lr_decay_steps = None
  config.optim.clip_norm = None
  config.schedule.checkpoint_every = 50
  return config
