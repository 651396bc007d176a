"""Omniglot split by alphabet (this project's split): the 5-way 1-shot recipe,
on 5-shot episodes, 250 steps of a 500-step cosine schedule."""

from configs import base


def get_config():
  config = base.omniglot_5w1s(steps=250)
  config.data.shots = 5
  config.optim.lr_decay_steps = 500
  config.schedule.validate_every = 250
  config.schedule.validation_episodes = 200
  config.schedule.checkpoint_every = 50
  return config
