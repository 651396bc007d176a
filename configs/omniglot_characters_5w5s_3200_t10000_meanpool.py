"""Omniglot split by character (MAML's protocol): the mean-pooled 3,200-step
recipe on 5-way 5-shot episodes (15 queries a class; validation on 300 of them),
T held at 10,000."""

from configs import base


def get_config():
  config = base.omniglot_20w1s(
    "omniglot_characters", steps=3200, validate_every=200
  )
  config = base.mean_pool(base.fixed_t(config, 10000.0))
  config.data.ways, config.data.shots, config.data.queries = 5, 5, 15
  config.schedule.validation_episodes = 300
  return config
