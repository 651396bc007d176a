"""A trained COMLN model as a SavedModel that TensorFlow Serving runs.

The SavedModel carries the backbone, W0, T and the ODE solve: a client sends
one task (a support set and its labels, and queries) and gets the queries'
predictions, with no Python code of this project on the serving side.
Loading it needs TensorFlow only.

Signatures (one task per request but for adapt_and_predict_batch; M
support, Q query, n images, any sizes >= 1; images float32 [_, H, W, C]
with pixels as in training, in [0, 1]):
  serving_default, also named adapt_and_predict:
    support_images [M, H, W, C], support_labels int64 [M],
    query_images [Q, H, W, C] -> logits float32 [Q, N],
    probabilities float32 [Q, N], classes int64 [Q].
  adapt_and_predict_batch: B tasks of one shape in one request (each
    served as adapt_and_predict serves it alone): support_images
    [B, M, H, W, C], support_labels int64 [B, M] (every task holding each
    class 0..N-1), query_images [B, Q, H, W, C] -> logits float32
    [B, Q, N], probabilities float32 [B, Q, N], classes int64 [B, Q].
  adapt: support_images, support_labels -> weights float32 [N, d], the
    adapted classifier W(T).
  predict: query_images, weights -> logits, probabilities, classes.
  embed: images [n, H, W, C] -> embeddings float32 [n, d].

N is the number of ways as trained; a model with tied rows of W0
(`tie_init_rows`) takes any N >= 2, N = max(support_labels) + 1. Every
class 0..N-1 must appear in the support set.

Batch norm of the backbone uses the statistics of the images embedded
together (per task, as in training). `adapt_and_predict` embeds support and
query images together, exactly as the Keras model; `adapt`, `predict` and
`embed` embed the images they are given, as one set. So `predict`'s outputs
depend on the batch of queries sent with each request, and adapt + predict
is close to, but not equal to, adapt_and_predict.

Bad inputs fail with InvalidArgument errors that name the input: wrong
image size or channels, empty support or query set, labels out of range,
a class missing from the support set, non-finite pixels or weights, pixels
outside [0, 1]. The signatures leave H, W and C unknown so that a wrong
size is always reported by these checks, in the same words for every
client; with static sizes, each loader would enforce them (or not) in its
own way (the Python session raises a ValueError before the graph runs).
Only the rank is fixed by the signature.

A request's work is bounded: it may send at most `max_serving_support`
support images and `max_serving_queries` query images (`embed`: their sum;
adapt_and_predict_batch: B M and B Q in all),
its solve runs at most `max_serving_steps` solver steps (all fixed at
export, in the metadata), and a support set whose flow is far too stiff for
that budget (estimated from the largest eigenvalue of its embeddings' Gram
matrix, before any solver step) is refused with an error saying so. Logits
that are not finite (embeddings or weights that overflow) are refused too:
no class is ever the argmax of NaN.

Layout written by `export`: `<export_dir>/saved_model.pb`, `variables/`,
`assets.extra/tf_serving_warmup_requests` (PredictionLog records, replayed by
TF Serving at load) and `assets.extra/comln_export.json` (what a client
needs to know: ways, image shape, embedding size, T).
"""

from collections.abc import Sequence
import json
import logging
import os
import re
import socket
import time
import uuid

import keras
import tensorflow as tf

from comln_tf import _validation
from comln_tf import training
from comln_tf.model import COMLN
from export import warmup

_LOG = logging.getLogger(__name__)

ADAPT_AND_PREDICT = "adapt_and_predict"
ADAPT_AND_PREDICT_BATCH = "adapt_and_predict_batch"
ADAPT = "adapt"
PREDICT = "predict"
EMBED = "embed"
SERVING_DEFAULT = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
SIGNATURES = (
  SERVING_DEFAULT,
  ADAPT_AND_PREDICT,
  ADAPT_AND_PREDICT_BATCH,
  ADAPT,
  PREDICT,
  EMBED,
)

METADATA_FILE = "comln_export.json"

# Most solver steps of one request's solve, fixed at export (see `export`):
# room over what the solves of trained and untrained models take on tasks of
# the training's sizes.
DEFAULT_SERVING_STEPS = 2_000

