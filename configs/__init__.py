"""Experiment configs: one file per named recipe (ml_collections).

Each `configs/<name>.py` has `get_config()` returning the run's ConfigDict
(see `comln_tf.training.default_config` for the fields); train it with

  python -m launch.train --config=configs/<name>.py --model_dir=runs/<name>

and override any field with `--config.<group>.<field>=value`. A recipe
continued from another run's model sets `run.init_from="runs/<parent>"`.
"""
