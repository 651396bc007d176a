"""Data sources: where the train, validation and test classes come from.

Each source is a function `(data_dir, image_size, **options) -> Splits`,
registered by name in `_SOURCES`.
"""

import codecs
import functools
import hashlib
import itertools
import logging
import os
import pathlib
import pickle
from typing import Any
import zipfile

import numpy as np
import tensorflow as tf

from comln_tf import _validation
from comln_tf.data._classes import ClassSet
from comln_tf.data._classes import Splits
from comln_tf.data._pipeline import without_autotune_thread

# Background alphabets held out of meta-training for validation (30 - 5 = 25
# alphabets remain for training). Any fixed choice works; these five have
# 189 characters between them, enough for 20-way validation episodes.
OMNIGLOT_VALIDATION_ALPHABETS = (
  "Bengali",
  "Futurama",
  "Hebrew",
  "Korean",
  "Tifinagh",
)

# Class counts of "omniglot_characters" (train, validation, test): those of
# Vinyals et al. (2016)'s character split as Snell et al. (2017) distribute it
# (1,200 training characters, of which 172 validate, and 423 test).
OMNIGLOT_CHARACTER_SPLIT = (1028, 172, 423)

# Seed of the shuffle that assigns characters to the "omniglot_characters"
# splits; fixed, so every run and machine has the same split.
_OMNIGLOT_CHARACTER_SEED = 0

# Vinyals et al. (2016)'s split, as the list files of Snell et al. (2017)
# give it (data/omniglot/splits/vinyals/{val,test}.txt): validation is five
# background alphabets (172 characters); test is twelve evaluation alphabets
# and the last four Gurmukhi characters (423: character42-45 in Omniglot's
# folders, "Gurmukhi_41".."Gurmukhi_44" in TFDS's 0-based names); training
# is the other 1,028 characters.
VINYALS_VALIDATION_ALPHABETS = (
  "Armenian",
  "Bengali",
  "Early_Aramaic",
  "Hebrew",
  "Mkhedruli_(Georgian)",
)
VINYALS_TEST_ALPHABETS = (
  "Kannada",
  "Keble",
  "Malayalam",
  "Manipuri",
  "Mongolian",
  "Old_Church_Slavonic_(Cyrillic)",
  "Oriya",
  "Sylheti",
  "Syriac_(Serto)",
  "Tengwar",
  "Tibetan",
  "ULOG",
)
_VINYALS_TEST_CHARACTERS = tuple(f"Gurmukhi_{i}" for i in range(41, 45))

# Version of the TFDS omniglot dataset; part of the cache file name.
_OMNIGLOT_VERSION = "3.0.0"

# (examples, classes) of that version's splits (dataset_info.json): a cache
# holding other counts is damaged.
_OMNIGLOT_COUNTS = {"train": (19280, 964), "test": (13180, 659)}

_DEFAULT_CACHE_DIR = "~/.cache/comln_tf"

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# (split name in Splits, file-name prefix the published formats use).
_SPLIT_PREFIXES = (("train", "train"), ("validation", "val"), ("test", "test"))

# MetaOptNet's miniImageNet pickles (from Gidaris & Komodakis): each a dict
# with "data" (uint8 [n, 84, 84, 3]) and "labels" (n ints, unique across the
# three files). The "train_phase_val/test" files hold other images of the
# train classes and are not needed for few-shot episodes.
_MINI_IMAGENET_FILES = {
  "train": "miniImageNet_category_split_train_phase_train.pickle",
  "validation": "miniImageNet_category_split_val.pickle",
  "test": "miniImageNet_category_split_test.pickle",
}

# MetaOptNet's tieredImageNet: "<prefix>_images.npz" with "images"
# (uint8 [n, 84, 84, 3]) and "<prefix>_labels.pkl", a dict with "labels".
_TIERED_IMAGENET_FILES = {
  split: (f"{prefix}_images.npz", f"{prefix}_labels.pkl")
  for split, prefix in _SPLIT_PREFIXES
}


