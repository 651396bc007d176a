"""N-way k-shot q-query episodes as tf.data pipelines.

Episode i of the stream with seed s is a pure function of (s, i): it is
drawn with stateless Philox random ops keyed by [s, i]. Meta-batch j holds
episodes j*B .. j*B + B - 1, so a stream can start at any meta-batch, and
replicas can each build their own slice of every meta-batch, without any
shared random state.
"""

import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf

from comln_tf import _validation
from comln_tf.data._classes import ClassSet
from comln_tf.data._pipeline import without_autotune_thread

# A fixed algorithm: "auto_select" may pick a different one per device, and
# the episodes must be identical on every machine.
_RNG_ALG = "philox"

# How the N classes of an episode are drawn: "uniform" from all classes of
# the split; "within_alphabet" all from one group (alphabet) of the split,
# the group drawn uniformly among those with at least N classes, as in the
# one-shot trials of Lake et al. (Science 2015).
CLASS_SAMPLING = ("uniform", "within_alphabet")

# Keys folded into an episode's random key for its optional parts, so that
# the classes and examples drawn do not depend on them.
_GROUP_FOLD = 2
_DISTORTION_FOLD = 3


@dataclasses.dataclass(frozen=True)
class AffineDistortion:
  """Random affine distortions of training images (Koch et al. 2015).

  Each image of a training episode, support and query alike, is resampled
  (bilinear, edges extended) through its own random affine map about the
  image centre: a rotation, a shear, a scale and a translation, each
  drawn uniformly in [-x, x] (scale in [1 - x, 1 + x]). All zero: no
  distortion.

  Attributes:
      rotation_degrees: largest rotation, degrees.
      shear: largest shear factor of each axis.
      scale: largest relative change of the scale of each axis.
      translation_pixels: largest shift of each axis, pixels.
  """

  rotation_degrees: float = 0.0
  shear: float = 0.0
  scale: float = 0.0
  translation_pixels: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      try:
        _validation.in_range(field.name, value, 0, math.inf, include_high=False)
      except ValueError:
        raise ValueError(
          f"{field.name} must be a finite number >= 0, got {value!r}"
        ) from None
    if self.scale >= 1:
      raise ValueError(
        f"scale must be < 1 (images scaled by 1 +- scale), got {self.scale!r}"
      )

  @property
  def active(self) -> bool:
    """Whether any distortion is applied."""
    return any(
      getattr(self, field.name) > 0 for field in dataclasses.fields(self)
    )


def affine_transform_images(
  images: tf.Tensor, parameters: tf.Tensor
) -> tf.Tensor:
  """Resamples each image through its own affine map about its centre.

  The map sends output pixel p to input point A (p - c) + c + t, with
  A = R(rotation) [[1, shear_x], [shear_y, 1]] diag(scale_x, scale_y),
  c the image centre and t = (shift_x, shift_y); pixel coordinates are
  (column, row). Bilinear interpolation; points outside the image take
  the nearest edge pixel.

  Args:
      images: float32 [n, H, W, C].
      parameters: float32 [n, 7]: rotation (radians), shear_x, shear_y,
          scale_x, scale_y, shift_x, shift_y (pixels).

  Returns:
      float32 [n, H, W, C].
  """
  rotation, shear_x, shear_y, scale_x, scale_y, shift_x, shift_y = tf.unstack(
    parameters, axis=1
  )
  cos, sin = tf.cos(rotation), tf.sin(rotation)
  a00 = scale_x * (cos - sin * shear_y)
  a01 = scale_y * (cos * shear_x - sin)
  a10 = scale_x * (sin + cos * shear_y)
  a11 = scale_y * (sin * shear_x + cos)
  height, width = images.shape[1], images.shape[2]
  center_x, center_y = (width - 1) / 2, (height - 1) / 2
  b0 = center_x + shift_x - a00 * center_x - a01 * center_y
  b1 = center_y + shift_y - a10 * center_x - a11 * center_y
  zeros = tf.zeros_like(a00)
  transforms = tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=images,
    transforms=transforms,
    output_shape=tf.constant([height, width], tf.int32),
    fill_value=tf.constant(0.0),
    interpolation="BILINEAR",
    fill_mode="NEAREST",
  )