# Most support and query images of one request, fixed at export (see
# `export`): a request's backbone work grows with them. A 5-way task sends
# 5-25 support and 75 query images.
DEFAULT_SERVING_SUPPORT = 1_000
DEFAULT_SERVING_QUERIES = 1_000

# The most shots of a task of `warmup.requests` (1-shot and 5-shot).
_WARMUP_SHOTS = 5

# dopri5 is stable for steps h with h * rate <= ~3.3 on decaying modes.
_DOPRI5_STABILITY = 3.3

# A request is refused before its solve when its estimated steps exceed
# this many times the budget (see `_Endpoints._check_stiffness`).
_STIFFNESS_MARGIN = 10.0

# Power iterations for the largest eigenvalue of a support Gram matrix.
_POWER_ITERATIONS = 30


def _assert(condition, message, *data):
  """tf.debugging.Assert with a readable message and all of `data` shown."""
  return tf.debugging.Assert(condition, [message, *data], summarize=16)


def _in_order(checks, *tensors):
  """Runs the checks one after the other, then returns `tensors`.

  Each check is a callable building an assert op; it is built under the
  control of the previous one, so the first failing check is the one
  reported, and a later check may compute things only valid once the
  earlier ones passed (a bincount needs non-negative labels).

  Args:
    checks: sequence of callables returning an op.
    *tensors: tensors to pass through.

  Returns:
    tuple of identities of `tensors`, computed after every check.
  """
  previous = []
  for check in checks:
    with tf.control_dependencies(previous):
      previous = [check()]
  with tf.control_dependencies(previous):
    return tuple(tf.identity(t) for t in tensors)


