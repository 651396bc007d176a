r"""Checks that a SavedModel serves the model `launch.evaluate` evaluates.

Runs the export's adapt_and_predict_batch signature (each task served as
adapt_and_predict serves it alone, many tasks per request) and the Keras
model that `launch.evaluate` restores (same run, same default checkpoint)
on the fixed test episodes of the evaluation
protocol; prints the checkpoint and step of both, the served model's
accuracy, and how many predicted classes differ. Exits with an error if the
export comes from another checkpoint, if a prediction differs where the
Keras model's two best logits are not within rounding of each other, or if
either model gives NaN or infinite logits. Logs a line as each step starts
and a progress line every 10% of the episodes (and at least every 5 s)
unless --noprogress.

Usage:
  python -m export.check_served --model_dir=runs/omniglot_5w1s \
      --export_dir=exports/omniglot_5w1s/1 --queries=15
"""

import sys

from absl import app
from absl import flags

from comln_tf import evaluation
from comln_tf import training
from export import served_check
import launch

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The training run.")
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "The export: a version folder <export_base>/<N>."
)
_CHECKPOINT = flags.DEFINE_enum(
  "checkpoint",
  "auto",
  training.CHECKPOINTS,
  "The checkpoint launch.evaluate evaluates (its --checkpoint).",
)
_EPISODES = flags.DEFINE_integer(
  "episodes", 1000, "Test episodes.", lower_bound=1
)
_WAYS = flags.DEFINE_integer("ways", None, "Default: the run's.", lower_bound=2)
_SHOTS = flags.DEFINE_integer(
  "shots", None, "Default: the run's.", lower_bound=1
)
_QUERIES = flags.DEFINE_integer(
  "queries", None, "Default: the run's.", lower_bound=1
)
_PROGRESS = flags.DEFINE_bool(
  "progress",
  True,
  "Log a line as each step starts and a progress line (episodes done, "
  "served accuracy so far) every 10% of the episodes and at least every 5 s.",
)
flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TensorFlow's own INFO lines (one per signature and file saved) are not
  # the user's concern; comln_tf and export log through their own loggers.
  launch.quiet_library_logs()
  try:
    result = served_check.compare(
      _MODEL_DIR.value,
      _EXPORT_DIR.value,
      which=_CHECKPOINT.value,
      num_episodes=_EPISODES.value,
      ways=_WAYS.value,
      shots=_SHOTS.value,
      queries=_QUERIES.value,
      progress=_PROGRESS.value,
    )
  except (
    training.ConfigError,
    evaluation.NonFiniteLogitsError,
    OSError,
  ) as error:
    sys.exit(f"check_served: {error}")
  print(
    f"launch.evaluate's model: {result['checkpoint']} (step "
    f"{result['step']}); the export {_EXPORT_DIR.value}: "
    f"{result['export_checkpoint']} (step {result['export_step']})."
  )
  print(
    f"Served model on {result['episodes']} test episodes: accuracy "
    f"{100 * result['served_accuracy']:.2f}% (launch.evaluate's model: "
    f"{100 * result['evaluated_accuracy']:.2f}%); "
    f"{result['disagreements']} of {result['queries']} queries "
    f"classified differently ({result['ties']} of them near-ties)."
  )
  if result["export_checkpoint"] != result["checkpoint"]:
    sys.exit(
      "check_served: the export comes from another checkpoint than "
      "the one launch.evaluate evaluates."
    )
  if result["disagreements"] > result["ties"]:
    sys.exit(
      "check_served: the served model's predictions differ from the "
      "evaluated model's."
    )


if __name__ == "__main__":
  app.run(main)