def _random_affine_parameters(key, count, distortion):
  """float32 [count, 7] parameters of `affine_transform_images`."""
  u = tf.random.stateless_uniform(
    [count, 7], key, minval=-1.0, maxval=1.0, alg=_RNG_ALG
  )
  limits = tf.constant(
    [
      math.radians(distortion.rotation_degrees),
      distortion.shear,
      distortion.shear,
      distortion.scale,
      distortion.scale,
      distortion.translation_pixels,
      distortion.translation_pixels,
    ],
    tf.float32,
  )
  ones = tf.constant([0, 0, 0, 1, 1, 0, 0], tf.float32)
  return ones + u * limits


def check_episode_args(
  class_set: ClassSet,
  ways: int,
  shots: int,
  queries: int,
  class_sampling: str = "uniform",
) -> tuple[int, int, int]:
  """Checks that `class_set` can make `ways`-way episodes.

  Args:
      class_set: a ClassSet.
      ways: classes per episode (N).
      shots: support examples per class (k).
      queries: query examples per class (q).
      class_sampling: one of CLASS_SAMPLING.

  Returns:
      (ways, shots, queries) as Python ints.

  Raises:
      ValueError: if an argument is not a positive integer, if `ways` is
          larger than the number of classes (with "within_alphabet": than
          the classes of every group), or if `shots + queries` is larger
          than the number of examples of some class.
  """
  ways, shots, queries = (
    _validation.integer(name, value, 1)
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries))
  )
  _validation.one_of("class_sampling", class_sampling, CLASS_SAMPLING)
  where = f"split '{class_set.split}' of dataset '{class_set.dataset}'"
  if ways > class_set.num_classes:
    raise ValueError(
      f"ways={ways} is larger than the {class_set.num_classes} classes "
      f"of {where}"
    )
  if class_sampling == "within_alphabet":
    _check_some_group_has(class_set, ways, where)
  counts = class_set.counts
  smallest = int(np.argmin(counts))
  if shots + queries > counts[smallest]:
    raise ValueError(
      f"shots + queries = {shots} + {queries} = {shots + queries} is "
      f"larger than the {counts[smallest]} examples of class "
      f"'{class_set.class_names[smallest]}' in {where}"
    )
  return ways, shots, queries


def _check_some_group_has(class_set, ways, where):
  """Raises ValueError unless a group (alphabet) has `ways` classes."""
  groups, _ = class_set.group_ids(min_classes=ways)
  if not groups:
    largest = max(
      np.unique(np.asarray(class_set.groups), return_counts=True)[1]
    )
    raise ValueError(
      f"class_sampling='within_alphabet' with ways={ways}: no "
      f"alphabet of {where} has {ways} classes (the largest has "
      f"{largest})"
    )


def _qualifying_groups(class_set, ways):
  """(number of groups with `ways` classes, int32 [C] group of each class).

  Logs the groups (alphabets) skipped for having fewer classes. A class
  of a skipped group has a group id outside [0, number of groups).
  """
  groups, class_group = class_set.group_ids(min_classes=ways)
  skipped = sorted(set(class_set.groups) - set(groups))
  if skipped:
    logging.info(
      "Within-alphabet %d-way episodes of split '%s' skip %d "
      "alphabets with fewer than %d classes: %s",
      ways,
      class_set.split,
      len(skipped),
      ways,
      ", ".join(skipped),
    )
  return len(groups), tf.constant(class_group)


def _to_float(examples):
  """uint8 images -> float32 in [0, 1]; other examples as they are."""
  if examples.dtype == tf.uint8:
    return tf.cast(examples, tf.float32) / 255.0
  return examples