class _Endpoints:
  """The graph functions of an export, around one COMLN model.

  Args:
    model: a built COMLN model.
    example_shape: shape of one example, (H, W, C) for images (or (d,) for
      the identity backbone on precomputed features).
    max_steps: the serving step budget of one solve.
    max_support: the most support images of one request.
    max_queries: the most query images of one request.
  """

  def __init__(
    self,
    model: COMLN,
    example_shape: Sequence[int],
    max_steps: int = DEFAULT_SERVING_STEPS,
    max_support: int = DEFAULT_SERVING_SUPPORT,
    max_queries: int = DEFAULT_SERVING_QUERIES,
  ):
    self.model = model
    self.max_steps = max_steps
    # Per input name: (the most examples of a request, what sets it).
    self.limits = {
      "support_images": (max_support, "max_serving_support"),
      "query_images": (max_queries, "max_serving_queries"),
      "images": (
        max_support + max_queries,
        "max_serving_support + max_serving_queries",
      ),
    }
    self.example_shape = tuple(int(s) for s in example_shape)
    # Images (rank 3) have pixels in [0, 1]; feature vectors any values.
    self.images = len(self.example_shape) == 3
    self.num_ways = model.classifier.num_ways
    self.tied = model.classifier.tie_init_rows
    self.embedding_size = model.backbone.compute_output_shape(
      (1, 1) + self.example_shape
    )[-1]
    if not self.tied and self.num_ways is None:
      raise ValueError("A model without tied rows needs num_ways.")

  def _examples_spec(self, name, tasks=False):
    # Rank fixed, every size left open: see the module docstring.
    return tf.TensorSpec(
      [None] * (1 + tasks + len(self.example_shape)), tf.float32, name=name
    )

  def _checked_examples(self, name, examples, count="n", tasks=False):
    """Asserts [count, *example_shape], 1 <= count <= limit, finite values.

    With `tasks`, [B, count, *example_shape] with B >= 1, and the limit
    holds for all B * count examples of the request. The limit is the
    input's in `self.limits`, checked before any work that grows with the
    count. Images must have pixels in [0, 1], as in training: a set scaled
    otherwise (e.g. [0, 255]) would give wrong answers, not an error, and
    huge values make the solve stiff.

    Returns:
      float32 [count, *example_shape] (or [B, count, *example_shape]) with
      a static example shape.
    """
    shape = tf.shape(examples)
    lead = 2 if tasks else 1
    limit, setting = self.limits[name]
    wanted = ", ".join(
      (["B"] if tasks else []) + [count] + [str(s) for s in self.example_shape]
    )
    in_all = f"{count} x B" if tasks else count
    checks = [
      lambda: _assert(
        tf.reduce_all(tf.equal(shape[lead:], self.example_shape)),
        f"{name} must have shape [{wanted}]; got shape",
        shape,
      ),
      lambda: _assert(
        tf.reduce_all(shape[:lead] > 0),
        f"{name} is empty: send at least one example"
        + (" and one task" if tasks else ""),
      ),
      lambda: _assert(
        tf.reduce_prod(shape[:lead]) <= limit,
        f"{name} holds too many examples for one request: at most {limit} "
        f"({setting}, fixed at export); send them in several requests. "
        f"Got {in_all} =",
        tf.reduce_prod(shape[:lead]),
      ),
      lambda: _assert(
        tf.reduce_all(tf.math.is_finite(examples)),
        f"{name} must be finite (no NaN or Inf values)",
      ),
    ]
    if self.images:
      checks.append(
        lambda: _assert(
          (tf.reduce_min(examples) >= 0.0) & (tf.reduce_max(examples) <= 1.0),
          f"{name} must hold pixels in [0, 1] (scaled as in training); got "
          f"values in",
          tf.reduce_min(examples),
          tf.reduce_max(examples),
        )
      )
    (examples,) = _in_order(checks, examples)
    return tf.ensure_shape(examples, (None,) * lead + self.example_shape)

  def _checked_labels(self, support_labels, support_images):
    """Asserts labels [M] covering 0..N-1; returns (int32 labels, N).

    Labels [B, M] of B tasks (support_images [B, M, ...]) must each cover
    0..N-1, the same N. N is the number of ways as trained, or max(label)
    + 1 with tied rows.
    """
    shape = tf.shape(support_labels)
    images = tf.shape(support_images)[: support_labels.shape.rank]
    if support_labels.shape.rank == 1:
      wanted = "[M], M = the number of support_images; got shapes"
      images, name = images[0], "M ="
    else:
      wanted = "[B, M], as support_images [B, M, ...]; got shapes"
      name = "support_images' [B, M] ="
    num_support = tf.shape(support_images)[support_labels.shape.rank - 1]
    checks = [
      lambda: _assert(
        tf.reduce_all(tf.equal(shape, images)),
        f"support_labels must have shape {wanted}",
        shape,
        f"and {name}",
        images,
      ),
      *self._label_value_checks(support_labels, num_support),
      lambda: self._assert_every_class_present(support_labels),
    ]
    (support_labels,) = _in_order(checks, support_labels)
    return tf.cast(support_labels, tf.int32), self._ways(support_labels)

  def _label_value_checks(self, support_labels, num_support):
    """The checks of the labels' range, before any op sized by a label."""
    low, high = tf.reduce_min(support_labels), tf.reduce_max(support_labels)
    if not self.tied:
      return [
        lambda: _assert(
          (low >= 0) & (high < self.num_ways),
          f"support_labels must be in [0, {self.num_ways}); got values in",
          low,
          high,
        )
      ]
    # Compared in int64 before the cast: a huge label must not wrap around.
    num_support_64 = tf.cast(num_support, tf.int64)
    return [
      lambda: _assert(
        low >= 0,
        "support_labels must be >= 0; got min(support_labels) =",
        low,
      ),
      lambda: _assert(
        high >= 1,
        "support_labels must hold at least 2 classes 0..N-1; got N =",
        high + 1,
      ),
      # Before the bincount of `_assert_every_class_present`: a huge label
      # must not allocate.
      lambda: _assert(
        high < num_support_64,
        "every class 0..N-1 must appear in "
        "support_labels, so N = max(support_labels) + 1 <= M; got "
        "max(support_labels) =",
        high,
        "and M =",
        num_support,
      ),
    ]

  def _ways(self, labels):
    """N: the number of ways as trained, or max(labels) + 1 with tied rows.

    With tied rows, built from checked labels only: nothing sized by N may
    run before the checks of `_label_value_checks` have passed.
    """
    if self.tied:
      return tf.cast(tf.reduce_max(labels), tf.int32) + 1
    return self.num_ways

  def _assert_every_class_present(self, support_labels):
    """The assert op that each class 0..N-1 has a support example."""
    num_ways = self._ways(support_labels)
    tasks = support_labels.shape.rank == 2
    counts = tf.math.bincount(
      tf.cast(support_labels, tf.int32),
      minlength=num_ways,
      maxlength=num_ways,
      axis=-1 if tasks else None,
    )
    missing = tf.where(tf.equal(counts, 0))
    return _assert(
      tf.reduce_all(counts > 0),
      "every class 0..N-1 must appear in support_labels"
      + (" of every task" if tasks else "")
      + "; N =",
      num_ways,
      "missing (task, class):" if tasks else "missing classes:",
      missing if tasks else missing[:, 0],
    )

  def _checked_weights(self, weights):
    """Asserts weights [N, d] as adapt returns them (finite, N as trained)."""
    shape = tf.shape(weights)
    d = self.embedding_size
    if self.tied:
      rows_ok, rows = shape[0] >= 2, "N >= 2"
    else:
      rows_ok, rows = tf.equal(shape[0], self.num_ways), f"N = {self.num_ways}"
    checks = [
      lambda: _assert(
        rows_ok & tf.equal(shape[1], d),
        f"weights must have shape [N, {d}] with {rows} (the "
        "output of adapt); got shape",
        shape,
      ),
      lambda: _assert(
        tf.reduce_all(tf.math.is_finite(weights)),
        "weights must be finite (no NaN or Inf values)",
      ),
    ]
    (weights,) = _in_order(checks, weights)
    return tf.ensure_shape(weights, (None, d))

  def _embeddings(self, examples):
    """[n, *example_shape] -> [n, d], the n examples normalised as one task."""
    return self.model.backbone(examples[None], training=False)[0]

  def _check_stiffness(self, support_embeddings, num_ways):
    """Asserts that the solve is expected to fit the step budget.

    The flow ds/dt = (softmax(L0 - G s) - Y) / M has Jacobian
    -(1/M) (softmax Jacobian) x G. At the start (near-uniform
    probabilities, exactly so with tied rows) its fastest rate is
    lambda_max(G) / (M N), and an explicit solver (dopri5) needs about
    T lambda_max(G) / (3.3 M N) steps while the flow stays that stiff. It
    often does not (probabilities saturate as the classes separate), so
    this overestimates: requests are refused only beyond _STIFFNESS_MARGIN
    times the budget, where no solve fits it; the others run at most
    `max_steps` steps. lambda_max comes from power iterations, which never
    overestimate it.
    """
    embeddings = tf.cast(support_embeddings, tf.float64)
    # [M, M], or [B, M, M] for B tasks: one eigenvalue per task.
    gram = tf.matmul(embeddings, embeddings, transpose_b=True)
    vector = tf.ones(tf.concat([tf.shape(gram)[:-1], [1]], 0), tf.float64)
    for _ in range(_POWER_ITERATIONS):
      vector = tf.matmul(gram, vector)
      norm = tf.norm(vector, axis=[-2, -1], keepdims=True)
      vector /= tf.maximum(norm, 1e-300)
    eigenvalue = tf.reduce_sum(vector * tf.matmul(gram, vector), [-2, -1])
    num_examples = tf.cast(tf.shape(gram)[-1], tf.float64)
    t_final = tf.cast(self.model.classifier.t_final, tf.float64)
    steps = (
      t_final
      * eigenvalue
      / (_DOPRI5_STABILITY * num_examples * tf.cast(num_ways, tf.float64))
    )
    limit = _STIFFNESS_MARGIN * self.max_steps
    checks = [
      lambda: _assert(
        tf.reduce_all(tf.math.is_finite(gram)),
        "the support_images' embeddings overflow (their Gram matrix is "
        "not finite): the inputs are far outside the training range",
      ),
      lambda: _assert(
        tf.reduce_all(steps <= limit),
        f"support set too stiff to adapt within the serving step budget "
        f"of {self.max_steps} steps fixed at export: the embeddings' Gram "
        f"matrix has largest eigenvalue",
        eigenvalue,
        "so the flow up to T =",
        t_final,
        "needs about",
        steps,
        f"steps (> {limit:g}); inputs unlike the training data?",
      ),
    ]
    (support_embeddings,) = _in_order(checks, support_embeddings)
    return support_embeddings

  def _weights(self, support_embeddings, support_labels, num_ways):
    """Plain solve of the gradient flow (no sensitivities).

    Args:
      support_embeddings: float32 [M, d], or [B, M, d] for B tasks.
      support_labels: int32 [M] or [B, M].
      num_ways: N.

    Returns:
      float32 [N, d], or [B, N, d]: each task's W(T) (step control is per
      task, so a task's weights do not depend on the others).
    """
    support_embeddings = self._check_stiffness(support_embeddings, num_ways)
    one_task = support_embeddings.shape.rank == 2
    weights = self.model.classifier.adapt(
      support_embeddings[None] if one_task else support_embeddings,
      support_labels[None] if one_task else support_labels,
      training=False,
      num_ways=num_ways if self.tied else None,
      max_steps=self.max_steps,
    )
    return weights[0] if one_task else weights

  @staticmethod
  def _outputs(query_embeddings, weights):
    """Logits, probabilities and classes, after a check of finite logits.

    Finite inputs can still overflow in the backbone or the product (the
    argmax of a row with NaN would be class 0, a silent answer).
    """
    logits = tf.matmul(query_embeddings, weights, transpose_b=True)
    (logits,) = _in_order(
      [
        lambda: _assert(
          tf.reduce_all(tf.math.is_finite(logits)),
          "the logits of the queries are not finite (NaN or Inf): the "
          "embeddings of the query_images or the weights overflow; inputs "
          "far outside the training range?",
        )
      ],
      logits,
    )
    return {
      "logits": logits,
      "probabilities": tf.nn.softmax(logits),
      "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
    }

  def adapt_and_predict(self, support_images, support_labels, query_images):
    """One task -> logits, probabilities, classes of its queries."""
    support_images = self._checked_examples(
      "support_images", support_images, "M"
    )
    query_images = self._checked_examples("query_images", query_images, "Q")
    num_support = tf.shape(support_images)[0]
    support_labels, num_ways = self._checked_labels(
      support_labels, support_images
    )
    # Support and queries embedded together, as the Keras model does.
    embeddings = self._embeddings(
      tf.concat([support_images, query_images], axis=0)
    )
    weights = self._weights(embeddings[:num_support], support_labels, num_ways)
    return self._outputs(embeddings[num_support:], weights)

  def adapt_and_predict_batch(
    self, support_images, support_labels, query_images
  ):
    """B tasks of one shape -> their queries' logits, probabilities, classes.

    Each task as `adapt_and_predict` serves it alone (its images embedded
    together, its own solve), in one request.
    """
    support_images = self._checked_examples(
      "support_images", support_images, "M", tasks=True
    )
    query_images = self._checked_examples(
      "query_images", query_images, "Q", tasks=True
    )
    support_images, query_images = _in_order(
      [
        lambda: _assert(
          tf.equal(tf.shape(support_images)[0], tf.shape(query_images)[0]),
          "support_images and query_images must hold the same number of "
          "tasks B; got",
          tf.shape(support_images)[0],
          "and",
          tf.shape(query_images)[0],
        )
      ],
      support_images,
      query_images,
    )
    support_labels, num_ways = self._checked_labels(
      support_labels, support_images
    )
    num_support = tf.shape(support_images)[1]
    # One task at a time through the backbone, as adapt_and_predict does
    # (its batch norm normalises each task's images as one set).
    embeddings = tf.map_fn(
      self._embeddings,
      tf.concat([support_images, query_images], axis=1),
      fn_output_signature=tf.TensorSpec(
        [None, self.embedding_size], tf.float32
      ),
    )
    weights = self._weights(
      embeddings[:, :num_support], support_labels, num_ways
    )
    return self._outputs(embeddings[:, num_support:], weights)

  def adapt(self, support_images, support_labels):
    """A support set -> the adapted weights [N, d]."""
    support_images = self._checked_examples(
      "support_images", support_images, "M"
    )
    support_labels, num_ways = self._checked_labels(
      support_labels, support_images
    )
    return {
      "weights": self._weights(
        self._embeddings(support_images), support_labels, num_ways
      )
    }

  def predict(self, query_images, weights):
    """Queries and adapted weights -> logits, probabilities, classes."""
    query_images = self._checked_examples("query_images", query_images, "Q")
    weights = self._checked_weights(weights)
    return self._outputs(self._embeddings(query_images), weights)

  def embed(self, images):
    """Images -> embeddings [n, d], the images normalised as one set."""
    return {
      "embeddings": self._embeddings(self._checked_examples("images", images))
    }

  def input_signatures(self):
    """Per endpoint name, the list of TensorSpecs of its arguments."""
    labels = tf.TensorSpec([None], tf.int64, name="support_labels")
    support = self._examples_spec("support_images")
    query = self._examples_spec("query_images")
    return {
      ADAPT_AND_PREDICT: [support, labels, query],
      ADAPT_AND_PREDICT_BATCH: [
        self._examples_spec("support_images", tasks=True),
        tf.TensorSpec([None, None], tf.int64, name="support_labels"),
        self._examples_spec("query_images", tasks=True),
      ],
      ADAPT: [support, labels],
      PREDICT: [query, tf.TensorSpec([None, None], tf.float32, name="weights")],
      EMBED: [self._examples_spec("images")],
    }


