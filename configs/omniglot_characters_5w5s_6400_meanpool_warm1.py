"""omniglot_characters_20w1s_6400_t10000_meanpool continued on 5-way 5-shot
episodes (15 queries a class; validation on 300 of them): a 2,400-step schedule
from lr 0.02, seed 1 (the reported run was stopped at step 1,450)."""

from configs import base
from configs import omniglot_characters_20w1s_6400_t10000_meanpool


def get_config():
  config = base.continuation(
    omniglot_characters_20w1s_6400_t10000_meanpool,
    seed=1,
    steps=2400,
    learning_rate=0.02,
  )
  config.data.ways, config.data.shots, config.data.queries = 5, 5, 15
  config.schedule.validation_episodes = 300
  return config
