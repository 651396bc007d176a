"""Omniglot in Vinyals' split (Prototypical Networks' lists): the 20-way 1-shot
recipe, 800 steps, T held at 10."""

from configs import base


def get_config():
  return base.fixed_t(base.omniglot_20w1s("omniglot_vinyals", steps=800), 10.0)
