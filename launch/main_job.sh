#!/usr/bin/env bash
# The main job: meta-train COMLN on Omniglot 5-way 1-shot (Conv-4, 28x28),
# evaluate it on 1,000 fixed test episodes (95% CI) and export a SavedModel
# for TensorFlow Serving. Sets up .venv first.
#
# Extra arguments go to launch.train (e.g. --steps=2000). Rerunning resumes
# the training from its last checkpoint. Offline, point TFDS at a prepared
# copy: TFDS_DATA_DIR=../shared/tensorflow_datasets bash launch/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
MODEL_DIR="${MODEL_DIR:-runs/omniglot_5w1s}"
EXPORT_BASE="${EXPORT_BASE:-exports/omniglot_5w1s}"
PY=.venv/bin/python
# The Results recipe of the README (tied W0 rows, XLA, rtol 1e-6), cut to
# 300 steps so that it finishes in minutes on a laptop CPU.
$PY -m launch.train --model_dir="$MODEL_DIR" --dataset=omniglot --rotations \
  --ways=5 --shots=1 --queries=5 --meta_batch_size=16 --tie_init_rows \
  --jit_compile --rtol=1e-6 --atol=1e-6 --steps=300 \
  --validate_every=100 --validation_episodes=100 "$@"
$PY -m launch.evaluate --model_dir="$MODEL_DIR" --episodes=1000 --queries=15
$PY -m export.export_model --model_dir="$MODEL_DIR" --export_base="$EXPORT_BASE"
echo "Done: run in $MODEL_DIR, SavedModel under $EXPORT_BASE."
