"""Omniglot split by alphabet (this project's split): the 5-way 1-shot recipe,
1,500 steps, cosine decay."""

from configs import base


def get_config():
  config = base.omniglot_5w1s(steps=1500)
  config.optim.lr_decay_steps = 1500
  config.schedule.validate_every = 250
  config.schedule.validation_episodes = 200
  config.schedule.checkpoint_every = 50
  return config