def _require_dir(data_dir, name, layout):
  """Returns `data_dir` as an existing directory, or raises ValueError."""
  if data_dir is None:
    raise ValueError(
      f"dataset '{name}' needs a data directory: pass data_dir "
      f"(argument `data_dir`), the folder holding {layout}"
    )
  path = pathlib.Path(data_dir).expanduser()
  if not path.is_dir():
    raise ValueError(
      f"data directory {str(path)!r} of dataset '{name}' (argument "
      f"`data_dir`) does not exist or is not a directory"
    )
  return path


def _resize_uint8(image, size):
  """uint8 [H, W, C] -> uint8 [size, size, C], antialiased (area-like)."""
  image = tf.image.resize(
    image, [size, size], method="bilinear", antialias=True
  )
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _collect(dataset, fn):
  """Maps `fn` over `dataset` in parallel and stacks the results.

  Args:
      dataset: a tf.data.Dataset.
      fn: element -> tuple of tensors.

  Returns:
      A tuple of numpy arrays, the stacked outputs of `fn`, in order.
  """
  parts = without_autotune_thread(
    dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    .batch(1024)
    .prefetch(tf.data.AUTOTUNE)
  ).as_numpy_iterator()
  return tuple(np.concatenate(column) for column in zip(*parts))


class _NdarrayName:
  """What a data pickle's `numpy.ndarray` resolves to: a name, not a class.

  numpy pickles pass the class to `_reconstruct` only, which maps it back
  (`_empty_array_reconstruct`). Called directly, ndarray(shape) would
  allocate any size the pickle asks for.
  """

  def __call__(self, *args, **kwargs):
    raise pickle.UnpicklingError(
      "it calls numpy.ndarray directly; numpy pickles rebuild arrays "
      "with numpy.core.multiarray._reconstruct only"
    )


_NDARRAY = _NdarrayName()


def _empty_array_reconstruct(reconstruct):
  """numpy's `_reconstruct`, for an empty ndarray only.

  numpy pickles rebuild an array as `_reconstruct(ndarray, (0,), b"b")`,
  then fill it from data in the file (`__setstate__` checks that the data
  is as large as the shape says). A larger shape here would allocate
  memory that no data in the file backs.
  """

  def checked(subtype, shape, dtype):
    if subtype is not _NDARRAY:
      raise pickle.UnpicklingError(
        f"it rebuilds an array of type {subtype!r}; data pickles may only "
        f"hold numpy.ndarray"
      )
    if (
      not isinstance(shape, tuple)
      or not all(isinstance(size, int) and size >= 0 for size in shape)
      or 0 not in shape
    ):
      raise pickle.UnpicklingError(
        f"it asks numpy's _reconstruct for an array of shape {shape!r}; "
        f"numpy pickles ask for an empty one, then fill it from the file"
      )
    return reconstruct(np.ndarray, shape, dtype)

  return checked


def _bytearray(source=b"", encoding=None, errors=None):
  """bytearray(source) of bytes or a string, never of a size.

  bytearray(n) allocates n bytes that no data in the file backs (a pickle
  of a few bytes could ask for gigabytes); pickles of a bytearray hold its
  content.
  """
  if not isinstance(source, (bytes, bytearray, str)):
    raise pickle.UnpicklingError(
      f"it calls bytearray with a {type(source).__name__}; pickles of a "
      f"bytearray hold its content (bytes or a string)"
    )
  if encoding is None:
    return bytearray(source)
  return bytearray(source, encoding, *(() if errors is None else (errors,)))


