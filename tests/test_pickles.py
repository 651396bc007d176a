"""Tests of the pickle sources of comln_tf/data/_sources.py.

Data files are data: the restricted unpickler rebuilds numpy arrays and
plain containers only, and MetaOptNet's and LEO's files load through it.
"""

import io
import os
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from comln_tf import data
from comln_tf.data import _sources
from data_helpers import take

_read_pickle = _sources._read_pickle  # pylint: disable=protected-access


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes a pickle as Python 2 with numpy 1 writes one.

  Every str and bytes is a Python 2 `str` (BINSTRING), and numpy's helpers
  are named `numpy.core.*`: such files only load with encoding="latin1".
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch[str] = _save_py2_str
  dispatch[bytes] = _save_py2_str

  def save_global(self, obj, name=None):
    module = pickle.whichmodule(obj, obj.__name__).replace(
      "numpy._core", "numpy.core"
    )
    self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
    self.memoize(obj)


def _dump_py2(obj, path):
  with open(path, "wb") as f:
    _Py2Pickler(f, protocol=2).dump(obj)


class _WritesAFile:
  """Unpickling calls `function(*args)`, as a hostile pickle would."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, how):
  target = tmp_path / "written_by_the_pickle"
  payload = (
    _WritesAFile(os.system, f"touch {target}")
    if how == "os.system"
    else _WritesAFile(open, str(target), "w")
  )
  # Under the entries the loader reads, as a real attack would hide it.
  for prefix in ("train", "val", "test"):
    with open(tmp_path / f"{prefix}_embeddings.pkl", "wb") as f:
      pickle.dump({"embeddings": payload, "keys": ["0-a-0"]}, f, protocol=2)
  path = tmp_path / "train_embeddings.pkl"
  # The file is live: an unrestricted load runs its code (in a subfolder,
  # so that the check below sees the restricted loader alone).
  probe = tmp_path / "probe"
  probe.mkdir()
  live = (
    _WritesAFile(os.system, f"touch {probe / 'ran'}")
    if how == "os.system"
    else _WritesAFile(open, str(probe / "ran"), "w")
  )
  pickle.loads(pickle.dumps(live, protocol=2))
  assert (probe / "ran").exists()

  name = "system" if how == "os.system" else "open"
  with pytest.raises(ValueError, match=rf"{path}.*refused.*{name}"):
    data.load_splits("embeddings", data_dir=tmp_path)
  assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_still_load(tmp_path, protocol):
  written = {
    "data": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "embeddings": np.linspace(-1, 1, 6, dtype=np.float32),
    "labels": [1, 2, 3],
    "keys": np.array(["0-a-1", "1-b-2"]),
    "scalar": np.float64(2.5),
    "nested": {"t": (1, "x", b"y")},
  }
  path = tmp_path / "file.pkl"
  path.write_bytes(pickle.dumps(written, protocol=protocol))
  loaded = _read_pickle(path, ("data", "labels"))
  assert sorted(loaded) == sorted(written)
  for key in ("data", "embeddings", "keys"):
    assert loaded[key].dtype == written[key].dtype
    np.testing.assert_array_equal(loaded[key], written[key])
  assert loaded["scalar"] == 2.5 and loaded["nested"] == {"t": (1, "x", b"y")}


def test_python2_numpy_pickle_loads(tmp_path):
  images = np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3)
  buffer = io.BytesIO()
  _Py2Pickler(buffer, protocol=2).dump({"data": images, "labels": [7, 9]})
  raw = buffer.getvalue()
  assert b"numpy.core.multiarray\n_reconstruct" in raw
  path = tmp_path / "py2.pickle"
  path.write_bytes(raw)
  with pytest.raises(UnicodeDecodeError):  # as a real Python 2 pickle
    pickle.loads(raw)
  loaded = _read_pickle(path, ("data", "labels"))
  assert loaded["labels"] == [7, 9]
  assert loaded["data"].dtype == np.uint8
  np.testing.assert_array_equal(loaded["data"], images)


def test_a_damaged_pickle_is_a_clear_error(tmp_path):
  path = tmp_path / "cut.pkl"
  path.write_bytes(pickle.dumps({"data": np.zeros(100)}, protocol=2)[:60])
  with pytest.raises(ValueError, match=f"{path} is not a pickle"):
    _read_pickle(path, ("data",))


# A few bytes that ask for 256 MB: bytearray(n), numpy's _reconstruct of a
# large shape (numpy pickles ask for an empty array, then fill it from the
# file) and ndarray(shape) called directly.
_HUGE = 2**28


@pytest.mark.parametrize(
  "raw, message",
  [
    (
      f"c__builtin__\nbytearray\n(I{_HUGE}\ntR.".encode(),
      "bytearray with a int",
    ),
    (
      f"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
      f"(I{_HUGE}\ntS'b'\ntR.".encode(),
      "_reconstruct for an array of shape",
    ),
    (f"cnumpy\nndarray\n((I{_HUGE}\nttR.".encode(), "numpy.ndarray directly"),
  ],
)
def test_a_pickle_cannot_allocate_memory_its_file_does_not_hold(
  tmp_path, raw, message
):
  path = tmp_path / "small.pkl"
  path.write_bytes(raw)
  assert path.stat().st_size < 100
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=rf"{path}.*refused.*{message}"):
      _read_pickle(path, ("data",))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < _HUGE // 16, peak


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
  with (
    open(tmp_path / files["test"], "rb") as f,
    pytest.raises(UnicodeDecodeError),
  ):
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
  (batch,) = take(
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
