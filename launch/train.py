r"""Meta-trains COMLN on few-shot episodes.

Writes config.json, checkpoints (latest, and the best validation accuracy
under best/) and TensorBoard summaries into --model_dir; rerunning with the
same flags resumes from the latest checkpoint.

Example (Omniglot 5-way 1-shot, Conv-4):
  python -m launch.train --model_dir=runs/omniglot_5w1s --rotations \
      --ways=5 --shots=1 --steps=2000
Distributed over two logical CPU devices:
  python -m launch.train --model_dir=runs/x --strategy=mirrored \
      --devices=/cpu:0,/cpu:1
Worker i of a 2-worker cluster (same flags and --model_dir on each):
  TF_CONFIG='{"cluster": {"worker": ["host0:port", "host1:port"]},
      "task": {"type": "worker", "index": i}}' \
      python -m launch.train --model_dir=runs/x --strategy=multi_worker
"""

import sys

from absl import app
from absl import flags

from comln_tf import training
import launch

_D = training.DEFAULTS

# Data.
flags.DEFINE_enum("dataset", _D["dataset"], training.DATASETS,
                  "Episode source (see comln_tf.data.load_splits).")
flags.DEFINE_string("data_dir", _D["data_dir"],
                    "Directory of the dataset's files (for omniglot: a TFDS "
                    "data dir; default $TFDS_DATA_DIR).")
flags.DEFINE_integer("image_size", _D["image_size"],
                     "Side of the square images (default: the dataset's, "
                     "28 for omniglot, 84 otherwise).")
flags.DEFINE_bool("rotations", _D["rotations"],
                  "Add the 90/180/270-degree rotations of every training "
                  "class as new classes (Omniglot augmentation).")
flags.DEFINE_bool("train_on_validation", _D["train_on_validation"],
                  "Train on the train and validation classes together (a "
                  "final training, as Prototypical Networks); needs "
                  "--validate_every=0.")
flags.DEFINE_integer("ways", _D["ways"], "Classes per episode (N).")
flags.DEFINE_integer("shots", _D["shots"],
                     "Support examples per class (k).")
flags.DEFINE_integer("queries", _D["queries"], "Query examples per class.")
flags.DEFINE_integer("meta_batch_size", _D["meta_batch_size"],
                     "Episodes per meta-training step (global, over all "
                     "replicas).")
# Model.
flags.DEFINE_enum("backbone", _D["backbone"], training.BACKBONES,
                  "Embedding network (identity for precomputed features).")
flags.DEFINE_bool("global_pool", _D["global_pool"],
                  "Average the backbone's last feature map over space "
                  "(d = its channels) instead of flattening it.")
flags.DEFINE_bool("pool_last_block", _D["pool_last_block"],
                  "Conv-4: max-pool after the fourth block too. "
                  "--nopool_last_block --global_pool averages its whole map "
                  "(as MAML's Omniglot Conv-4 averages its last map).")
flags.DEFINE_enum("downsample", _D["downsample"], training.DOWNSAMPLING,
                  "Conv-4: how each block halves its map; stride with "
                  "--global_pool is MAML's Omniglot Conv-4.")
flags.DEFINE_float("initial_t", _D["initial_t"],
                   "Initial integration time T (learned as log T).")
flags.DEFINE_bool("train_t", _D["train_t"],
                  "Meta-learn T; --notrain_t keeps T at --initial_t, also "
                  "with --init_from.")
flags.DEFINE_bool("tie_init_rows", _D["tie_init_rows"],
                  "One shared initial row of W0 (any number of ways).")
flags.DEFINE_float("label_smoothing", _D["label_smoothing"],
                   "Label smoothing of the support labels.")
flags.DEFINE_enum("method", _D["method"], training.METHODS,
                  "How meta-gradients are computed.")
flags.DEFINE_enum("solver", _D["solver"], training.SOLVERS, "ODE solver.")
flags.DEFINE_float("rtol", _D["rtol"], "Relative tolerance of dopri5.")
flags.DEFINE_float("atol", _D["atol"], "Absolute tolerance of dopri5.")
flags.DEFINE_integer("solver_steps", _D["solver_steps"],
                     "Steps of the fixed-step solvers (rk4, euler).")
