r"""Checks that a SavedModel serves the model `launch.evaluate` evaluated.

Replays the fixed test episodes of a `launch.evaluate` result through the
export's adapt_and_predict_batch signature (each task served as
adapt_and_predict serves it alone, many tasks per request) and compares
the served classes with the predictions the evaluation recorded beside
its JSON; prints the checkpoint and step of both, the served model's
accuracy, and how many predicted classes differ. Exits with an error if
the export comes from another checkpoint, if a prediction differs where
the evaluated model's two best logits are not within rounding of each
other, or if the export gives NaN or infinite logits. Logs a line as each
step starts and a progress line every 10% of the episodes (and at least
every 5 s) unless --noprogress.

Usage:
  python -m launch.evaluate --model_dir=runs/omniglot_5w1s \
      --output=runs/omniglot_5w1s/evaluation_test.json
  python -m export.check_served \
      --evaluation=runs/omniglot_5w1s/evaluation_test.json \
      --export_dir=exports/omniglot_5w1s/1
"""

import sys

from absl import app
from absl import flags

from comln_tf import evaluation
from comln_tf import training
from export import served_check
import launch

_EVALUATION = flags.DEFINE_string(
  "evaluation",
  None,
  "The result JSON of launch.evaluate (its predictions beside it).",
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "The export: a version folder <export_base>/<N>."
)
_PROGRESS = flags.DEFINE_bool(
  "progress",
  True,
  "Log a line as each step starts and a progress line (episodes done, "
  "served accuracy so far) every 10% of the episodes and at least every 5 s.",
)
flags.mark_flags_as_required(["evaluation", "export_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TensorFlow's own INFO lines (one per signature and file saved) are not
  # the user's concern; comln_tf and export log through their own loggers.
  launch.quiet_library_logs()
  try:
    result = served_check.compare(
      _EVALUATION.value, _EXPORT_DIR.value, progress=_PROGRESS.value
    )
  except (
    training.ConfigError,
    evaluation.NonFiniteLogitsError,
    OSError,
  ) as error:
    sys.exit(f"check_served: {error}")
  print(
    f"The evaluated model: {result['checkpoint']} (step "
    f"{result['step']}); the export {_EXPORT_DIR.value}: "
    f"{result['export_checkpoint']} (step {result['export_step']})."
  )
  print(
    f"Served model on the {result['episodes']} episodes: accuracy "
    f"{100 * result['served_accuracy']:.2f}% (the evaluated model: "
    f"{100 * result['evaluated_accuracy']:.2f}%); "
    f"{result['disagreements']} of {result['queries']} queries "
    f"classified differently ({result['ties']} of them near-ties)."
  )
  if result["export_checkpoint"] != result["checkpoint"]:
    sys.exit(
      "check_served: the export comes from another checkpoint than "
      "the evaluated one."
    )
  if result["disagreements"] > result["ties"]:
    sys.exit(
      "check_served: the served model's predictions differ from the "
      "evaluated model's."
    )


if __name__ == "__main__":
  app.run(main)
