"""Omniglot split by alphabet (this project's split): the 20-way 1-shot recipe,
600 steps."""

from configs import base


def get_config():
  return base.omniglot_20w1s("omniglot", steps=600)
