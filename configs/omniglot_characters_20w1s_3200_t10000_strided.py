"""Omniglot split by character (MAML's protocol): the 20-way 1-shot recipe,
3,200 steps, MAML's own Conv-4 (strided convolutions, last map averaged), T held
at 10,000."""

from configs import base


def get_config():
  config = base.omniglot_20w1s(
    "omniglot_characters", steps=3200, validate_every=200
  )
  config = base.fixed_t(config, 10000.0)
  config.model.global_pool = True
  config.model.downsample = "stride"
  return config
