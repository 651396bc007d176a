"""Tests of comln_tf/data/_sources.py: Omniglot, its cache, image folders."""

import hashlib
import os
import re
import shutil

import numpy as np
import pytest

from comln_tf import data
from comln_tf.data import _sources
from data_helpers import alphabet
from data_helpers import fresh_omniglot
from data_helpers import take
from data_helpers import write_image


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def omniglot(cache_dir):
  # Decoded afresh, which also writes the .npz cache that
  # test_omniglot_cache_is_used reads.
  return fresh_omniglot(cache_dir)


def test_omniglot_splits_are_disjoint_by_alphabet(omniglot):
  alphabets = [
    {alphabet(name) for name in split.class_names} for split in omniglot
  ]
  train, validation, test = alphabets
  assert validation == set(data.OMNIGLOT_VALIDATION_ALPHABETS)
  assert (len(train), len(validation), len(test)) == (25, 5, 20)
  assert not (train & validation or train & test or validation & test)
  assert omniglot.train.num_classes + omniglot.validation.num_classes == 964
  assert omniglot.test.num_classes == 659
  for split in omniglot:
    assert split.images.dtype == np.uint8
    assert split.example_shape == (28, 28, 1)
    assert np.all(split.counts == 20)
    assert split.images.min() == 0 and split.images.max() == 255


def _assert_same_characters(splits, omniglot, dataset):
  """Every character of `omniglot` once in `splits`, with its images."""
  by_name = {
    name: split.class_examples(c)
    for split in omniglot
    for c, name in enumerate(split.class_names)
  }
  names = [name for split in splits for name in split.class_names]
  assert sorted(names) == sorted(by_name)
  for split in splits:
    assert split.dataset == dataset
    for c, name in enumerate(split.class_names):
      np.testing.assert_array_equal(split.class_examples(c), by_name[name])


def test_omniglot_character_split(omniglot, cache_dir):
  characters = data.load_splits("omniglot_characters", cache_dir=cache_dir)
  assert (
    tuple(split.num_classes for split in characters)
    == (data.OMNIGLOT_CHARACTER_SPLIT)
    == (1028, 172, 423)
  )
  _assert_same_characters(characters, omniglot, "omniglot_characters")
  # The protocol's point: test characters share alphabets with training
  # characters, and come from background and evaluation alphabets alike.
  train = {alphabet(name) for name in characters.train.class_names}
  test = {alphabet(name) for name in characters.test.class_names}
  assert len(train & test) == 50
  assert len(test & {alphabet(n) for n in omniglot.test.class_names}) == 20
  # The split is fixed (seeded shuffle): these names on every machine.
  assert characters.test.class_names[:3] == (
    "Alphabet_of_the_Magi_0",
    "Alphabet_of_the_Magi_1",
    "Alphabet_of_the_Magi_11",
  )
  assert characters.validation.class_names[:2] == (
    "Alphabet_of_the_Magi_19",
    "Alphabet_of_the_Magi_8",
  )


def test_omniglot_vinyals_split(omniglot, cache_dir):
  vinyals = data.load_splits("omniglot_vinyals", cache_dir=cache_dir)
  assert tuple(split.num_classes for split in vinyals) == (1028, 172, 423)
  _assert_same_characters(vinyals, omniglot, "omniglot_vinyals")
  # Snell et al.'s list files: validation is five whole background
  # alphabets; test is twelve whole evaluation alphabets plus Gurmukhi's
  # character42..45 (0-based 41..44 in TFDS), whose first 41 train.
  assert {alphabet(n) for n in vinyals.validation.class_names} == {
    "Armenian",
    "Bengali",
    "Early_Aramaic",
    "Hebrew",
    "Mkhedruli_(Georgian)",
  }
  test_alphabets = {alphabet(n) for n in vinyals.test.class_names}
  assert test_alphabets == {
    "Gurmukhi",
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
  }
  assert sorted(
    n for n in vinyals.test.class_names if n.startswith("Gurmukhi")
  ) == ["Gurmukhi_41", "Gurmukhi_42", "Gurmukhi_43", "Gurmukhi_44"]
  train_alphabets = {alphabet(n) for n in vinyals.train.class_names}
  assert train_alphabets & test_alphabets == {"Gurmukhi"}
  assert len(train_alphabets) == 50 - 5 - 12
  assert sum(n.startswith("Gurmukhi") for n in vinyals.train.class_names) == 41


