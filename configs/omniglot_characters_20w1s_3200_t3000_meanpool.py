"""Omniglot split by character (MAML's protocol): the 20-way 1-shot recipe,
3,200 steps, mean-pooled Conv-4, T held at 3,000."""

from configs import base


def get_config():
  config = base.omniglot_20w1s(
    "omniglot_characters", steps=3200, validate_every=200
  )
  return base.mean_pool(base.fixed_t(config, 3000.0))
