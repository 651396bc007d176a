"""The saved config of a run, as a config file for `launch.train`.

`python -m launch.train --model_dir=runs/x --config.schedule.steps=5000`
loads runs/x/config.json through this file (`--config=<this file>:runs/x`,
added by `launch.train`), so that --config.<field> overrides apply to it.
"""

import ml_collections

from comln_tf import training


def get_config(model_dir: str) -> ml_collections.ConfigDict:
  return training.load_config(model_dir)
