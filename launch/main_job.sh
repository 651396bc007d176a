#!/usr/bin/env bash
# The main job: meta-train COMLN on Omniglot 5-way 1-shot (Conv-4, 28x28)
# with configs/omniglot_5w1s.py, evaluate it on 1,000 fixed test episodes
# (95% CI), export the same checkpoint as a SavedModel for TensorFlow
# Serving, and print the served model's accuracy on those episodes (checked
# against the predictions the evaluation recorded). Sets up .venv first.
#
# Extra arguments go to launch.train (e.g. --config.schedule.steps=2000).
# Rerunning resumes the training from its last checkpoint. Offline, point
# TFDS at a prepared copy:
#   TFDS_DATA_DIR=../shared/tensorflow_datasets bash launch/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
MODEL_DIR="${MODEL_DIR:-runs/omniglot_5w1s}"
EXPORT_BASE="${EXPORT_BASE:-exports/omniglot_5w1s}"
PY=.venv/bin/python
$PY -m launch.train --config=configs/omniglot_5w1s.py \
  --model_dir="$MODEL_DIR" "$@"
# Both default to the best checkpoint (the latest if the run has none).
EVALUATION="$MODEL_DIR/evaluation_test.json"
$PY -m launch.evaluate --model_dir="$MODEL_DIR" --episodes=1000 --queries=15 \
  --output="$EVALUATION"
$PY -m export.export_model --model_dir="$MODEL_DIR" \
  --export_base="$EXPORT_BASE"
EXPORT_DIR="$EXPORT_BASE/$(ls "$EXPORT_BASE" | grep -E '^[0-9]+$' | sort -n \
  | tail -n 1)"
$PY -m export.check_served --evaluation="$EVALUATION" \
  --export_dir="$EXPORT_DIR"
echo "Done: run in $MODEL_DIR, SavedModel in $EXPORT_DIR."