def export(
  model: COMLN,
  export_dir: str,
  example_shape: Sequence[int],
  *,
  ways: int | None = None,
  model_name: str = "comln",
  metadata: dict | None = None,
  max_serving_steps: int = DEFAULT_SERVING_STEPS,
  max_serving_support: int = DEFAULT_SERVING_SUPPORT,
  max_serving_queries: int = DEFAULT_SERVING_QUERIES,
) -> str:
  """Writes `model` as a SavedModel for TF Serving to `export_dir`.

  Args:
    model: a trained COMLN model (built).
    export_dir: the version folder to create (e.g. `<base>/3`); must not
      exist.
    example_shape: (H, W, C) of the images the model was trained on (or (d,)
      for precomputed features).
    ways: for a tied-rows model, the number of ways of its warmup requests
      (default 5; a model with one row per class uses its own).
    model_name: the model name in the warmup requests (the one TF Serving
      serves it under).
    metadata: extra JSON-able entries for `assets.extra/comln_export.json`
      (e.g. the checkpoint it comes from).
    max_serving_steps: the most solver steps of one request, fixed in the
      graph: a request's work is bounded whatever its inputs (see
      `_Endpoints._check_stiffness` for those refused before solving).
    max_serving_support: the most support images of one request (M); a
      request with more is refused, naming support_images and the limit.
    max_serving_queries: the most query images of one request (Q), as
      max_serving_support; `embed` takes up to the sum of both.

  Returns:
    export_dir.

  Raises:
    ValueError: a limit that is not a positive integer, or too small for
      the warmup requests (15 queries and up to 5 support images a way).
    FileExistsError: export_dir exists.
  """
  limits = {
    name: _positive_integer(name, value)
    for name, value in (
      ("max_serving_steps", max_serving_steps),
      ("max_serving_support", max_serving_support),
      ("max_serving_queries", max_serving_queries),
    )
  }
  if tf.io.gfile.exists(export_dir):
    raise FileExistsError(f"{export_dir} already exists.")
  endpoints = _Endpoints(
    model,
    example_shape,
    limits["max_serving_steps"],
    limits["max_serving_support"],
    limits["max_serving_queries"],
  )
  warmup_ways = endpoints.num_ways or ways or 5
  _check_warmup_fits(
    warmup_ways, limits["max_serving_support"], limits["max_serving_queries"]
  )
  functions = _write_saved_model(endpoints, export_dir)
  _write_warmup(
    export_dir, endpoints, functions[ADAPT], warmup_ways, model_name
  )
  _write_metadata(
    export_dir,
    {
      "signatures": list(SIGNATURES),
      "example_shape": list(endpoints.example_shape),
      "num_ways": endpoints.num_ways,
      "tie_init_rows": endpoints.tied,
      "embedding_size": endpoints.embedding_size,
      "t_final": float(model.classifier.t_final.numpy()),
      **limits,
      **(metadata or {}),
    },
  )
  return export_dir