def _numpy_internals():
  """numpy's pickle helpers, under both of their module names.

  numpy 2 writes `numpy._core.*`; numpy 1 and Python 2 pickles name
  `numpy.core.*`. Both names resolve to the same functions here, looked up
  once (not imported from the pickle's text).
  """
  try:
    from numpy._core import multiarray
    from numpy._core import numeric
  except ImportError:  # numpy 1
    from numpy.core import multiarray
    from numpy.core import numeric
  functions = {
    "_reconstruct": _empty_array_reconstruct(multiarray._reconstruct),
    "scalar": multiarray.scalar,
  }
  allowed = {}
  for package in ("numpy.core", "numpy._core"):
    for name, function in functions.items():
      allowed[(f"{package}.multiarray", name)] = function
    allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
  return allowed


# What a data pickle may construct: numpy arrays, dtypes and scalars, and
# plain containers (dicts, lists, tuples, strings, numbers are pickle
# opcodes, not globals). `_codecs.encode` is how protocol 2 writes bytes;
# Python 2 pickles name the builtins module `__builtin__`. None allocates
# more than the data in the file: an array's or bytearray's content is in
# the file (`_empty_array_reconstruct`, `_bytearray`).
_PICKLE_GLOBALS = {
  ("numpy", "ndarray"): _NDARRAY,
  ("numpy", "dtype"): np.dtype,
  ("_codecs", "encode"): codecs.encode,
  **{
    (module, name): function
    for module in ("builtins", "__builtin__")
    for name, function in (
      ("bytearray", _bytearray),
      ("set", set),
      ("frozenset", frozenset),
      ("complex", complex),
    )
  },
  **_numpy_internals(),
}


class _ArrayUnpickler(pickle.Unpickler):
  """An unpickler that builds numpy arrays and plain containers only.

  A pickle names the functions it calls to rebuild its objects; an
  unrestricted `pickle.load` calls whatever it names (e.g. `os.system`).
  This one resolves only the names of `_PICKLE_GLOBALS` and refuses any
  other before anything is called.
  """

  def find_class(self, module, name):
    try:
      return _PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
        f"it refers to {module}.{name}; data pickles may only hold "
        f"numpy arrays, dtypes and scalars in dicts, lists and "
        f"tuples of strings and numbers"
      ) from None


def _read_pickle(path, keys):
  """Loads a dict pickle (Python 2 or 3) that must hold `keys`.

  Only numpy arrays and plain containers are rebuilt (`_ArrayUnpickler`):
  a data file cannot run code.

  Raises:
      ValueError: naming `path`: the file is not a pickle of that kind,
          or is not a dict holding `keys`.
  """
  with open(path, "rb") as f:
    try:
      # Python 2 pickles of numpy arrays only load with latin1.
      data = _ArrayUnpickler(f, encoding="latin1").load()
    except (
      pickle.UnpicklingError,
      EOFError,
      ValueError,
      TypeError,
      AttributeError,
      IndexError,
    ) as error:
      raise ValueError(
        f"{path} is not a pickle of numpy arrays and plain "
        f"containers, refused: {error}"
      ) from error
  missing = [
    key for key in keys if not isinstance(data, dict) or key not in data
  ]
  if missing:
    raise ValueError(
      f"{path} is not in the expected format: a dict with entries "
      f"{list(keys)}; missing {missing}"
    )
  return data


# The .npz cache of decoded Omniglot: one array per (TFDS split, field).
_OMNIGLOT_SPLITS = ("train", "test")
_OMNIGLOT_FIELDS = ("images", "classes", "alphabets")


@functools.cache
def _omniglot_arrays(data_dir, image_size, cache_dir):
  """Decoded Omniglot, cached in-process and in `cache_dir`.

  Args:
      data_dir: TFDS data directory, or None for TFDS's default.
      image_size: side of the resized images.
      cache_dir: folder of the .npz cache.

  Returns:
      {"train" | "test": (images uint8 [n, size, size, 1], class names [n],
      alphabet names [n])} for the TFDS splits (background / evaluation).
  """
  # Keyed by the source: another data directory never reads this copy.
  source = _omniglot_source(data_dir)
  cache_file = pathlib.Path(cache_dir) / (
    f"omniglot-{_OMNIGLOT_VERSION}-{image_size}px-"
    f"{hashlib.sha256(source.encode()).hexdigest()[:12]}.npz"
  )
  if cache_file.is_file():
    arrays = _read_omniglot_cache(cache_file, image_size, source)
    if arrays is not None:
      return arrays
  arrays = _decode_omniglot(data_dir, image_size)
  _write_omniglot_cache(cache_file, arrays)
  return arrays


