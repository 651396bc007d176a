"""One-shot learning within new alphabets: the shipped pretrained model.

Omniglot split by alphabet, 20-way 1-shot episodes whose 20 characters all
come from one alphabet (harder negatives, as Lake et al.'s trials), random
affine distortions of every training image (as Koch et al. 2015), the
mean-pooled Conv-4, T held at 1,000, 3,000 steps. Validation: the same
within-alphabet episodes on five held-out background alphabets.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.mean_pool(
    base.fixed_t(
      base.omniglot_20w1s("omniglot", steps=3000, validate_every=200), 1000.0
    )
  )
  config.data.class_sampling = "within_alphabet"
  config.data.affine.rotation_degrees = 10.0
  config.data.affine.shear = 0.2
  config.data.affine.scale = 0.15
  config.data.affine.translation_pixels = 1.0
  return config
