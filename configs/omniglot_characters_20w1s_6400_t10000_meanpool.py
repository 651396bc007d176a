"""Omniglot split by character (MAML's protocol): the 20-way 1-shot recipe,
6,400 steps, mean-pooled Conv-4, T held at 10,000."""

from configs import base


def get_config():
  config = base.omniglot_20w1s(
    "omniglot_characters", steps=6400, validate_every=200
  )
  return base.mean_pool(base.fixed_t(config, 10000.0))
