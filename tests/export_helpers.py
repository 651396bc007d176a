"""Helpers of the export tests: small exported models, tasks and requests.

Exports are loaded with `tf.compat.v1.saved_model.loader.load` in their own
graph and session (`export.session`, the kind of loading TF Serving and
`saved_model_cli run` do) and fed the tensors of `PredictRequest` protos.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

from comln_tf import backbones
from comln_tf.layers import GradientFlowClassifier
from comln_tf.model import COMLN
from export import saved_model
from export import session
from export import warmup

WAYS = 5
IMAGE_SHAPE = (28, 28, 1)
TOLERANCE = 1e-5


def built_model(classifier, example_shape=IMAGE_SHAPE, backbone=None):
  """A COMLN model with seed 0, built as comln_tf.training builds models.

  Args:
    classifier: its GradientFlowClassifier.
    example_shape: shape of one example.
    backbone: default a Conv-4 of 8 filters (embeddings of size 8).
  """
  keras.utils.set_random_seed(0)
  model = COMLN(backbone or backbones.Conv4(filters=8), classifier)
  # Built as comln_tf.training builds models, not by a call.
  model.build({"support_images": (None, None) + tuple(example_shape)})
  return model


def five_way_model():
  """A 5-way Conv-4 (8 filters) model on 28x28x1 images, T = 2."""
  return built_model(GradientFlowClassifier(WAYS, initial_t=2.0))


def exported(base, model, example_shape=IMAGE_SHAPE, **export_options):
  """(served session, export dir) of `model` exported to a version of base."""
  export_dir = saved_model.export_version(
    model, str(base), example_shape, **export_options
  )
  return session.SessionModel(export_dir), export_dir


def random_task(ways, shots, queries, seed=0):
  """Random task: (support_images [ways*shots, 28, 28, 1], labels int64
  [ways*shots] in shuffled order, query_images [queries, 28, 28, 1])."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(ways), shots))
  return (
    rng.random((ways * shots,) + IMAGE_SHAPE, np.float32),
    labels,
    rng.random((queries,) + IMAGE_SHAPE, np.float32),
  )


def serve(served, signature, **inputs):
  """Outputs of a PredictRequest built from numpy `inputs`."""
  return served.run(warmup.predict_request(signature, inputs))


def keras_logits(model, support, labels, query):
  """The Keras model on one task (support and queries embedded together)."""
  return model(
    {
      "support_images": support[None],
      "support_labels": labels[None],
      "query_images": query[None],
    }
  )[0].numpy()


def assert_outputs(outputs, logits, atol=TOLERANCE):
  """Checks logits, probabilities and classes against Keras logits [Q, N]."""
  np.testing.assert_allclose(outputs["logits"], logits, atol=atol)
  np.testing.assert_allclose(
    outputs["probabilities"], tf.nn.softmax(logits).numpy(), atol=atol
  )
  np.testing.assert_array_equal(outputs["classes"], logits.argmax(-1))
  assert outputs["classes"].dtype == np.int64


def run(command, cwd, env=None, succeed=True):
  """Runs a command; fails the test with its stderr unless as expected."""
  result = subprocess.run(
    command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )
  assert (result.returncode == 0) == succeed, result.stderr[-3000:]
  return result


def run_python(code, cwd):
  """Runs `code` in a fresh interpreter, outside the repository."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("PYTHONPATH", None)
  return run([sys.executable, "-c", textwrap.dedent(code)], cwd, env)


# A valid request: a 5-way 1-shot task with 4 queries, and weights [N, d]
# for `predict` (d = 8, the embedding size of `five_way_model`).
SUPPORT, LABELS, QUERY = random_task(WAYS, 1, 4)
TASK = {
  "support_images": SUPPORT,
  "support_labels": LABELS,
  "query_images": QUERY,
}
WEIGHTS = np.ones((WAYS, 8), np.float32)