def _positive_integer(name, value):
  """`value` as an int; ValueError naming `name` unless an integer >= 1."""
  try:
    return _validation.integer(name, value, 1)
  except ValueError:
    # The export's own wording of this rule, for every limit and version.
    raise ValueError(
      f"{name} must be a positive integer, got {value!r}."
    ) from None


def _write_saved_model(endpoints, export_dir):
  """Writes the endpoints as a SavedModel; returns them by endpoint name.

  Returns:
    dict of endpoint name -> the traced function that was written.
  """
  # No archive.track(model): the endpoints' variables are saved anyway, and
  # tracking would make TF trace the Keras model's own default signature.
  archive = keras.export.ExportArchive()
  # The first endpoint is also written as serving_default.
  functions = {
    name: archive.add_endpoint(
      name, getattr(endpoints, name), input_signature=signature
    )
    for name, signature in endpoints.input_signatures().items()
  }
  archive.write_out(export_dir, verbose=False)
  return functions


def _write_warmup(export_dir, endpoints, adapt_function, ways, model_name):
  """Writes the warmup requests, their `predict` weights by adapt_function."""

  def adapt(support_images, support_labels):
    return adapt_function(support_images, support_labels)["weights"].numpy()

  warmup.write(
    export_dir,
    warmup.requests(
      adapt, endpoints.example_shape, ways, endpoints.tied, model_name
    ),
  )


