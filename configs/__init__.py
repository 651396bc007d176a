"""Experiment configs (ml_collections), one file per family of recipes.

  base.py: the library's default config (`comln_tf.config.default_config`),
    and the recipes and helpers the families share.
  omniglot_5w1s.py: the main job (launch/main_job.sh).
  omniglot.py, omniglot_characters.py, omniglot_vinyals.py: the recipes of
    docs/results.md on each split of Omniglot (the file's name is the
    dataset's), listed in each file's `RECIPES`.

`get_config(arg)` returns recipe `arg` of the file; train it with

  python -m launch.train --config=configs/<family>.py:<recipe> \
      --model_dir=runs/<family>_<recipe>

(`--config=configs/<family>.py` and runs/<family> for a file's config
without argument), and override any field with
`--config.<group>.<field>=value`. A continuation of a recipe sets
`run.init_from="runs/<family>_<parent recipe>"`, so train its parent first.
The files import no TensorFlow.
"""
