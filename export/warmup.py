"""Representative requests: TF Serving's warmup file, and benchmark inputs.

TF Serving replays `<version>/assets.extra/tf_serving_warmup_requests` (a
TFRecord file of `PredictionLog` protos) before it serves a new version, so
the first real requests do not pay for graph initialisation. The requests
here are also the benchmark's: N-way 1-shot and 5-shot tasks with 15 queries
per class (75 for 5 ways).
"""

from collections.abc import Callable, Sequence
import os

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

WARMUP_FILE = "tf_serving_warmup_requests"
QUERIES_PER_CLASS = 15


def task(example_shape: Sequence[int], ways: int, shots: int, seed: int = 0):
  """A random task with pixels uniform in [0, 1] (shapes are what matter).

  Args:
    example_shape: (H, W, C) of one image.
    ways: N. shots: k.
    seed: of the pixels.

  Returns:
    dict with support_images float32 [N k, H, W, C], support_labels int64
    [N k] (0..N-1, k times), query_images float32 [15 N, H, W, C].
  """
  rng = np.random.default_rng(seed)
  example_shape = tuple(example_shape)
  return {
    "support_images": rng.random((ways * shots,) + example_shape, np.float32),
    "support_labels": np.tile(np.arange(ways, dtype=np.int64), shots),
    "query_images": rng.random(
      (QUERIES_PER_CLASS * ways,) + example_shape, np.float32
    ),
  }


def predict_request(
  signature: str, inputs: dict, model_name: str = "comln"
) -> predict_pb2.PredictRequest:
  """A PredictRequest for `signature` with numpy `inputs` (name -> array)."""
  request = predict_pb2.PredictRequest(
    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
  )
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return request


def requests(
  adapt: Callable[[np.ndarray, np.ndarray], np.ndarray],
  example_shape: Sequence[int],
  ways: int,
  tied: bool,
  model_name: str = "comln",
) -> list[predict_pb2.PredictRequest]:
  """One request per signature for each representative task.

  Tasks: `ways`-way 1-shot and 5-shot, plus 3-way 1-shot for a tied-rows
  model (it serves any number of ways).

  Args:
    adapt: support_images, support_labels -> weights [N, d] (for the
      `predict` requests, whose weights are those of a real adaptation).
    example_shape: (H, W, C).
    ways: the number of ways as trained.
    tied: whether W0 has tied rows.
    model_name: the name the model is served under.

  Returns:
    list of PredictRequest: serving_default, adapt_and_predict_batch (the
    task alone), adapt, predict and embed for each task.
  """
  cases = [(ways, 1), (ways, 5)] + ([(3, 1)] if tied else [])
  result = []
  for seed, (n, shots) in enumerate(cases):
    inputs = task(example_shape, n, shots, seed)
    support = {key: inputs[key] for key in ("support_images", "support_labels")}
    weights = adapt(inputs["support_images"], inputs["support_labels"])
    # The batch signature on this one task: B = 1 stays within the limits.
    batch = {key: value[None] for key, value in inputs.items()}
    result += [
      predict_request("serving_default", inputs, model_name),
      predict_request("adapt_and_predict_batch", batch, model_name),
      predict_request("adapt", support, model_name),
      predict_request(
        "predict",
        {"query_images": inputs["query_images"], "weights": weights},
        model_name,
      ),
      predict_request("embed", {"images": inputs["query_images"]}, model_name),
    ]
  return result


def path(export_dir: str) -> str:
  return os.path.join(export_dir, "assets.extra", WARMUP_FILE)


def write(export_dir: str, warmup_requests) -> None:
  """Writes the requests as PredictionLog records where TF Serving reads."""
  tf.io.gfile.makedirs(os.path.dirname(path(export_dir)))
  with tf.io.TFRecordWriter(path(export_dir)) as writer:
    for request in warmup_requests:
      writer.write(
        prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request)
        ).SerializeToString()
      )


def read(export_dir: str) -> list[predict_pb2.PredictRequest]:
  """The PredictRequests of an export's warmup file, in order."""
  return [
    prediction_log_pb2.PredictionLog.FromString(
      record.numpy()
    ).predict_log.request
    for record in tf.data.TFRecordDataset(path(export_dir))
  ]
