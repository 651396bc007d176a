"""Tests of comln_tf.data: sources, class splits and episode pipelines."""

import pickle
import re
import struct

import numpy as np
import pytest
import tensorflow as tf

from comln_tf import data
from comln_tf.data import _sources

# Small episodes keep every pipeline here cheap on 2 cores.
WAYS, SHOTS, QUERIES, BATCH = 5, 1, 2, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def omniglot(cache_dir):
  # A fresh decode of the prepared TFDS copy (about 10 s), which also
  # writes the .npz cache that test_omniglot_cache_is_used reads.
  _sources._omniglot_arrays.cache_clear()
  return data.load_splits("omniglot", cache_dir=cache_dir)


def _take(dataset, n):
  return list(dataset.take(n).as_numpy_iterator())


def _assert_equal_elements(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _index_set(counts, split="train"):
  """A class set whose 1-d "features" are the examples' own indices."""
  labels = np.repeat(np.arange(len(counts)), counts)
  features = np.arange(len(labels), dtype=np.float32)[:, None]
  return data.ClassSet.from_labels(
    features, labels, dataset="indices", split=split
  )


def _indices(images):
  return images[..., 0].astype(np.int64)


def _alphabet(class_name):
  # TFDS omniglot label names are "<alphabet>_<character index>".
  return class_name.rsplit("_", 1)[0]


def test_omniglot_splits_are_disjoint_by_alphabet(omniglot):
  alphabets = [
    {_alphabet(name) for name in split.class_names} for split in omniglot
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
  train = {_alphabet(name) for name in characters.train.class_names}
  test = {_alphabet(name) for name in characters.test.class_names}
  assert len(train & test) == 50
  assert len(test & {_alphabet(n) for n in omniglot.test.class_names}) == 20
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
  assert {_alphabet(n) for n in vinyals.validation.class_names} == {
    "Armenian",
    "Bengali",
    "Early_Aramaic",
    "Hebrew",
    "Mkhedruli_(Georgian)",
  }
  test_alphabets = {_alphabet(n) for n in vinyals.test.class_names}
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
  train_alphabets = {_alphabet(n) for n in vinyals.train.class_names}
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


def test_meta_batch_format(omniglot):
  dataset = data.meta_batches(
    omniglot.train,
    ways=WAYS,
    shots=SHOTS,
    queries=QUERIES,
    batch_size=BATCH,
    seed=0,
  )
  spec = dataset.element_spec
  assert spec["support_images"].shape == (BATCH, WAYS * SHOTS, 28, 28, 1)
  assert spec["query_images"].shape == (BATCH, WAYS * QUERIES, 28, 28, 1)
  assert spec["support_labels"].shape == (BATCH, WAYS * SHOTS)
  assert spec["query_labels"].shape == (BATCH, WAYS * QUERIES)
  (batch,) = _take(dataset, 1)
  for key in ("support_images", "query_images"):
    assert batch[key].dtype == np.float32
    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
  for key, per_class in (("support_labels", SHOTS), ("query_labels", QUERIES)):
    assert batch[key].dtype == np.int32
    expected = np.repeat(np.arange(WAYS), per_class)
    np.testing.assert_array_equal(batch[key], np.tile(expected, (BATCH, 1)))


def test_omniglot_examples_belong_to_their_labelled_class(omniglot):
  classes_of_image = {}
  for c in range(omniglot.test.num_classes):
    for image in omniglot.test.class_examples(c):
      classes_of_image.setdefault(image.tobytes(), set()).add(c)
  episodes = _take(
    data.eval_episodes(
      omniglot.test, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=3
    ),
    10,
  )
  for episode in episodes:
    chosen = []
    for label in range(WAYS):
      candidates = set(range(omniglot.test.num_classes))
      for part in ("support", "query"):
        images = episode[f"{part}_images"][episode[f"{part}_labels"] == label]
        for image in np.round(images * 255).astype(np.uint8):
          candidates &= classes_of_image[image.tobytes()]
      assert len(candidates) == 1
      chosen.append(candidates.pop())
    assert len(set(chosen)) == WAYS


def test_episodes_pick_distinct_examples_of_the_labelled_class():
  # Unequal class sizes; the smallest class has exactly shots + queries.
  counts = [7, 5, 9, 6, 8, 5, 10]
  class_set = _index_set(counts)
  ways, shots, queries = 4, 2, 3
  episodes = _take(
    data.eval_episodes(
      class_set,
      ways=ways,
      shots=shots,
      queries=queries,
      seed=0,
      num_episodes=200,
    ),
    200,
  )
  classes_of_label0 = set()
  for episode in episodes:
    support = _indices(episode["support_images"])
    query = _indices(episode["query_images"])
    assert len(set(support) | set(query)) == len(support) + len(query)
    chosen = []
    for label in range(ways):
      examples = np.concatenate(
        [
          support[episode["support_labels"] == label],
          query[episode["query_labels"] == label],
        ]
      )
      assert len(examples) == shots + queries
      owners = np.searchsorted(class_set.offsets, examples, side="right") - 1
      assert len(set(owners)) == 1
      chosen.append(owners[0])
    assert len(set(chosen)) == ways
    classes_of_label0.add(chosen[0])
  # The class -> label assignment varies between episodes.
  assert classes_of_label0 == set(range(len(counts)))


def test_episodes_are_pinned_for_seed_and_index():
  # Guards "identical across runs and machines": these indices come from
  # stateless Philox draws and must never change.
  (episode,) = _take(
    data.eval_episodes(
      _index_set([6] * 10), ways=3, shots=1, queries=1, seed=0
    ),
    1,
  )
  assert _indices(episode["support_images"]).tolist() == [23, 30, 17]
  assert _indices(episode["query_images"]).tolist() == [22, 34, 16]


def test_rotate_classes_turns_each_class_as_a_whole():
  # Random 6x6 images: each of the four rotations of an image is distinct.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(8), 5)
  images = rng.uniform(size=(len(labels), 6, 6, 1)).astype(np.float32)
  class_set = data.ClassSet.from_labels(
    images, labels, dataset="random", split="test"
  )
  kwargs = dict(ways=4, shots=2, queries=3, seed=5, num_episodes=30)
  plain = _take(data.eval_episodes(class_set, **kwargs), 30)
  rotated = _take(
    data.eval_episodes(class_set, rotate_classes=True, **kwargs), 30
  )
  turns_seen, episodes_with_mixed_turns = set(), 0
  for upright, turned in zip(plain, rotated):
    turns = []
    for label in range(4):
      # The class's support then query images, upright and rotated.
      original, result = (
        np.concatenate(
          [
            episode[f"{part}_images"][episode[f"{part}_labels"] == label]
            for part in ("support", "query")
          ]
        )
        for episode in (upright, turned)
      )
      # Support and queries of a class share one counter-clockwise
      # turn (np.rot90 as the reference).
      matching = [
        k
        for k in range(4)
        if np.array_equal(result, np.rot90(original, k, axes=(1, 2)))
      ]
      assert len(matching) == 1
      turns.append(matching[0])
    for key in ("support_labels", "query_labels"):
      np.testing.assert_array_equal(upright[key], turned[key])
    turns_seen.update(turns)
    episodes_with_mixed_turns += len(set(turns)) > 1
  assert turns_seen == {0, 1, 2, 3}
  # Each class draws its own turn, not one per episode.
  assert episodes_with_mixed_turns > 20
  with pytest.raises(
    ValueError,
    match=r"rotate_classes needs square "
    r"images .* shape \(1,\)",
  ):
    data.eval_episodes(
      _index_set([6] * 10),
      ways=3,
      shots=1,
      queries=1,
      seed=0,
      rotate_classes=True,
    )


def test_stream_is_deterministic_and_resumable(omniglot):
  def stream(seed, start_batch=0):
    return data.meta_batches(
      omniglot.test,
      ways=WAYS,
      shots=SHOTS,
      queries=QUERIES,
      batch_size=BATCH,
      seed=seed,
      start_batch=start_batch,
    )

  first = _take(stream(7), 3)
  _assert_equal_elements(first, _take(stream(7), 3))
  other = _take(stream(8), 1)[0]
  assert not np.array_equal(first[0]["support_images"], other["support_images"])
  _assert_equal_elements(first[2:], _take(stream(7, start_batch=2), 1))
  _assert_equal_elements(first[2:], _take(stream(7).skip(2), 1))
  # Episode i of the stream is the same function of (seed, i) as eval
  # episode i: meta-batch j holds episodes j*B .. j*B + B - 1.
  singles = _take(
    data.eval_episodes(
      omniglot.test,
      ways=WAYS,
      shots=SHOTS,
      queries=QUERIES,
      seed=7,
      num_episodes=3 * BATCH,
    ),
    3 * BATCH,
  )
  batched = [
    {
      key: np.stack([e[key] for e in singles[j : j + BATCH]])
      for key in singles[0]
    }
    for j in range(0, 3 * BATCH, BATCH)
  ]
  _assert_equal_elements(first, batched)


def test_replicas_split_each_global_batch_exactly_once():
  class_set = _index_set([4] * 12)
  kwargs = dict(ways=3, shots=1, queries=1, seed=5)
  batch_size, start = 8, 1
  whole = _take(
    data.meta_batches(
      class_set, batch_size=batch_size, start_batch=start, **kwargs
    ),
    3,
  )
  for num_replicas in (2, 4):
    parts = [
      _take(
        data.meta_batches(
          class_set,
          batch_size=batch_size,
          start_batch=start,
          replica_id=r,
          num_replicas=num_replicas,
          **kwargs,
        ),
        3,
      )
      for r in range(num_replicas)
    ]
    for j in range(3):
      assert parts[0][j]["support_images"].shape[0] == (
        batch_size // num_replicas
      )
      joined = {
        key: np.concatenate([part[j][key] for part in parts])
        for key in whole[j]
      }
      _assert_equal_elements([whole[j]], [joined])
  # Worker 1 of 2, with replicas 2 and 3 of 4, yields their slices in turn.
  context = tf.distribute.InputContext(
    num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4
  )
  worker = _take(
    data.distributed_meta_batches(
      context,
      class_set,
      global_batch_size=batch_size,
      start_batch=start,
      **kwargs,
    ),
    6,
  )
  for j in range(3):
    for local, r in enumerate((2, 3)):
      expected = {
        key: value[r * 2 : (r + 1) * 2] for key, value in whole[j].items()
      }
      _assert_equal_elements([worker[2 * j + local]], [expected])
  with pytest.raises(ValueError, match="batch_size=6 .* num_replicas=4"):
    data.meta_batches(class_set, batch_size=6, num_replicas=4, **kwargs)


def test_eval_episodes_are_identical_across_constructions(omniglot, cache_dir):
  kwargs = dict(
    ways=WAYS, shots=SHOTS, queries=QUERIES, seed=11, num_episodes=8
  )
  first = data.eval_episodes(omniglot.test, **kwargs)
  _sources._omniglot_arrays.cache_clear()
  reloaded = data.load_splits("omniglot", cache_dir=cache_dir).test
  second = data.eval_episodes(reloaded, **kwargs)
  assert first.cardinality() == 8
  _assert_equal_elements(_take(first, 8), _take(second, 8))
  (batch,) = _take(second.batch(8), 1)
  assert batch["query_images"].shape == (8, WAYS * QUERIES, 28, 28, 1)
  default = data.eval_episodes(
    omniglot.test, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=11
  )
  assert default.cardinality() == 1000


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


def _write_png(path, value, shape):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = tf.fill(shape, tf.constant(value, tf.uint8))
  encode = (
    tf.io.encode_jpeg if path.suffix.lower() == ".jpg" else (tf.io.encode_png)
  )
  tf.io.write_file(str(path), encode(image))


def test_image_folder_round_trip(tmp_path):
  values = {}
  for split, first in (("train", 10), ("val", 100), ("test", 200)):
    for c in range(3):
      value = first + 10 * c
      values[f"{split}_class{c}"] = value
      for i in range(4):
        _write_png(
          tmp_path / split / f"{split}_class{c}" / f"{i}.png",
          value,
          (10, 12, 3),
        )
  # Suffixes in any case count; other files are skipped.
  _write_png(tmp_path / "train" / "train_class0" / "extra.JPG", 10, (10, 12, 3))
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
  (batch,) = _take(
    data.meta_batches(
      splits.test, ways=2, shots=1, queries=3, batch_size=2, seed=0
    ),
    1,
  )
  assert batch["query_images"].shape == (2, 6, 8, 8, 3)


class _Py2Pickler(pickle._Pickler):
  """Writes bytes as Python 2 `str`s, as Python 2 numpy pickles hold them."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_py2_str(self, obj):
    self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_py2_str


def _dump_py2(obj, path):
  with open(path, "wb") as f:
    _Py2Pickler(f, protocol=2).dump(obj)


def _metaoptnet_split(labels):
  labels = list(labels)
  images = np.stack(
    [np.full((84, 84, 3), 128 + 3 * i, np.uint8) for i in range(len(labels))]
  )
  return images, labels


def test_metaoptnet_miniimagenet_round_trip(tmp_path):
  files = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "validation": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
  }
  written = {
    "train": _metaoptnet_split([0, 1, 2, 0, 1, 2, 0, 1, 2]),
    "validation": _metaoptnet_split([3, 4, 3, 4]),
    "test": _metaoptnet_split([5, 6, 7, 5, 6, 7]),
  }
  for split, name in files.items():
    images, labels = written[split]
    _dump_py2(
      {"data": images, "labels": labels, "catname2label": {}}, tmp_path / name
    )
  # Like a real Python 2 pickle, it needs encoding="latin1".
  with open(tmp_path / files["test"], "rb") as f:
    with pytest.raises(UnicodeDecodeError):
      pickle.load(f)

  splits = data.load_splits("metaoptnet_pickle", data_dir=tmp_path)
  for split in splits:
    images, labels = written[split.split]
    assert split.class_names == tuple(str(x) for x in sorted(set(labels)))
    for c, name in enumerate(split.class_names):
      mine = np.array(labels) == int(name)
      np.testing.assert_array_equal(split.class_examples(c), images[mine])
  small = data.load_splits(
    "metaoptnet_pickle", data_dir=tmp_path, image_size=42
  )
  assert small.train.example_shape == (42, 42, 3)


def test_metaoptnet_tieredimagenet_round_trip(tmp_path):
  written = {
    "train": _metaoptnet_split([0, 1, 0, 1]),
    "val": _metaoptnet_split([2, 3, 2, 3]),
    "test": _metaoptnet_split([4, 5, 4, 5]),
  }
  for prefix, (images, labels) in written.items():
    np.savez(tmp_path / f"{prefix}_images.npz", images=images)
    _dump_py2({"labels": labels}, tmp_path / f"{prefix}_labels.pkl")

  splits = data.load_splits("metaoptnet_pickle", data_dir=tmp_path)
  assert [s.class_names for s in splits] == [("0", "1"), ("2", "3"), ("4", "5")]
  images, _ = written["val"]
  np.testing.assert_array_equal(
    splits.validation.class_examples(1), images[[1, 3]]
  )


def test_embeddings_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  written = {}
  for prefix, classes in (
    ("train", ["n01", "n02", "n03"]),
    ("val", ["n04", "n05"]),
    ("test", ["n06", "n07"]),
  ):
    keys, embeddings = [], []
    for i in range(12):
      wnid = classes[i % len(classes)]
      keys.append(f"{i}-{wnid}-{wnid}_{i:08d}.JPEG")
      embeddings.append(rng.normal(size=16).astype(np.float32))
    if prefix == "val":  # LEO's multiview pickles hold bytes keys.
      keys = [key.encode() for key in keys]
    written[prefix] = (np.stack(embeddings), np.array(keys))
    with open(tmp_path / f"{prefix}_embeddings.pkl", "wb") as f:
      pickle.dump(
        {
          "embeddings": written[prefix][0],
          "keys": written[prefix][1],
          "labels": np.zeros(12, np.int64),
        },
        f,
        protocol=2,
      )

  splits = data.load_splits("embeddings", data_dir=tmp_path)
  assert splits.train.class_names == ("n01", "n02", "n03")
  assert splits.validation.class_names == ("n04", "n05")
  embeddings, _ = written["test"]
  np.testing.assert_array_equal(splits.test.class_examples(1), embeddings[1::2])
  assert splits.test.images.dtype == np.float32
  (batch,) = _take(
    data.meta_batches(
      splits.train, ways=3, shots=2, queries=2, batch_size=2, seed=0
    ),
    1,
  )
  assert batch["support_images"].shape == (2, 6, 16)
  # Features come out unscaled: every one is a row of the file.
  rows = {row.tobytes() for row in written["train"][0]}
  assert all(
    row.tobytes() in rows for row in batch["query_images"].reshape(-1, 16)
  )
  with pytest.raises(ValueError, match="square images"):
    data.load_splits("embeddings", data_dir=tmp_path, rotations=True)


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
    _write_png(
      tmp_path / "folders" / split / "same_class" / "0.png", 0, (4, 4, 3)
    )
  with pytest.raises(ValueError, match="disjoint"):
    data.load_splits("image_folder", data_dir=tmp_path / "folders")


def _grouped_index_set(group_sizes, per_class=3):
  """An index set whose classes form groups of the given sizes."""
  counts = [per_class] * sum(group_sizes)
  labels = np.repeat(np.arange(len(counts)), counts)
  groups = np.repeat(
    np.repeat([f"g{i}" for i in range(len(group_sizes))], group_sizes), counts
  )
  features = np.arange(len(labels), dtype=np.float32)[:, None]
  return data.ClassSet.from_labels(
    features, labels, dataset="indices", split="test", groups=groups
  )


def test_within_alphabet_episodes_draw_one_qualifying_group():
  # Groups of 2, 6 and 4 classes: 4-way episodes come from g1 or g2 only.
  class_set = _grouped_index_set([2, 6, 4])
  class_of = np.repeat(np.arange(class_set.num_classes), 3)
  group_of_class = np.array(class_set.groups)
  seen = set()
  episodes = data.eval_episodes(
    class_set,
    ways=4,
    shots=1,
    queries=1,
    seed=3,
    num_episodes=200,
    class_sampling="within_alphabet",
  )
  for episode in episodes.as_numpy_iterator():
    classes = class_of[_indices(episode["support_images"])]
    assert len(set(classes)) == 4
    groups = set(group_of_class[classes])
    assert len(groups) == 1
    seen |= groups
  assert seen == {"g1", "g2"}


def test_within_alphabet_needs_a_group_with_enough_classes():
  class_set = _grouped_index_set([2, 3])
  with pytest.raises(
    ValueError,
    match=r"no alphabet .* has 4 classes "
    r"\(the largest has 3\)",
  ):
    data.eval_episodes(
      class_set,
      ways=4,
      shots=1,
      queries=1,
      seed=0,
      class_sampling="within_alphabet",
    )
  no_groups = _index_set([3] * 5)
  with pytest.raises(ValueError, match="has no class groups"):
    data.meta_batches(
      no_groups,
      ways=2,
      shots=1,
      queries=1,
      batch_size=1,
      seed=0,
      class_sampling="within_alphabet",
    )
  with pytest.raises(ValueError, match="class_sampling must be one of"):
    data.eval_episodes(
      class_set, ways=2, shots=1, queries=1, seed=0, class_sampling="alphabet"
    )


def test_omniglot_within_alphabet_test_episodes(omniglot):
  # Lake et al.'s trials: 20 characters of one evaluation alphabet. Each
  # image is traced back to its character by its pixels.
  test = omniglot.test
  owner = {}
  for c, name in enumerate(test.class_names):
    for image in test.class_examples(c):
      owner[image.tobytes()] = name

  def episodes():
    return _take(
      data.eval_episodes(
        test,
        ways=20,
        shots=1,
        queries=1,
        seed=11,
        num_episodes=12,
        class_sampling="within_alphabet",
      ),
      12,
    )

  first, again = episodes(), episodes()
  _assert_equal_elements(first, again)  # Fixed by the seed.
  alphabets = set()
  for episode in first:
    images = np.concatenate(
      [episode["support_images"], episode["query_images"]]
    )
    names = [
      owner[np.round(image * 255).astype(np.uint8).tobytes()]
      for image in images
    ]
    support, query = names[:20], names[20:]
    assert support == query and len(set(support)) == 20
    assert len({_alphabet(name) for name in support}) == 1
    alphabets.add(_alphabet(support[0]))
  assert len(alphabets) > 3


def _scipy_affine(images, parameters):
  """Independent reference of affine_transform_images (scipy, row-col)."""
  from scipy import ndimage

  out = np.empty_like(images)
  height, width = images.shape[1:3]
  center = np.array([(height - 1) / 2, (width - 1) / 2])
  for i, (rot, kx, ky, sx, sy, tx, ty) in enumerate(parameters):
    rotation = np.array(
      [[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]
    )
    xy = rotation @ np.array([[1, kx], [ky, 1]]) @ np.diag([sx, sy])
    # (x, y) = (column, row) -> (row, column).
    matrix = xy[::-1, ::-1]
    offset = center + np.array([ty, tx]) - matrix @ center
    out[i, ..., 0] = ndimage.affine_transform(
      images[i, ..., 0], matrix, offset, order=1, mode="nearest"
    )
  return out


def test_affine_transform_matches_scipy():
  rng = np.random.default_rng(0)
  images = np.zeros([4, 20, 20, 1], np.float32)
  images[:, 5:15, 5:15] = rng.uniform(size=[4, 10, 10, 1])
  parameters = np.array(
    [
      [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],  # identity
      [0.0, 0.0, 0.0, 1.0, 1.0, 2.0, -1.0],  # integer shift
      [0.3, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],  # rotation
      [-0.2, 0.25, -0.1, 1.15, 0.85, 0.7, 1.3],  # everything
    ],
    np.float32,
  )
  got = data.affine_transform_images(
    tf.constant(images), tf.constant(parameters)
  ).numpy()
  np.testing.assert_array_equal(got[0], images[0])
  np.testing.assert_allclose(got, _scipy_affine(images, parameters), atol=1e-5)


def test_distortion_is_pinned_and_keeps_the_episode(omniglot):
  kwargs = dict(
    ways=WAYS, shots=SHOTS, queries=QUERIES, batch_size=BATCH, seed=5
  )
  plain = _take(data.meta_batches(omniglot.train, **kwargs), 2)
  none = _take(
    data.meta_batches(
      omniglot.train, distortion=data.AffineDistortion(), **kwargs
    ),
    2,
  )
  _assert_equal_elements(plain, none)
  distortion = data.AffineDistortion(
    rotation_degrees=10, shear=0.2, scale=0.15, translation_pixels=1
  )
  distorted = _take(
    data.meta_batches(omniglot.train, distortion=distortion, **kwargs), 2
  )
  again = _take(
    data.meta_batches(
      omniglot.train, distortion=distortion, start_batch=1, **kwargs
    ),
    1,
  )
  _assert_equal_elements(distorted[1:], again)  # Resumable.
  for p, d in zip(plain, distorted):
    np.testing.assert_array_equal(p["support_labels"], d["support_labels"])
    assert d["support_images"].shape == p["support_images"].shape
    assert 0 <= d["support_images"].min() and d["query_images"].max() <= 1
    # Each image moved, but stays close to its undistorted self.
    change = np.abs(d["support_images"] - p["support_images"]).mean(
      axis=(2, 3, 4)
    )
    assert np.all(change > 0) and np.all(change < 0.3)
  with pytest.raises(ValueError, match="scale must be < 1"):
    data.AffineDistortion(scale=1.0)
  with pytest.raises(ValueError, match="shear must be a finite number"):
    data.AffineDistortion(shear=-0.1)
