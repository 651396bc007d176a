"""Evaluates a trained COMLN run on 1,000 fixed test episodes.

Prints the mean accuracy and its 95% confidence interval (1.96 * std /
sqrt(n)) and writes them as JSON (default: into --model_dir). The episodes
depend only on --seed (fixed by default), so every run and machine is
evaluated on the same ones. Logs a progress line every 10% of the episodes
(and at least every 5 s) unless --noprogress.

Example:
  python -m launch.evaluate --model_dir=runs/omniglot_5w1s
"""

import re
import sys

from absl import app
from absl import flags

from comln_tf import data
from comln_tf import evaluation
from comln_tf import training
import launch

flags.DEFINE_string("model_dir", None, "Directory of the trained run.")
flags.DEFINE_enum(
  "checkpoint",
  "auto",
  training.CHECKPOINTS,
  "Which checkpoint: best validation accuracy, latest, or "
  "auto: the best if the run has one, else the latest (what "
  "export.export_model exports by default).",
)
flags.DEFINE_enum(
  "split", "test", ["test", "validation"], "Classes of the episodes."
)
flags.DEFINE_integer("episodes", 1000, "Number of episodes.")
flags.DEFINE_integer(
  "seed",
  evaluation.TEST_SEED,
  "Seed of the episodes (the default is the standard test set).",
)
flags.DEFINE_integer(
  "ways", None, "Classes per episode, >= 2 (default: the run's)."
)
flags.DEFINE_integer(
  "shots", None, "Support examples per class (default: the run's)."
)
flags.DEFINE_integer(
  "queries", None, "Query examples per class (default: the run's)."
)
flags.DEFINE_integer(
  "batch_size",
  None,
  "Episodes per model call (default: the run's meta-batch size).",
)
flags.DEFINE_string(
  "data_dir", None, "Where the dataset is (default: the run's)."
)
flags.DEFINE_float(
  "t_final",
  None,
  "Adapt up to this T instead of the learned one (e.g. a T "
  "chosen with --split=validation); finite and > 0 in the model's dtype "
  "(float32: below 3.4e38).",
)
flags.DEFINE_bool(
  "rotate_classes",
  False,
  "Rotate each class of an episode by a random multiple of 90 "
  "degrees, support and queries alike, as MAML's Omniglot "
  "evaluation does (square images only).",
)
flags.DEFINE_enum(
  "class_sampling",
  None,
  data.CLASS_SAMPLING,
  "How episodes draw their classes: uniform, or "
  "within_alphabet (all from one alphabet, as Lake et al.'s "
  "one-shot trials). Default: the run's.",
)
flags.DEFINE_enum(
  "classifier",
  "comln",
  evaluation.CLASSIFIERS,
  "comln: the run's adapted classifier; prototypes: the "
  "nearest class mean of the support embeddings "
  "(Prototypical Networks) on the run's embeddings, a "
  "baseline.",
)
flags.DEFINE_string(
  "output",
  None,
  "JSON file of the results (default: --model_dir/"
  "evaluation_<split>_<checkpoint>_<ways>w<shots>s<queries>q"
  "[_t<t_final>][_rotated][_prototypes].json). A .json name other than "
  "config.json; an existing file is replaced only if it is an earlier "
  "evaluation result.",
)
flags.DEFINE_bool(
  "progress",
  True,
  "Log a progress line (episodes done, accuracy so far) every 10% of the "
  "episodes and at least every 5 s.",
)
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS

# evaluate_run's arguments whose flags are named otherwise.
_FLAG_OF_ARGUMENT = {"which": "checkpoint", "num_episodes": "episodes"}


def _with_flag_names(message: str) -> str:
  """An evaluate_run error, naming these flags rather than its arguments."""
  for argument, flag in _FLAG_OF_ARGUMENT.items():
    message = re.sub(rf"(?<![\w./-]){argument}\b", f"--{flag}", message)
  return message


def _result_line(results, written=True):
  """The printed result: episodes, checkpoint, accuracy, where written."""
  details = ", classes rotated" if results["rotate_classes"] else ""
  if results["class_sampling"] != "uniform":
    details += f", classes {results['class_sampling'].replace('_', ' ')}"
  if results["classifier"] == "comln":
    classifier = f"T {results['t_final']:.6g}"
  else:
    classifier = f"classifier {results['classifier']}"
  where = f"written to {results['output']}" if written else "NOT written"
  return (
    f"{results['split']} accuracy, {results['ways']}-way "
    f"{results['shots']}-shot{details}, {results['episodes']} episodes, "
    f"{results['which']} checkpoint {results['checkpoint']} (step "
    f"{results['step']}), {classifier}: "
    f"{100 * results['accuracy']:.2f}% +- "
    f"{100 * results['ci95']:.2f}% (95% CI); {where}"
  )


def main(argv):
  launch.start(argv)
  try:
    results = training.evaluate_run(
      FLAGS.model_dir,
      which=FLAGS.checkpoint,
      split=FLAGS.split,
      num_episodes=FLAGS.episodes,
      seed=FLAGS.seed,
      ways=FLAGS.ways,
      shots=FLAGS.shots,
      queries=FLAGS.queries,
      batch_size=FLAGS.batch_size,
      data_dir=FLAGS.data_dir,
      output=FLAGS.output,
      t_final=FLAGS.t_final,
      rotate_classes=FLAGS.rotate_classes,
      classifier=FLAGS.classifier,
      class_sampling=FLAGS.class_sampling,
      progress=FLAGS.progress,
    )
  except training.ConfigError as error:
    sys.exit(f"error: {_with_flag_names(str(error))}")
  except evaluation.NonFiniteLogitsError as error:
    sys.exit(f"error: {error}")
  except evaluation.ResultNotWrittenError as error:
    print(_result_line(error.results, written=False), flush=True)
    sys.exit(f"error: {error}")
  print(_result_line(results))


if __name__ == "__main__":
  app.run(main)