def metadata_path(export_dir: str) -> str:
  """The path of an export's `comln_export.json`."""
  return os.path.join(export_dir, "assets.extra", METADATA_FILE)


def _write_metadata(export_dir: str, info: dict) -> None:
  with tf.io.gfile.GFile(metadata_path(export_dir), "w") as f:
    json.dump(info, f, indent=2)


def read_metadata(export_dir: str) -> dict:
  """The entries of an export's `comln_export.json` (see `export`).

  Raises:
    OSError: the export (or its metadata file) cannot be read.
  """
  with open(metadata_path(export_dir)) as f:
    return json.load(f)


def _check_warmup_fits(ways, max_support, max_queries):
  """Raises ValueError if the warmup requests exceed the request limits."""
  support = _WARMUP_SHOTS * ways
  queries = warmup.QUERIES_PER_CLASS * ways
  if support > max_support or queries > max_queries:
    raise ValueError(
      f"The warmup requests of {ways} ways send {support} support and "
      f"{queries} query images, more than max_serving_support="
      f"{max_support} or max_serving_queries={max_queries}: raise the "
      f"limits or use fewer warmup ways."
    )


def next_version(export_base: str) -> int:
  """1 + the largest numeric version folder under export_base (1 if none)."""
  if not tf.io.gfile.isdir(export_base):
    return 1
  versions = [
    int(name.rstrip("/"))
    for name in tf.io.gfile.listdir(export_base)
    if name.rstrip("/").isdigit()
  ]
  return max(versions, default=0) + 1


