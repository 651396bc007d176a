r"""Meta-trains COMLN from an experiment config file (configs/*.py).

Writes the resolved config (model_dir/config.json), checkpoints (latest, and
the best validation accuracy under best/) and TensorBoard summaries into
--model_dir. Rerunning resumes from the latest checkpoint; the run's saved
config is then used, and a --config, if given, must match it except in the
fields that do not change what is computed (training.RESUMABLE_FIELDS:
steps, logs, checkpoints, strategy, XLA, tasks per solve).

Examples:
  python -m launch.train --config=configs/omniglot_5w1s.py \
      --config.optim.learning_rate=0.05 --model_dir=runs/omniglot_5w1s
  python -m launch.train --model_dir=runs/omniglot_5w1s    # resume it
  python -m launch.train --model_dir=runs/omniglot_5w1s \
      --config.schedule.steps=600                        # and extend it
  python -m launch.train --config=configs/omniglot_5w1s.py --dry_run
Distributed over two logical CPU devices:
  python -m launch.train --config=configs/omniglot_5w1s.py --model_dir=x \
      --config.run.strategy=mirrored \
      --config.run.devices="['/cpu:0', '/cpu:1']"
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from comln_tf import training
import launch

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, e.g. configs/omniglot_5w1s.py; override any "
  "field with --config.<group>.<field>=value. Default: the saved config of "
  "the run in --model_dir (to resume it).",
)
_MODEL_DIR = flags.DEFINE_string(
  "model_dir", None, "Directory of the run: config, checkpoints, summaries."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Validate the config (its components built without weights), print it "
  "as JSON and exit, without data or training.",
)
_PROGRESS = flags.DEFINE_bool(
  "progress",
  True,
  "Show a progress bar on a terminal (otherwise, and with --noprogress, "
  "progress is a log line every config.schedule.log_every steps).",
)


def _with_saved_config(argv):
  """argv, with --config=<the run's saved config> added when it has
  --config.<field> overrides and a --model_dir but no --config: the
  overrides then apply to the run's config (to extend or resume it)."""
  has_config = any(
    arg == "--config" or arg.startswith("--config=") for arg in argv
  )
  has_overrides = any(arg.startswith("--config.") for arg in argv)
  model_dir = None
  for index, arg in enumerate(argv):
    if arg.startswith("--model_dir="):
      model_dir = arg.split("=", 1)[1]
    elif arg == "--model_dir" and index + 1 < len(argv):
      model_dir = argv[index + 1]
  if has_config or not has_overrides:
    return argv
  if model_dir is None:
    sys.exit(
      "error: --config.<field> overrides need --config (e.g. "
      "configs/omniglot_5w1s.py) or the --model_dir of a saved run."
    )
  try:
    training.load_config(model_dir)  # Fails here with a one-line error.
  except (FileNotFoundError, training.ConfigError) as error:
    sys.exit(f"error: {error}")
  saved = os.path.join(os.path.dirname(__file__), "saved_config.py")
  return argv[:1] + [f"--config={saved}:{model_dir}"] + argv[1:]


def _parse_flags(argv):
  """absl's flag parsing, with a one-line error for an unknown config field
  (ml_collections raises a KeyError from inside the parser)."""
  argv = _with_saved_config(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    sys.exit(f"FATAL Flags parsing error: {error}")
  except (KeyError, AttributeError) as error:
    while error.args and isinstance(error.args[0], Exception):
      error = error.args[0]
    sys.exit(f"error: unknown config field {error.args[0]}")


def main(argv):
  launch.start(argv)
  try:
    if _CONFIG.value is not None:
      config = _CONFIG.value
    elif _MODEL_DIR.value is not None:
      config = training.load_config(_MODEL_DIR.value)
    else:
      sys.exit(
        "error: pass --config (e.g. configs/omniglot_5w1s.py), or the "
        "--model_dir of a run to resume."
      )
    if _DRY_RUN.value:
      print(training.make_config(base=config).to_json(indent=2, sort_keys=True))
      return
    if _MODEL_DIR.value is None:
      sys.exit("error: --model_dir is required to train.")
    # First, before validation builds any layer: the strategy needs a
    # TensorFlow runtime not yet initialized. Training validates the rest.
    strategy = training.make_strategy(
      config.run.strategy, config.run.devices, config.run.tpu
    )
    training.train(config, _MODEL_DIR.value, strategy, progress=_PROGRESS.value)
  except (
    training.ConfigError,
    training.DivergedError,
    training.DiskFullError,
    FileNotFoundError,
  ) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
