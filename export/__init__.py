"""Export of trained COMLN models for TensorFlow Serving.

Modules:
  saved_model: the SavedModel (signatures adapt_and_predict / serving_default,
    adapt, predict, embed; in-graph validation), version folders.
  export_model: command line, from a training model_dir to
    <export_base>/<version>/.
  warmup: representative PredictRequests (TF Serving's warmup file).
  session: an export loaded with the TF1 session loader, as TF Serving does.
  served_check: an export's predictions against the model launch.evaluate
    evaluates; check_served: its command line.
  benchmark: serving latency, size on disk and load time of an export.
"""

# The launchers' quiet TensorFlow start-up (see launch/__init__.py).
import launch  # noqa: E402, F401  pylint: disable=unused-import
