r"""Exports a trained COMLN run as a SavedModel version for TF Serving.

Reads the run's config.json and its latest or best checkpoint and writes
`<export_base>/<version>/` (by default the next free number: TF Serving
serves the highest one), with warmup requests in `assets.extra/`. See
`export/saved_model.py` for the signatures.

Usage:
  python -m export.export_model --model_dir=runs/omniglot_5w1s \
      --export_base=exports/comln --checkpoint=best
"""

import sys

from absl import app
from absl import flags

from comln_tf import training
from export import saved_model

_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "The training run's directory.")
_EXPORT_BASE = flags.DEFINE_string(
    "export_base", None,
    "The model's base folder (the one TF Serving watches); the export goes "
    "to <export_base>/<version>/.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "latest", ["latest", "best"],
    "Which checkpoint: the latest, or the best on validation.")
_VERSION = flags.DEFINE_integer(
    "version", None, "Version number; default: 1 + the highest existing.",
    lower_bound=1)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "comln",
    "The name TF Serving serves the model under (used in the warmup "
    "requests).")
flags.mark_flags_as_required(["model_dir", "export_base"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    model, config = training.restore_model(_MODEL_DIR.value,
                                           _CHECKPOINT.value)
    checkpoint = training.checkpoint_path(_MODEL_DIR.value, _CHECKPOINT.value)
    export_dir = saved_model.export_version(
        model, _EXPORT_BASE.value, config["example_shape"],
        version=_VERSION.value, ways=config["ways"],
        model_name=_MODEL_NAME.value,
        metadata={"checkpoint": checkpoint,
                  "step": training.checkpoint_step(checkpoint),
                  "dataset": config["dataset"], "ways": config["ways"],
                  "shots": config["shots"], "backbone": config["backbone"]})
  except (FileNotFoundError, FileExistsError) as error:
    sys.exit(f"export_model: {error}")
  print(f"Exported {checkpoint} to {export_dir}; signatures: "
        f"{', '.join(saved_model.SIGNATURES)}.")


if __name__ == "__main__":
  app.run(main)