def _read_omniglot_cache(cache_file, image_size, source):
  """The arrays of `_omniglot_arrays` from `cache_file`, or None if damaged.

  A damaged cache (unreadable, or failing `_omniglot_cache_problem`) is
  logged as a warning naming the problem and `source`, the data it is
  rebuilt from.
  """
  try:
    with np.load(cache_file) as cached:
      arrays = {
        split: tuple(cached[f"{split}_{field}"] for field in _OMNIGLOT_FIELDS)
        for split in _OMNIGLOT_SPLITS
      }
    problem = _omniglot_cache_problem(arrays, image_size)
  except (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
  ) as error:
    problem = f"unreadable ({type(error).__name__}: {error})"
  if problem is None:
    return arrays
  logging.warning(
    "The Omniglot cache %s is damaged (%s); rebuilding it from %s.",
    cache_file,
    problem,
    source,
  )
  return None


def _decode_omniglot(data_dir, image_size):
  """The arrays of `_omniglot_arrays`, decoded from TFDS's records."""
  # Imported here: it is slow to import, and only this source needs it.
  import tensorflow_datasets as tfds

  arrays = {}
  for split in _OMNIGLOT_SPLITS:
    # The PNGs are decoded here, to one channel and in parallel batches,
    # rather than by TFDS, which decodes RGB one example at a time.
    dataset, info = tfds.load(
      "omniglot",
      split=split,
      data_dir=data_dir,
      with_info=True,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    images, classes, alphabets = _collect(
      dataset,
      lambda ex: (
        _resize_uint8(tf.io.decode_png(ex["image"], channels=1), image_size),
        ex["label"],
        ex["alphabet"],
      ),
    )
    arrays[split] = (
      images,
      np.array(info.features["label"].names)[classes],
      np.array(info.features["alphabet"].names)[alphabets],
    )
  return arrays


def _write_omniglot_cache(cache_file, arrays):
  """Writes `arrays` to `cache_file`; a failure is logged, not raised."""
  try:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as f:
      np.savez(
        f,
        **{
          f"{split}_{field}": array
          for split in _OMNIGLOT_SPLITS
          for field, array in zip(_OMNIGLOT_FIELDS, arrays[split])
        },
      )
    os.replace(partial, cache_file)
  except OSError as error:
    logging.warning(
      "Could not write the Omniglot cache %s: %s", cache_file, error
    )


def _omniglot_source(data_dir):
  """The TFDS data directory Omniglot is read from, as an absolute path."""
  if data_dir is None:
    # TFDS's own default.
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.realpath(os.path.expanduser(data_dir))


def _omniglot_cache_problem(arrays, image_size):
  """What is wrong with cached Omniglot arrays, or None if they are right.

  Checks the dtypes and shapes, and the example and class counts of TFDS
  omniglot (_OMNIGLOT_COUNTS): a truncated or altered cache would
  otherwise train quietly on wrong data.
  """
  for split, (images, classes, alphabets) in arrays.items():
    num_examples, num_classes = _OMNIGLOT_COUNTS[split]
    if images.dtype != np.uint8 or images.shape != (
      num_examples,
      image_size,
      image_size,
      1,
    ):
      return (
        f"{split} images are {images.dtype} {images.shape}, not "
        f"uint8 {(num_examples, image_size, image_size, 1)}"
      )
    for name, values in (("classes", classes), ("alphabets", alphabets)):
      if values.dtype.kind != "U" or values.shape != (num_examples,):
        return (
          f"{split} {name} are {values.dtype} {values.shape}, "
          f"not {num_examples} strings"
        )
    if len(np.unique(classes)) != num_classes:
      return (
        f"{split} holds {len(np.unique(classes))} classes, not {num_classes}"
      )
    if images.max(initial=0) == 0:
      return f"{split} images are all zero"
  return None


def _omniglot(data_dir, image_size, cache_dir):
  """`_omniglot_arrays` after checking and defaulting the arguments."""
  if data_dir is not None:
    data_dir = str(
      _require_dir(data_dir, "omniglot", "TFDS's prepared 'omniglot' dataset")
    )
    if not (pathlib.Path(data_dir) / "omniglot").is_dir():
      # Else TFDS would try to download into it (and fail offline).
      raise ValueError(
        f"data directory {data_dir!r} of dataset 'omniglot' "
        f"(argument `data_dir`) holds no prepared TFDS 'omniglot' "
        f"dataset (no folder {pathlib.Path(data_dir) / 'omniglot'}); "
        f"pass the TFDS data directory that holds it, or none for "
        f"TFDS's default"
      )
  if cache_dir is None:
    cache_dir = os.environ.get("COMLN_TF_CACHE_DIR", _DEFAULT_CACHE_DIR)
  cache_dir = str(pathlib.Path(cache_dir).expanduser().resolve())
  return _omniglot_arrays(data_dir, image_size or 28, cache_dir)


def _load_omniglot(data_dir, image_size, cache_dir=None):
  """Omniglot from TFDS ("omniglot"), resized to 28x28 by default.

  Meta-train classes are the characters of the background alphabets (TFDS
  `train`) except OMNIGLOT_VALIDATION_ALPHABETS, which make the validation
  classes; meta-test classes are the evaluation alphabets (TFDS `test`).
  Class names are TFDS label names ("<alphabet>_<index>").

  Args:
      data_dir: TFDS data directory (passed to `tfds.load`); None uses
          TFDS's default (`TFDS_DATA_DIR` or ~/tensorflow_datasets), and
          downloads there if the dataset is not prepared.
      image_size: side of the images (default 28).
      cache_dir: folder for the decoded-array cache; default
          `$COMLN_TF_CACHE_DIR`, else ~/.cache/comln_tf.
  """
  arrays = _omniglot(data_dir, image_size, cache_dir)
  images, classes, alphabets = arrays["train"]
  held_out = np.isin(alphabets, OMNIGLOT_VALIDATION_ALPHABETS)
  test_images, test_classes, test_alphabets = arrays["test"]
  return Splits(
    ClassSet.from_labels(
      images[~held_out],
      classes[~held_out],
      dataset="omniglot",
      split="train",
      groups=alphabets[~held_out],
    ),
    ClassSet.from_labels(
      images[held_out],
      classes[held_out],
      dataset="omniglot",
      split="validation",
      groups=alphabets[held_out],
    ),
    ClassSet.from_labels(
      test_images,
      test_classes,
      dataset="omniglot",
      split="test",
      groups=test_alphabets,
    ),
  )


def _omniglot_pooled(data_dir, image_size, cache_dir):
  """All 1,623 Omniglot characters, both TFDS splits pooled.

  Returns:
      (images uint8 [n, size, size, 1], class names [n], alphabet names
      [n]).

  Raises:
      ValueError: TFDS omniglot does not hold the expected characters.
  """
  arrays = _omniglot(data_dir, image_size, cache_dir)
  pooled = tuple(
    np.concatenate([arrays[split][field] for split in ("train", "test")])
    for field in range(3)
  )
  found = len(np.unique(pooled[1]))
  if found != sum(OMNIGLOT_CHARACTER_SPLIT):
    raise ValueError(
      f"Omniglot split by character expects "
      f"{sum(OMNIGLOT_CHARACTER_SPLIT)} characters in TFDS omniglot; "
      f"found {found}"
    )
  return pooled


def _character_splits(images, classes, alphabets, is_split, dataset):
  """Splits of pooled Omniglot from boolean masks over the examples.

  Args:
      images, classes, alphabets: pooled examples, their class names and
          their alphabets ([n]).
      is_split: (train, validation, test) boolean masks [n], disjoint.
      dataset: name recorded in the ClassSets.
  """
  return Splits(
    *(
      ClassSet.from_labels(
        images[mask],
        classes[mask],
        dataset=dataset,
        split=split,
        groups=alphabets[mask],
      )
      for split, mask in zip(("train", "validation", "test"), is_split)
    )
  )


def _load_omniglot_characters(data_dir, image_size, cache_dir=None):
  """Omniglot split by character, in the way of MAML (a random draw).

  The 1,623 characters of both TFDS splits are pooled and shuffled with a
  fixed seed; OMNIGLOT_CHARACTER_SPLIT gives how many go to train,
  validation and test (the sizes of Vinyals' split). As in MAML's code,
  which shuffles the character folders with a fixed seed, a test
  character's alphabet usually has characters in training too, which
  makes the test easier than "omniglot" and "omniglot_vinyals".

  Args: as `_load_omniglot`.
  """
  images, classes, alphabets = _omniglot_pooled(data_dir, image_size, cache_dir)
  names = np.unique(classes)
  shuffled = names[
    np.random.default_rng(_OMNIGLOT_CHARACTER_SEED).permutation(len(names))
  ]
  ends = np.cumsum(OMNIGLOT_CHARACTER_SPLIT)
  return _character_splits(
    images,
    classes,
    alphabets,
    [
      np.isin(classes, shuffled[start:end])
      for start, end in zip(ends - OMNIGLOT_CHARACTER_SPLIT, ends)
    ],
    "omniglot_characters",
  )


def _load_omniglot_vinyals(data_dir, image_size, cache_dir=None):
  """Omniglot in Vinyals et al. (2016)'s split (Prototypical Networks').

  Validation: VINYALS_VALIDATION_ALPHABETS; test: VINYALS_TEST_ALPHABETS
  and Gurmukhi's last four characters; train: the rest (1,028 / 172 / 423
  characters, OMNIGLOT_CHARACTER_SPLIT). The test is almost an alphabet
  split: only Gurmukhi has characters on both sides.

  Args: as `_load_omniglot`.
  """
  images, classes, alphabets = _omniglot_pooled(data_dir, image_size, cache_dir)
  test = np.isin(alphabets, VINYALS_TEST_ALPHABETS) | np.isin(
    classes, _VINYALS_TEST_CHARACTERS
  )
  validation = np.isin(alphabets, VINYALS_VALIDATION_ALPHABETS)
  return _character_splits(
    images,
    classes,
    alphabets,
    [~(test | validation), validation, test],
    "omniglot_vinyals",
  )


def _load_image_folder(data_dir, image_size, channels=3):
  """Class-per-folder images: `data_dir/<split>/<class name>/<image>`.

  Splits are the folders `train`, `val` and `test`; images are .png, .jpg
  or .jpeg files (any case), read in sorted order, resized to
  `image_size` x `image_size` (default 84) with `channels` channels (1 or 3).
  Class names are the folder names.
  """
  root = _require_dir(
    data_dir,
    "image_folder",
    "train/, val/ and test/, each with one folder of images per class",
  )
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  size = image_size or 84
  sets = []
  for split, folder in _SPLIT_PREFIXES:
    split_dir = root / folder
    if not split_dir.is_dir():
      raise ValueError(
        f"dataset 'image_folder' needs the split folder {split_dir} "
        f"(data_dir={str(root)!r})"
      )
    files = sorted(
      path
      for path in split_dir.glob("*/*")
      if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file()
    )
    if not files:
      raise ValueError(
        f"no {'/'.join(_IMAGE_SUFFIXES)} images in class folders "
        f"under {split_dir}"
      )
    (images,) = _collect(
      tf.data.Dataset.from_tensor_slices([str(path) for path in files]),
      lambda path: (
        _resize_uint8(
          tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
          ),
          size,
        ),
      ),
    )
    sets.append(
      ClassSet.from_labels(
        images,
        [path.parent.name for path in files],
        dataset="image_folder",
        split=split,
      )
    )
  return Splits(*sets)


