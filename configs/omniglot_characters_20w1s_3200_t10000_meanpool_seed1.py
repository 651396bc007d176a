"""omniglot_characters_20w1s_3200_t10000_meanpool with other training episodes
(seed 1)."""

from configs import omniglot_characters_20w1s_3200_t10000_meanpool


def get_config():
  config = omniglot_characters_20w1s_3200_t10000_meanpool.get_config()
  config.run.seed = 1
  return config
