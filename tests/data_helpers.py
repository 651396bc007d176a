"""Helpers of the comln_tf.data tests: small class sets and episode reads."""

import numpy as np
import tensorflow as tf

from comln_tf import data
from comln_tf.data import _sources

# Small episodes keep every pipeline of the tests cheap.
WAYS, SHOTS, QUERIES, BATCH = 5, 1, 2, 4


def fresh_omniglot(cache_dir):
  """Omniglot's splits decoded afresh, which writes the cache in `cache_dir`.

  The in-process cache is cleared first, so TFDS's records are decoded and
  the .npz cache written.
  """
  _sources._omniglot_arrays.cache_clear()  # pylint: disable=protected-access
  return data.load_splits("omniglot", cache_dir=cache_dir)


def take(dataset, n):
  """The first `n` elements of `dataset`, as numpy."""
  return list(dataset.take(n).as_numpy_iterator())


def assert_equal_elements(a, b):
  """Two lists of episode dicts hold equal arrays under equal keys."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def index_set(counts, split="train"):
  """A class set whose 1-d "features" are the examples' own indices."""
  labels = np.repeat(np.arange(len(counts)), counts)
  features = np.arange(len(labels), dtype=np.float32)[:, None]
  return data.ClassSet.from_labels(
    features, labels, dataset="indices", split=split
  )


def indices(images):
  """int64 [n]: the example indices of `index_set` features [n, 1]."""
  return images[..., 0].astype(np.int64)


def alphabet(class_name):
  """The alphabet of a TFDS omniglot label name."""
  # TFDS omniglot label names are "<alphabet>_<character index>".
  return class_name.rsplit("_", 1)[0]


def write_image(path, value, shape):
  """Writes a PNG (a JPEG for a .jpg suffix) of `shape` filled with `value`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = tf.fill(shape, tf.constant(value, tf.uint8))
  encode = (
    tf.io.encode_jpeg if path.suffix.lower() == ".jpg" else tf.io.encode_png
  )
  tf.io.write_file(str(path), encode(image))