def _load_metaoptnet_pickle(data_dir, image_size):
  """miniImageNet or tieredImageNet in the files of MetaOptNet (Lee et al.).

  `data_dir` holds either the three miniImageNet pickles of
  `_MINI_IMAGENET_FILES` or the tieredImageNet files of
  `_TIERED_IMAGENET_FILES`. Images are 84x84 RGB; they are resized only if
  `image_size` is given and differs. Class names are the integer labels.
  """
  root = _require_dir(
    data_dir,
    "metaoptnet_pickle",
    "MetaOptNet's miniImageNet pickles or tieredImageNet .npz/.pkl files",
  )
  if all((root / name).is_file() for name in _MINI_IMAGENET_FILES.values()):
    variant = "miniImageNet"

    def read(split):
      data = _read_pickle(
        root / _MINI_IMAGENET_FILES[split], ("data", "labels")
      )
      return data["data"], data["labels"]
  elif all(
    (root / name).is_file()
    for names in _TIERED_IMAGENET_FILES.values()
    for name in names
  ):
    variant = "tieredImageNet"

    def read(split):
      images_file, labels_file = _TIERED_IMAGENET_FILES[split]
      with np.load(root / images_file) as images:
        return (
          images["images"],
          _read_pickle(root / labels_file, ("labels",))["labels"],
        )
  else:
    tiered_files = sorted(itertools.chain(*_TIERED_IMAGENET_FILES.values()))
    raise ValueError(
      f"data_dir {str(root)!r} (argument `data_dir`) holds neither "
      f"MetaOptNet's miniImageNet files "
      f"{sorted(_MINI_IMAGENET_FILES.values())} nor its tieredImageNet "
      f"files {tiered_files}"
    )

  sets = []
  for split, _ in _SPLIT_PREFIXES:
    images, labels = read(split)
    images = np.asarray(images, np.uint8)
    if image_size is not None and images.shape[1:3] != (image_size,) * 2:
      (images,) = _collect(
        tf.data.Dataset.from_tensor_slices(images),
        lambda image: (_resize_uint8(image, image_size),),
      )
    sets.append(
      ClassSet.from_labels(
        images, labels, dataset=f"metaoptnet_pickle ({variant})", split=split
      )
    )
  return Splits(*sets)