def test_train_on_validation_trains_on_both_splits(omniglot, cache_dir):
  merged = data.load_splits(
    "omniglot_characters",
    cache_dir=cache_dir,
    rotations=True,
    train_on_validation=True,
  )
  characters = data.load_splits("omniglot_characters", cache_dir=cache_dir)
  num_classes = characters.train.num_classes + (
    characters.validation.num_classes
  )
  assert merged.train.num_classes == 4 * num_classes == 4 * 1200
  assert merged.train.split == "train"
  # Each train or validation character, and each of its rotations, is one
  # class of the merged set, with its images turned (np.rot90).
  by_name = {
    name: split.class_examples(c)
    for split in characters[:2]
    for c, name in enumerate(split.class_names)
  }
  names = merged.train.class_names
  for r in range(4):
    for c in range(num_classes):
      name, rotation = names[r * num_classes + c].split("/")
      assert rotation == f"rot{90 * r}"
      if c % 97 == 0 or c == num_classes - 1:
        np.testing.assert_array_equal(
          merged.train.class_examples(r * num_classes + c),
          np.rot90(by_name[name], r, axes=(1, 2)),
        )
  assert sorted(n.split("/")[0] for n in names[:num_classes]) == sorted(by_name)
  assert merged.validation.class_names == characters.validation.class_names
  assert merged.test.class_names == characters.test.class_names
  with pytest.raises(ValueError, match="share classes"):
    characters.train.merged_with(characters.train, "train")


def test_omniglot_cache_is_used(omniglot, cache_dir, monkeypatch):
  import tensorflow_datasets as tfds

  assert list(cache_dir.glob("omniglot-*.npz"))

  def no_tfds(*args, **kwargs):
    raise AssertionError("tfds.load called although the cache exists")

  monkeypatch.setattr(tfds, "load", no_tfds)
  _sources._omniglot_arrays.cache_clear()
  cached = data.load_splits("omniglot", cache_dir=cache_dir)
  for a, b in zip(omniglot, cached):
    assert a.class_names == b.class_names
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.images, b.images)


def test_rotations_quadruple_train_classes_only(omniglot, cache_dir):
  rotated = data.load_splits("omniglot", cache_dir=cache_dir, rotations=True)
  num_classes = omniglot.train.num_classes
  assert rotated.train.num_classes == 4 * num_classes
  assert rotated.validation.class_names == omniglot.validation.class_names
  assert rotated.test.class_names == omniglot.test.class_names
  for r in range(4):
    for c in (0, num_classes - 1):
      np.testing.assert_array_equal(
        rotated.train.class_examples(r * num_classes + c),
        np.rot90(omniglot.train.class_examples(c), r, axes=(1, 2)),
      )
  assert not np.array_equal(
    rotated.train.class_examples(num_classes), omniglot.train.class_examples(0)
  )


def test_image_folder_round_trip(tmp_path):
  values = {}
  for split, first in (("train", 10), ("val", 100), ("test", 200)):
    for c in range(3):
      value = first + 10 * c
      values[f"{split}_class{c}"] = value
      for i in range(4):
        write_image(
          tmp_path / split / f"{split}_class{c}" / f"{i}.png",
          value,
          (10, 12, 3),
        )
  # Suffixes in any case count; other files are skipped.
  write_image(
    tmp_path / "train" / "train_class0" / "extra.JPG", 10, (10, 12, 3)
  )
  (tmp_path / "train" / "train_class0" / "notes.txt").write_text("x")

  splits = data.load_splits("image_folder", data_dir=tmp_path, image_size=8)
  for split, folder in zip(splits, ("train", "val", "test")):
    assert split.class_names == tuple(f"{folder}_class{c}" for c in range(3))
    assert split.example_shape == (8, 8, 3)
    for c, name in enumerate(split.class_names):
      examples = split.class_examples(c).astype(int)
      assert np.all(np.abs(examples - values[name]) <= 2)
  assert splits.train.counts.tolist() == [5, 4, 4]
  gray = data.load_splits(
    "image_folder", data_dir=tmp_path, image_size=8, channels=1
  )
  assert gray.test.example_shape == (8, 8, 1)
  (batch,) = take(
    data.meta_batches(
      splits.test, ways=2, shots=1, queries=3, batch_size=2, seed=0
    ),
    1,
  )
  assert batch["query_images"].shape == (2, 6, 8, 8, 3)