# Temporary folders of exports: `.tmp-export-<host>-<pid>-<32 hex digits>`;
# a name without the host (`.tmp-export-<pid>-<hex>`) counts as this host's.
_TEMP_PREFIX = ".tmp-export-"
_TEMP_NAME = re.compile(
  r"^\.tmp-export-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{32}$"
)

# A temporary folder whose export cannot be seen (another host, or a pid
# reused since) is stale after this long: no export takes a day.
STALE_TEMP_SECONDS = 24 * 3600.0


def _host() -> str:
  """This host's name, as it appears in temporary folder names."""
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _is_stale(path: str, host: str | None, pid: int, now: float) -> bool:
  """Whether the temporary folder `path` of export (host, pid) is left over.

  Stale: its export's process no longer runs on this host, or (another
  host's, or a pid that runs again) it is older than STALE_TEMP_SECONDS.
  """
  if host in (None, _host()) and not training.process_runs(pid):
    return True
  try:
    modified = tf.io.gfile.stat(path).mtime_nsec / 1e9
  except (tf.errors.OpError, OSError):
    return False  # No modification time (an object store): kept.
  return now - modified > STALE_TEMP_SECONDS


def remove_stale_temp_dirs(export_base: str) -> list:
  """Removes the temporary folders of exports killed before they finished.

  Exports running now (on this host: their process runs; on another: a
  folder younger than STALE_TEMP_SECONDS) keep theirs.

  Args:
    export_base: the folder of the numbered versions.

  Returns:
    The paths removed.
  """
  removed = []
  now = time.time()
  for name in tf.io.gfile.listdir(export_base):
    match = _TEMP_NAME.match(name.rstrip("/"))
    if not match:
      continue
    path = os.path.join(export_base, name.rstrip("/"))
    if not _is_stale(path, match.group("host"), int(match.group("pid")), now):
      continue
    try:
      tf.io.gfile.rmtree(path)
    except (tf.errors.OpError, OSError):
      continue  # Removed meanwhile by another export.
    removed.append(path)
  if removed:
    _LOG.warning(
      "Removed the temporary folders of exports that did not finish: %s.",
      ", ".join(removed),
    )
  return removed