flags.DEFINE_integer("max_solver_steps", _D["max_solver_steps"],
                     "Most steps of a solve before it fails.")
flags.DEFINE_bool("jit_compile", _D["jit_compile"],
                  "XLA-compile the adaptation (the ODE solve and its "
                  "meta-gradient): faster steps, a compile at the start. "
                  "Exports are not affected.")
flags.DEFINE_integer("tasks_per_solve", _D["tasks_per_solve"],
                     "Solve the tasks of a meta-batch in groups of this many "
                     "(less memory; on CPU groups of ~4 are also faster; "
                     "not with --jit_compile). "
                     "Default: all together.")
# Optimization.
flags.DEFINE_enum("optimizer", _D["optimizer"], training.OPTIMIZERS,
                  "Meta-optimizer.")
flags.DEFINE_float("learning_rate", _D["learning_rate"],
                   "Meta learning rate.")
flags.DEFINE_integer("lr_decay_steps", _D["lr_decay_steps"],
                     "Decay the learning rate to 0 over this many steps "
                     "(cosine; usually = --steps). Default: constant.")
flags.DEFINE_float("clip_norm", _D["clip_norm"],
                   "Scale the meta-gradient down to this global norm when it "
                   "is larger. Default: no clipping.")
flags.DEFINE_float("momentum", _D["momentum"], "Momentum of SGD.")
flags.DEFINE_bool("nesterov", _D["nesterov"], "Nesterov momentum for SGD.")
flags.DEFINE_float("weight_decay", _D["weight_decay"],
                   "L2 coefficient on the backbone and W0 (never on T).")
flags.DEFINE_string("init_from", _D["init_from"],
                    "model_dir of a finished run: start from the weights of "
                    "its best checkpoint (backbone, W0, T) with a fresh "
                    "optimizer and step, e.g. to train on with a new "
                    "schedule (use another --seed for new episodes).")
flags.DEFINE_integer("seed", _D["seed"],
                     "Seed of the initial weights and of the episodes.")
flags.DEFINE_integer("validate_every", _D["validate_every"],
                     "Steps between validations (0: never; no best "
                     "checkpoint).")
flags.DEFINE_integer("validation_episodes", _D["validation_episodes"],
                     "Fixed validation episodes.")
# Run.
flags.DEFINE_string("model_dir", None,
                    "Directory of the run: config, checkpoints, summaries.")
flags.DEFINE_integer("steps", _D["steps"], "Meta-training steps in total.")
flags.DEFINE_integer("log_every", _D["log_every"],
                     "Steps between summaries.")
flags.DEFINE_integer("checkpoint_every", _D["checkpoint_every"],
                     "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", _D["keep_checkpoints"],
                     "Latest checkpoints kept.")
flags.DEFINE_enum("strategy", _D["strategy"], training.STRATEGIES,
                  "tf.distribute strategy: default (one device), mirrored "
                  "(local devices), multi_worker (TF_CONFIG), tpu.")
flags.DEFINE_list("devices", _D["devices"],
                  "Devices of --strategy=mirrored (default: all local "
                  "GPUs), e.g. /cpu:0,/cpu:1 (logical CPUs are created).")
flags.DEFINE_string("tpu", _D["tpu"],
                    "TPU name or address for --strategy=tpu ('local' on a "
                    "TPU VM).")
flags.DEFINE_bool("progress", True,
                  "Show a progress bar on a terminal (otherwise, and with "
                  "--noprogress, progress is a log line every --log_every "
                  "steps).")
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS


def main(argv):
  launch.start(argv)
  try:
    config = training.make_config(
        **{key: FLAGS[key].value for key in training.DEFAULTS})
    # First: the strategy needs a TensorFlow runtime not yet initialized.
    strategy = training.make_strategy(config["strategy"], config["devices"],
                                      config["tpu"])
    training.train(config, FLAGS.model_dir, strategy, progress=FLAGS.progress)
  except (training.ConfigError, training.DivergedError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