def _load_embeddings(data_dir, image_size):
  """Precomputed features in the pickles of LEO (Rusu et al. 2019).

  `data_dir` is one folder of LEO's embeddings (e.g.
  `embeddings/miniImageNet/center`) holding `train_embeddings.pkl`,
  `val_embeddings.pkl` and `test_embeddings.pkl`: dicts with "embeddings"
  (float [n, d]) and "keys" (n strings or bytes "<id>-<class>-<image>").
  The class is the middle field of the key, as in LEO's data.py. Features
  are used as they are (not normalised); `image_size` is ignored.
  """
  del image_size  # Features have no image size.
  root = _require_dir(
    data_dir, "embeddings", "LEO's {train,val,test}_embeddings.pkl"
  )
  sets = []
  for split, prefix in _SPLIT_PREFIXES:
    path = root / f"{prefix}_embeddings.pkl"
    if not path.is_file():
      raise ValueError(
        f"dataset 'embeddings' needs {path} (data_dir={str(root)!r})"
      )
    data = _read_pickle(path, ("embeddings", "keys"))
    keys = [
      key.decode() if isinstance(key, bytes) else str(key)
      for key in data["keys"]
    ]
    malformed = [key for key in keys if key.count("-") != 2]
    if malformed:
      raise ValueError(
        f"{path}: key {malformed[0]!r} is not of LEO's "
        f"form '<id>-<class>-<image>'"
      )
    sets.append(
      ClassSet.from_labels(
        np.asarray(data["embeddings"], np.float32),
        [key.split("-")[1] for key in keys],
        dataset="embeddings",
        split=split,
      )
    )
  return Splits(*sets)


