r"""Exports a trained COMLN run as a SavedModel version for TF Serving.

Reads the run's config.json and a checkpoint (by default the one
`launch.evaluate` evaluates: the best, or the latest if the run has no
best) and writes
`<export_base>/<version>/` (by default the next free number: TF Serving
serves the highest one), with warmup requests in `assets.extra/`. See
`export/saved_model.py` for the signatures.

Usage:
  python -m export.export_model --model_dir=runs/omniglot_5w1s \
      --export_base=exports/comln
"""

import sys

from absl import app
from absl import flags
import tensorflow as tf

from comln_tf import training
from export import saved_model
import launch

_MODEL_DIR = flags.DEFINE_string(
  "model_dir", None, "The training run's directory."
)
_EXPORT_BASE = flags.DEFINE_string(
  "export_base",
  None,
  "The model's base folder (the one TF Serving watches); the export goes "
  "to <export_base>/<version>/.",
)
_CHECKPOINT = flags.DEFINE_enum(
  "checkpoint",
  "auto",
  training.CHECKPOINTS,
  "Which checkpoint: best on validation, latest, or auto: the best if the "
  "run has one, else the latest (what launch.evaluate evaluates by "
  "default).",
)
_VERSION = flags.DEFINE_integer(
  "version",
  None,
  "Version number; default: 1 + the highest existing.",
  lower_bound=1,
)
_MODEL_NAME = flags.DEFINE_string(
  "model_name",
  "comln",
  "The name TF Serving serves the model under (used in the warmup requests).",
)
_WARMUP_WAYS = flags.DEFINE_integer(
  "warmup_ways",
  None,
  "Ways of the warmup requests of a model with tied rows of W0 (default: "
  "the run's); fewer ways make a smaller warmup file.",
  lower_bound=2,
)
_MAX_SUPPORT = flags.DEFINE_integer(
  "max_serving_support",
  saved_model.DEFAULT_SERVING_SUPPORT,
  "The most support images of one request; more are refused.",
  lower_bound=1,
)
_MAX_QUERIES = flags.DEFINE_integer(
  "max_serving_queries",
  saved_model.DEFAULT_SERVING_QUERIES,
  "The most query images of one request; more are refused (send them in "
  "several requests).",
  lower_bound=1,
)
flags.mark_flags_as_required(["model_dir", "export_base"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TensorFlow's own INFO lines (one per signature and file saved) are not
  # the user's concern; comln_tf and export log through their own loggers.
  launch.quiet_library_logs()
  try:
    config = training.load_config(_MODEL_DIR.value)
    # Once: a live run may replace its best or old checkpoints.
    checkpoint = training.checkpoint_path(_MODEL_DIR.value, _CHECKPOINT.value)
    step = training.checkpoint_step(checkpoint)
    model = training.model_from_checkpoint(config, checkpoint)
    export_dir = saved_model.export_version(
      model,
      _EXPORT_BASE.value,
      config.data.example_shape,
      version=_VERSION.value,
      ways=_WARMUP_WAYS.value or config.data.ways,
      model_name=_MODEL_NAME.value,
      max_serving_support=_MAX_SUPPORT.value,
      max_serving_queries=_MAX_QUERIES.value,
      metadata={
        "checkpoint": checkpoint,
        "step": step,
        "dataset": config.data.dataset,
        "ways": config.data.ways,
        "shots": config.data.shots,
        "backbone": config.model.backbone,
      },
    )
  except (OSError, ValueError, training.ConfigError) as error:
    # Missing run or checkpoint, damaged config.json, existing version,
    # export base that is a file or cannot be written, limits too small
    # for the warmup requests: one line, no traceback.
    sys.exit(f"export_model: {error}")
  except tf.errors.OpError as error:
    sys.exit(f"export_model: {error.message.strip().splitlines()[0]}")
  print(
    f"Exported {checkpoint} (step {step}) to {export_dir}; signatures: "
    f"{', '.join(saved_model.SIGNATURES)}."
  )


if __name__ == "__main__":
  app.run(main)
