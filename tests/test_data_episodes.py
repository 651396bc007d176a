"""Tests of comln_tf/data/_episodes.py: episode streams and sets."""

import numpy as np
import pytest
import tensorflow as tf

from comln_tf import data
from comln_tf.data import _sources
from data_helpers import BATCH
from data_helpers import QUERIES
from data_helpers import SHOTS
from data_helpers import WAYS
from data_helpers import alphabet
from data_helpers import assert_equal_elements
from data_helpers import fresh_omniglot
from data_helpers import index_set
from data_helpers import indices
from data_helpers import take


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def omniglot(cache_dir):
  # Decoded afresh, which also writes the .npz cache of `cache_dir`.
  return fresh_omniglot(cache_dir)


def test_meta_batch_format(omniglot):
  dataset = data.meta_batches(
    omniglot.train,
    ways=WAYS,
    shots=SHOTS,
    queries=QUERIES,
    batch_size=BATCH,
    seed=0,
  )
  # Without tf.data's autotune thread (test_pipelines_run_without_...).
  assert dataset.options().autotune.enabled is False
  spec = dataset.element_spec
  assert spec["support_images"].shape == (BATCH, WAYS * SHOTS, 28, 28, 1)
  assert spec["query_images"].shape == (BATCH, WAYS * QUERIES, 28, 28, 1)
  assert spec["support_labels"].shape == (BATCH, WAYS * SHOTS)
  assert spec["query_labels"].shape == (BATCH, WAYS * QUERIES)
  (batch,) = take(dataset, 1)
  for key in ("support_images", "query_images"):
    assert batch[key].dtype == np.float32
    assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
  for key, per_class in (("support_labels", SHOTS), ("query_labels", QUERIES)):
    assert batch[key].dtype == np.int32
    expected = np.repeat(np.arange(WAYS), per_class)
    np.testing.assert_array_equal(batch[key], np.tile(expected, (BATCH, 1)))


def test_pipelines_run_without_the_autotune_thread(omniglot):
  # Destroying an iterator waits for tf.data's autotune thread to wake, for
  # seconds at the end of a long evaluation or training. The training
  # batches are checked in test_meta_batch_format.
  dataset = data.eval_episodes(
    omniglot.test, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=0
  )
  assert dataset.options().autotune.enabled is False


def test_omniglot_examples_belong_to_their_labelled_class(omniglot):
  classes_of_image = {}
  for c in range(omniglot.test.num_classes):
    for image in omniglot.test.class_examples(c):
      classes_of_image.setdefault(image.tobytes(), set()).add(c)
  episodes = take(
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
  class_set = index_set(counts)
  ways, shots, queries = 4, 2, 3
  episodes = take(
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
    support = indices(episode["support_images"])
    query = indices(episode["query_images"])
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
  (episode,) = take(
    data.eval_episodes(index_set([6] * 10), ways=3, shots=1, queries=1, seed=0),
    1,
  )
  assert indices(episode["support_images"]).tolist() == [23, 30, 17]
  assert indices(episode["query_images"]).tolist() == [22, 34, 16]


def test_rotate_classes_turns_each_class_as_a_whole():
  # Random 6x6 images: each of the four rotations of an image is distinct.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(8), 5)
  images = rng.uniform(size=(len(labels), 6, 6, 1)).astype(np.float32)
  class_set = data.ClassSet.from_labels(
    images, labels, dataset="random", split="test"
  )
  kwargs = dict(ways=4, shots=2, queries=3, seed=5, num_episodes=30)
  plain = take(data.eval_episodes(class_set, **kwargs), 30)
  rotated = take(
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
      index_set([6] * 10),
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

  first = take(stream(7), 3)
  assert_equal_elements(first, take(stream(7), 3))
  other = take(stream(8), 1)[0]
  assert not np.array_equal(first[0]["support_images"], other["support_images"])
  assert_equal_elements(first[2:], take(stream(7, start_batch=2), 1))
  assert_equal_elements(first[2:], take(stream(7).skip(2), 1))
  # Episode i of the stream is the same function of (seed, i) as eval
  # episode i: meta-batch j holds episodes j*B .. j*B + B - 1.
  singles = take(
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
  assert_equal_elements(first, batched)


def test_replicas_split_each_global_batch_exactly_once():
  class_set = index_set([4] * 12)
  kwargs = dict(ways=3, shots=1, queries=1, seed=5)
  batch_size, start = 8, 1
  whole = take(
    data.meta_batches(
      class_set, batch_size=batch_size, start_batch=start, **kwargs
    ),
    3,
  )
  for num_replicas in (2, 4):
    parts = [
      take(
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
      assert_equal_elements([whole[j]], [joined])
  # Worker 1 of 2, with replicas 2 and 3 of 4, yields their slices in turn.
  context = tf.distribute.InputContext(
    num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4
  )
  worker = take(
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
      assert_equal_elements([worker[2 * j + local]], [expected])
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
  assert_equal_elements(take(first, 8), take(second, 8))
  (batch,) = take(second.batch(8), 1)
  assert batch["query_images"].shape == (8, WAYS * QUERIES, 28, 28, 1)
  default = data.eval_episodes(
    omniglot.test, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=11
  )
  assert default.cardinality() == 1000


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
    classes = class_of[indices(episode["support_images"])]
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
  no_groups = index_set([3] * 5)
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
    return take(
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
  assert_equal_elements(first, again)  # Fixed by the seed.
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
    assert len({alphabet(name) for name in support}) == 1
    alphabets.add(alphabet(support[0]))
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
  plain = take(data.meta_batches(omniglot.train, **kwargs), 2)
  none = take(
    data.meta_batches(
      omniglot.train, distortion=data.AffineDistortion(), **kwargs
    ),
    2,
  )
  assert_equal_elements(plain, none)
  distortion = data.AffineDistortion(
    rotation_degrees=10, shear=0.2, scale=0.15, translation_pixels=1
  )
  distorted = take(
    data.meta_batches(omniglot.train, distortion=distortion, **kwargs), 2
  )
  again = take(
    data.meta_batches(
      omniglot.train, distortion=distortion, start_batch=1, **kwargs
    ),
    1,
  )
  assert_equal_elements(distorted[1:], again)  # Resumable.
  for p, d in zip(plain, distorted):
    np.testing.assert_array_equal(p["support_labels"], d["support_labels"])
    assert d["support_images"].shape == p["support_images"].shape
    assert d["support_images"].min() >= 0 and d["query_images"].max() <= 1
    # Each image moved, but stays close to its undistorted self.
    change = np.abs(d["support_images"] - p["support_images"]).mean(
      axis=(2, 3, 4)
    )
    assert np.all(change > 0) and np.all(change < 0.3)
  with pytest.raises(ValueError, match="scale must be < 1"):
    data.AffineDistortion(scale=1.0)
  with pytest.raises(ValueError, match="shear must be a finite number"):
    data.AffineDistortion(shear=-0.1)