_SOURCES = {
  "embeddings": _load_embeddings,
  "image_folder": _load_image_folder,
  "metaoptnet_pickle": _load_metaoptnet_pickle,
  "omniglot": _load_omniglot,
  "omniglot_characters": _load_omniglot_characters,
  "omniglot_vinyals": _load_omniglot_vinyals,
}


def available_sources() -> tuple[str, ...]:
  """Names of the data sources `load_splits` knows, sorted."""
  return tuple(sorted(_SOURCES))


def load_splits(
  name: str = "omniglot",
  data_dir: str | None = None,
  image_size: int | None = None,
  *,
  rotations: bool = False,
  train_on_validation: bool = False,
  **options: Any,
) -> Splits:
  """Loads the disjoint train, validation and test classes of a dataset.

  Sources (see each `_load_<name>` for its layout and options):
      "omniglot": TFDS omniglot; background alphabets for train, minus
          OMNIGLOT_VALIDATION_ALPHABETS for validation; evaluation
          alphabets for test; 28x28x1. Option `cache_dir`.
      "omniglot_characters": the same images split by character
          (OMNIGLOT_CHARACTER_SPLIT: 1,028 / 172 / 423 characters drawn
          from all alphabets, a fixed shuffle), as MAML's code splits
          them. Option `cache_dir`.
      "omniglot_vinyals": the same images in Vinyals et al.'s split,
          as Prototypical Networks distribute it (1,028 / 172 / 423
          characters; test: VINYALS_TEST_ALPHABETS and four Gurmukhi
          characters). Option `cache_dir`.
      "image_folder": `data_dir/{train,val,test}/<class>/*.png|jpg|jpeg`,
          resized (default 84). Option `channels` (1 or 3, default 3).
      "metaoptnet_pickle": MetaOptNet's miniImageNet pickles or
          tieredImageNet .npz/.pkl files in `data_dir`; 84x84x3.
      "embeddings": LEO's `{train,val,test}_embeddings.pkl` in `data_dir`;
          float32 feature vectors, for an identity backbone.

  Args:
      name: source name, one of `available_sources()`.
      data_dir: where the source's files are (optional for omniglot).
      image_size: side of the square images; None for the source's
          default. Ignored by "embeddings".
      rotations: add 90/180/270-degree rotations of each train class as
          new classes (4x train classes; validation and test unchanged).
      train_on_validation: train on the train and validation classes
          together, the final training of Prototypical Networks (Snell et
          al. 2017); the validation split stays, but its classes are then
          training classes too. Rotations, if any, apply to both.
      **options: source-specific options.

  Returns:
      Splits(train, validation, test) of ClassSets with uint8 images
      [n, H, W, C] (or float32 features [n, d]).

  Raises:
      ValueError: unknown `name`, missing `data_dir`, files not in the
          source's format, or classes shared between splits.
  """
  if name not in _SOURCES:
    raise ValueError(
      f"unknown dataset {name!r} (argument `name`); known "
      f"datasets: {', '.join(available_sources())}"
    )
  image_size = _validation.integer("image_size", image_size, 1, optional=True)
  splits = _SOURCES[name](data_dir, image_size, **options)
  for a, b in itertools.combinations(splits, 2):
    shared = sorted(set(a.class_names) & set(b.class_names))
    if shared:
      raise ValueError(
        f"{len(shared)} classes of dataset '{name}' (e.g. "
        f"{shared[:3]}) are in both the {a.split} and {b.split} "
        f"splits; splits need disjoint classes"
      )
  if train_on_validation:
    splits = splits._replace(
      train=splits.train.merged_with(splits.validation, "train")
    )
  if rotations:
    splits = splits._replace(train=splits.train.with_rotations())
  return splits