def _check_export_base(export_base: str) -> None:
  """Raises NotADirectoryError if export_base exists but is no directory."""
  if tf.io.gfile.exists(export_base) and not tf.io.gfile.isdir(export_base):
    raise NotADirectoryError(
      f"export_base {export_base!r} is a file, not a directory: pass the "
      f"folder that holds (or will hold) the numbered versions."
    )


def _claim(temp_dir: str, final_dir: str) -> bool:
  """Renames the finished temp_dir to final_dir unless that exists.

  The rename is the claim: it succeeds for one export only (a rename onto a
  non-empty directory fails), so two exports never share a version.

  Returns:
    Whether temp_dir is now final_dir.
  """
  try:
    tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)
  except (tf.errors.OpError, OSError):
    if tf.io.gfile.exists(final_dir):
      return False  # Another export took this number.
    raise
  return True


def export_version(
  model: COMLN,
  export_base: str,
  example_shape: Sequence[int],
  version: int | None = None,
  **kwargs,
) -> str:
  """Exports to `<export_base>/<version>/`, as TF Serving expects.

  The SavedModel is written to a temporary folder of its own (a name that
  is not a number, which TF Serving ignores) and renamed to its version
  folder when complete, so a server watching `export_base` never loads a
  half-written version, and exports running at the same time into one base
  never mix: each claims its number by that rename, and without `version`
  one that loses the race takes the next free number. The temporary folder
  is removed whatever happens; one left by an export that was killed
  (SIGKILL, a crash of its machine) is removed by a later export
  (`remove_stale_temp_dirs`).

  Args:
    model, example_shape, **kwargs: as `export`.
    export_base: the model's base folder (the one TF Serving watches).
    version: positive integer; default `next_version(export_base)` at the
      time the export is complete.

  Returns:
    The path of the version folder.

  Raises:
    ValueError: a version that is not a positive integer.
    FileExistsError: `version` is given and its folder exists.
    NotADirectoryError: export_base is a file.
  """
  if version is not None:
    version = _positive_integer("version", version)
  _check_export_base(export_base)
  if version is not None:
    final_dir = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(final_dir):
      raise FileExistsError(f"Version folder {final_dir} already exists.")
  tf.io.gfile.makedirs(export_base)
  remove_stale_temp_dirs(export_base)
  temp_dir = os.path.join(
    export_base,
    f"{_TEMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex}",
  )
  try:
    export(model, temp_dir, example_shape, **kwargs)
    if version is not None:
      if not _claim(temp_dir, final_dir):
        raise FileExistsError(
          f"Version folder {final_dir} already exists "
          f"(written by another export meanwhile)."
        )
      return final_dir
    while True:
      final_dir = os.path.join(export_base, str(next_version(export_base)))
      if _claim(temp_dir, final_dir):
        return final_dir
  finally:
    if tf.io.gfile.exists(temp_dir):
      tf.io.gfile.rmtree(temp_dir)
