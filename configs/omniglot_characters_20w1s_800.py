"""Omniglot split by character (MAML's protocol): the 20-way 1-shot recipe, 800
steps."""

from configs import base


def get_config():
  return base.omniglot_20w1s("omniglot_characters", steps=800)