class _EpisodeDrawer:
  """`drawer(index)`: int64 index -> one unbatched episode dict.

  Episode `index` of the stream with `seed` is drawn with stateless random
  ops keyed by [seed, index] (see the module docstring).
  """

  def __init__(
    self,
    class_set,
    ways,
    shots,
    queries,
    seed,
    rotate_classes=False,
    class_sampling="uniform",
    distortion=None,
  ):
    self._images, self._offsets, self._counts = class_set.tensors
    self._num_classes = class_set.num_classes
    self._ways, self._shots, self._queries = ways, shots, queries
    self._rotate_classes = rotate_classes
    self._class_group = None
    if class_sampling == "within_alphabet":
      self._num_groups, self._class_group = _qualifying_groups(class_set, ways)
    if distortion is not None and not distortion.active:
      distortion = None
    self._distortion = distortion
    self._example_shape = list(class_set.example_shape)
    self._max_count = int(np.max(class_set.counts))
    self._positions = tf.range(self._max_count, dtype=tf.int64)
    self._seed = tf.constant(seed, tf.int64)
    # Class-major: label n's examples are rows n*shots .. n*shots+shots-1.
    self._support_labels = tf.repeat(tf.range(ways, dtype=tf.int32), shots)
    self._query_labels = tf.repeat(tf.range(ways, dtype=tf.int32), queries)

  def __call__(self, index):
    class_key, example_key = tf.unstack(
      tf.random.split(tf.stack([self._seed, index]), 2, alg=_RNG_ALG)
    )
    classes = self._classes(class_key)
    examples = self._examples(classes, example_key)
    if self._rotate_classes:
      examples = self._rotated(examples, class_key)
    shots, shape = self._shots, self._example_shape
    support = _to_float(tf.reshape(examples[:, :shots], [-1, *shape]))
    query = _to_float(tf.reshape(examples[:, shots:], [-1, *shape]))
    if self._distortion is not None:
      support, query = self._distorted(support, query, example_key)
    return {
      "support_images": support,
      "support_labels": self._support_labels,
      "query_images": query,
      "query_labels": self._query_labels,
    }

  def _classes(self, class_key):
    """int32 [ways]: the class given label n, for each n."""
    # The `ways` largest of i.i.d. uniform noise are a uniformly random
    # ordered subset of the classes, so giving label n to the n-th one is
    # a random class -> label assignment.
    class_noise = tf.random.stateless_uniform(
      [self._num_classes], class_key, alg=_RNG_ALG
    )
    if self._class_group is not None:
      # One group, uniformly among those with `ways` classes; the
      # classes of other groups get noise -1 and are never picked.
      group_key = tf.random.experimental.stateless_fold_in(
        class_key, _GROUP_FOLD, alg=_RNG_ALG
      )
      group = tf.random.stateless_uniform(
        [],
        group_key,
        minval=0,
        maxval=self._num_groups,
        dtype=tf.int32,
        alg=_RNG_ALG,
      )
      class_noise = tf.where(
        tf.equal(self._class_group, group), class_noise, -1.0
      )
    return tf.math.top_k(class_noise, self._ways).indices

  def _examples(self, classes, example_key):
    """[ways, shots + queries, *example_shape]: distinct examples per class."""
    # The same trick picks shots + queries distinct examples per class;
    # positions past a class's example count get noise -1 so they are
    # never among the largest (check_episode_args ensures enough remain).
    noise = tf.random.stateless_uniform(
      [self._ways, self._max_count], example_key, alg=_RNG_ALG
    )
    valid = self._positions[None, :] < tf.gather(self._counts, classes)[:, None]
    noise = tf.where(valid, noise, -1.0)
    picks = tf.math.top_k(noise, self._shots + self._queries).indices
    picks = (
      tf.cast(picks, tf.int64) + tf.gather(self._offsets, classes)[:, None]
    )
    return tf.gather(self._images, picks)

  def _rotated(self, examples, class_key):
    """`examples`, each class turned by its own random multiple of 90 deg."""
    # Its own key, folded from the class key, so that the classes and
    # examples drawn are those of the unrotated episode.
    rotation_key = tf.random.experimental.stateless_fold_in(
      class_key, 1, alg=_RNG_ALG
    )
    turns = tf.random.stateless_uniform(
      [self._ways],
      rotation_key,
      minval=0,
      maxval=4,
      dtype=tf.int32,
      alg=_RNG_ALG,
    )
    # All four rotations of every class, then each class's own:
    # [ways, 4, shots + queries, H, H, C] -> [ways, shots + queries,
    # H, H, C]. Counter-clockwise, as `ClassSet.with_rotations`.
    flat = tf.reshape(examples, [-1, *self._example_shape])
    rotations = tf.stack(
      [tf.reshape(tf.image.rot90(flat, k), examples.shape) for k in range(4)],
      axis=1,
    )
    return tf.gather(rotations, turns, batch_dims=1)

  def _distorted(self, support, query, example_key):
    """(support, query), each image through its own random affine map."""
    distortion_key = tf.random.experimental.stateless_fold_in(
      example_key, _DISTORTION_FOLD, alg=_RNG_ALG
    )
    count = self._ways * self._shots
    both = affine_transform_images(
      tf.concat([support, query], 0),
      _random_affine_parameters(
        distortion_key,
        self._ways * (self._shots + self._queries),
        self._distortion,
      ),
    )
    return both[:count], both[count:]


