"""Omniglot split by alphabet (this project's split): the 5-way 1-shot recipe,
2,400 steps, cosine decay, meta-gradients clipped at norm 2."""

from configs import base


def get_config():
  config = base.omniglot_5w1s(steps=2400)
  config.optim.clip_norm = 2.0
  config.optim.lr_decay_steps = 2400
  config.schedule.validate_every = 200
  config.schedule.validation_episodes = 200
  config.schedule.checkpoint_every = 50
  return config
