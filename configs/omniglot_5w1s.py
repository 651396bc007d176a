"""The main job (launch/main_job.sh): Omniglot split by alphabet (this project's
split), the 5-way 1-shot recipe cut to 300 steps, validated every 100 steps."""

from configs import base


def get_config():
  config = base.omniglot_5w1s(steps=300)
  config.schedule.validate_every = 100
  config.schedule.validation_episodes = 100
  return config