def _stream(
  class_set,
  *,
  ways,
  shots,
  queries,
  seed,
  batch_size,
  start_batch,
  replica_ids,
  num_replicas,
  class_sampling,
  distortion,
):
  """Meta-batch slices of `replica_ids`, in order, from `start_batch` on.

  For each global meta-batch j = start_batch, start_batch + 1, ..., yields
  one batch of B/R episodes for each replica r in `replica_ids`: episodes
  j*B + r*B/R .. j*B + (r+1)*B/R - 1.
  """
  ways, shots, queries = check_episode_args(
    class_set, ways, shots, queries, class_sampling
  )
  if distortion is not None and distortion.active:
    class_set.check_square_images("distortion")
  batch_size = _validation.integer("batch_size", batch_size, 1)
  num_replicas = _validation.integer("num_replicas", num_replicas, 1)
  start_batch = _validation.integer("start_batch", start_batch, 0)
  if batch_size % num_replicas:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by num_replicas={num_replicas}"
    )
  per_replica = batch_size // num_replicas
  for r in replica_ids:
    if not 0 <= r < num_replicas:
      raise ValueError(
        f"replica_id={r} is not in [0, num_replicas={num_replicas})"
      )
  # Positions, within a global meta-batch, of the episodes these replicas
  # take, in the order they are yielded.
  within = tf.constant(
    [r * per_replica + t for r in replica_ids for t in range(per_replica)],
    tf.int64,
  )
  indices = (
    tf.data.Dataset.counter(start_batch)
    .map(lambda j: j * batch_size + within)
    .unbatch()
  )
  episode = _EpisodeDrawer(
    class_set,
    ways,
    shots,
    queries,
    seed,
    class_sampling=class_sampling,
    distortion=distortion,
  )
  return without_autotune_thread(
    indices.map(
      episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    .batch(per_replica, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
  )


def meta_batches(
  class_set: ClassSet,
  *,
  ways: int,
  shots: int,
  queries: int,
  batch_size: int,
  seed: int,
  start_batch: int = 0,
  replica_id: int = 0,
  num_replicas: int = 1,
  class_sampling: str = "uniform",
  distortion: AffineDistortion | None = None,
) -> tf.data.Dataset:
  """An endless stream of meta-batches of episodes.

  Meta-batch j holds episodes j*B .. j*B + B - 1 (B = `batch_size`), and
  episode i depends only on (`seed`, i). Starting at `start_batch=k` gives
  exactly what skipping k meta-batches of the stream from 0 gives, so a
  run resumed at step k sees the batches an uninterrupted run sees.

  With `num_replicas=R`, the stream holds only replica `replica_id`'s part
  of every global meta-batch: its B/R episodes j*B + r*B/R ..
  j*B + (r+1)*B/R - 1. The R replica streams together hold each episode of
  the single-replica stream exactly once.

  Args:
      class_set: a ClassSet (e.g. `load_splits(...).train`).
      ways: classes per episode (N).
      shots: support examples per class (k).
      queries: query examples per class (q).
      batch_size: episodes per global meta-batch (B), divisible by
          `num_replicas`.
      seed: integer seed of the stream.
      start_batch: index of the first global meta-batch.
      replica_id: which replica's slice to yield, in [0, num_replicas).
      num_replicas: number of replicas sharing each global meta-batch.
      class_sampling: how an episode's classes are drawn, one of
          CLASS_SAMPLING ("within_alphabet": all from one alphabet).
      distortion: None or an AffineDistortion applied to every image.

  Returns:
      An infinite tf.data.Dataset of dicts (b = B / num_replicas; examples
      are [H, W, C] images in [0, 1], or [d] feature vectors):
          "support_images": float32 [b, N*k, *example_shape],
          "support_labels": int32 [b, N*k], in [0, N),
          "query_images": float32 [b, N*q, *example_shape],
          "query_labels": int32 [b, N*q], in [0, N).
      Examples are class-major: label n's support examples are rows
      n*k .. n*k + k - 1 (queries likewise); which class gets label n is
      random. Support and query examples of an episode are distinct.

  Raises:
      ValueError: on arguments the class set cannot serve (see
          `check_episode_args`) or inconsistent batch and replica arguments.
  """
  return _stream(
    class_set,
    ways=ways,
    shots=shots,
    queries=queries,
    seed=seed,
    batch_size=batch_size,
    start_batch=start_batch,
    replica_ids=[replica_id],
    num_replicas=num_replicas,
    class_sampling=class_sampling,
    distortion=distortion,
  )


def distributed_meta_batches(
  input_context: tf.distribute.InputContext,
  class_set: ClassSet,
  *,
  ways: int,
  shots: int,
  queries: int,
  global_batch_size: int,
  seed: int,
  start_batch: int = 0,
  class_sampling: str = "uniform",
  distortion: AffineDistortion | None = None,
) -> tf.data.Dataset:
  """One worker's meta-batches, for `distribute_datasets_from_function`.

  Worker p of P (`input_context.input_pipeline_id`) with L = R/P local
  replicas runs replicas p*L .. p*L + L - 1 of R
  (`input_context.num_replicas_in_sync`). The strategy hands the
  elements of the worker's dataset to its local replicas in turn, so this
  dataset yields, for each global meta-batch j, the slice of replica p*L,
  then p*L + 1, ..., each as `meta_batches(..., replica_id=r,
  num_replicas=R)` would.

  Args:
      input_context: the tf.distribute.InputContext the strategy passes.
      class_set: a ClassSet.
      ways: classes per episode (N).
      shots: support examples per class (k).
      queries: query examples per class (q).
      global_batch_size: episodes per global meta-batch (B), divisible by R.
      seed: integer seed of the stream.
      start_batch: index of the first global meta-batch.
      class_sampling, distortion: as in `meta_batches`.

  Returns:
      An infinite tf.data.Dataset of per-replica meta-batches of B/R
      episodes, in the format of `meta_batches`.
  """
  num_replicas = input_context.num_replicas_in_sync
  local = num_replicas // input_context.num_input_pipelines
  first = input_context.input_pipeline_id * local
  return _stream(
    class_set,
    ways=ways,
    shots=shots,
    queries=queries,
    seed=seed,
    batch_size=global_batch_size,
    start_batch=start_batch,
    replica_ids=range(first, first + local),
    num_replicas=num_replicas,
    class_sampling=class_sampling,
    distortion=distortion,
  )


def eval_episodes(
  class_set: ClassSet,
  *,
  ways: int,
  shots: int,
  queries: int,
  seed: int,
  num_episodes: int = 1000,
  rotate_classes: bool = False,
  class_sampling: str = "uniform",
) -> tf.data.Dataset:
  """A fixed, finite set of evaluation episodes.

  Episode i is episode i of the stream with `seed` (the same function of
  (seed, i) as in `meta_batches`), so the set is identical across runs and
  machines.

  With `rotate_classes`, each class of an episode is rotated by its own
  random multiple of 90 degrees, support and queries alike, as the code of
  MAML (Finn et al. 2017) rotates its Omniglot test classes. The classes,
  labels and examples stay those of the unrotated episode.

  Args:
      class_set: a ClassSet (e.g. `load_splits(...).test`).
      ways: classes per episode (N).
      shots: support examples per class (k).
      queries: query examples per class (q).
      seed: integer seed.
      num_episodes: number of episodes.
      rotate_classes: bool, rotate each class by a random multiple of 90
          degrees (square images only).
      class_sampling: how an episode's classes are drawn, one of
          CLASS_SAMPLING ("within_alphabet": all from one alphabet, as
          Lake et al.'s one-shot trials).

  Returns:
      A tf.data.Dataset of `num_episodes` single episodes, unbatched:
          "support_images": float32 [N*k, *example_shape],
          "support_labels": int32 [N*k],
          "query_images": float32 [N*q, *example_shape],
          "query_labels": int32 [N*q].
      `.batch(b)` gives elements in the format of `meta_batches`.

  Raises:
      ValueError: on arguments the class set cannot serve (`rotate_classes`
          with examples that are not square images).
  """
  ways, shots, queries = check_episode_args(
    class_set, ways, shots, queries, class_sampling
  )
  num_episodes = _validation.integer("num_episodes", num_episodes, 1)
  if rotate_classes:
    class_set.check_square_images("rotate_classes")
  episode = _EpisodeDrawer(
    class_set, ways, shots, queries, seed, rotate_classes, class_sampling
  )
  return without_autotune_thread(
    tf.data.Dataset.range(num_episodes).map(
      episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
  )