def test_bad_inputs_stop_with_clear_messages(omniglot, tmp_path):
  with pytest.raises(
    ValueError,
    match=r"unknown dataset 'mnist'.*"
    r"embeddings, image_folder, metaoptnet_pickle, "
    r"omniglot",
  ):
    data.load_splits("mnist")
  with pytest.raises(ValueError, match="needs a data directory.*data_dir"):
    data.load_splits("image_folder")
  missing = tmp_path / "nowhere"
  with pytest.raises(
    ValueError, match=re.escape(str(missing)) + ".*data_dir.*does not exist"
  ):
    data.load_splits("embeddings", data_dir=missing)
  with pytest.raises(ValueError, match="neither"):
    data.load_splits("metaoptnet_pickle", data_dir=tmp_path)
  with pytest.raises(
    ValueError, match="ways=190 .* 189 classes of split 'validation'"
  ):
    data.meta_batches(
      omniglot.validation, ways=190, shots=1, queries=1, batch_size=1, seed=0
    )
  with pytest.raises(
    ValueError,
    match=r"shots \+ queries = 10 \+ 11 = 21 "
    r"is larger than the 20 examples of class "
    r"'Angelic_0' in split 'test'",
  ):
    data.eval_episodes(omniglot.test, ways=5, shots=10, queries=11, seed=0)
  with pytest.raises(ValueError, match="shots must be"):
    data.eval_episodes(omniglot.test, ways=5, shots=0, queries=1, seed=0)
  for split in ("train", "val", "test"):
    write_image(
      tmp_path / "folders" / split / "same_class" / "0.png", 0, (4, 4, 3)
    )
  with pytest.raises(ValueError, match="disjoint"):
    data.load_splits("image_folder", data_dir=tmp_path / "folders")


# The Omniglot cache.


def test_omniglot_cache_is_keyed_by_its_source_and_checked(
  omniglot, cache_dir, tmp_path, caplog, monkeypatch
):
  # The module's fresh decode wrote the cache, named by its source.
  [built_file] = cache_dir.glob("omniglot-*.npz")
  source = os.path.realpath(os.environ["TFDS_DATA_DIR"])
  assert hashlib.sha256(source.encode()).hexdigest()[:12] in built_file.name
  # A copy of it in a folder of its own, damaged below.
  own_dir = tmp_path / "cache"
  own_dir.mkdir()
  cache_file = own_dir / built_file.name
  shutil.copyfile(built_file, cache_file)
  # Another data directory never reads this cache: an empty one fails.
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(
    ValueError, match=f"'{empty}'.* holds no prepared TFDS 'omniglot' dataset"
  ):
    data.load_splits("omniglot", data_dir=empty, cache_dir=own_dir)

  # The first rebuild decodes TFDS's records; the second, down the same
  # path after another kind of damage, is given the first one's arrays.
  real_decode = _sources._decode_omniglot  # pylint: disable=protected-access
  decoded = []

  def decode(data_dir, image_size):
    if not decoded:
      decoded.append(real_decode(data_dir, image_size))
    else:
      decoded.append(decoded[0])
    return dict(decoded[-1])

  def no_decode(data_dir, image_size):
    raise AssertionError("TFDS's records decoded although the cache is intact")

  def damage_and_reload(damage):
    damage()
    decodes = len(decoded)
    _sources._omniglot_arrays.cache_clear()  # pylint: disable=protected-access
    caplog.clear()
    monkeypatch.setattr(_sources, "_decode_omniglot", decode)
    with caplog.at_level("WARNING"):
      reloaded = data.load_splits("omniglot", cache_dir=own_dir)
    assert f"The Omniglot cache {cache_file} is damaged" in caplog.text
    assert len(decoded) == decodes + 1
    # The cache is whole again: the next load reads it.
    monkeypatch.setattr(_sources, "_decode_omniglot", no_decode)
    _sources._omniglot_arrays.cache_clear()  # pylint: disable=protected-access
    for splits in (reloaded, data.load_splits("omniglot", cache_dir=own_dir)):
      for a, b in zip(omniglot, splits):
        assert a.class_names == b.class_names
        np.testing.assert_array_equal(a.images, b.images)

  def cut_short():
    with np.load(cache_file) as cached:
      arrays = dict(cached)
    arrays["train_images"] = arrays["train_images"][:100]
    np.savez(cache_file, **arrays)

  damage_and_reload(cut_short)
  damage_and_reload(
    lambda: cache_file.write_bytes(cache_file.read_bytes()[:1000])
  )
