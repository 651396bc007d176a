"""export.classify: a person's image folders classified by the pretrained model.

The images are real Omniglot test-split characters (TFDS's own PNGs, read
from the prepared copy) written to files as a person might have them: PNG
as is, colour JPEG, light strokes on black, transparent background, another
size and aspect ratio.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import cli_helpers
from comln_tf.data import _sources
from export import image_folders

EXPORT_DIR = cli_helpers.REPO / "pretrained" / "omniglot" / "1"
SIZE = 28
# Class names of the test's five characters, in their sorted order.
NAMES = ("alpha", "beta", "delta", "epsilon", "gamma")
# Drawings per character: the support image and two queries.
DRAWINGS = 3


@pytest.fixture(scope="module")
def drawings():
  """{class name: [3 PNGs (bytes) by different drawers]} of 5 characters.

  The characters are the first ones of five different alphabets in the
  test split's record order.
  """
  dataset = tfds.load(
    "omniglot",
    split="test",
    decoders={"image": tfds.decode.SkipDecoding()},
    download=False,
  )
  labels, alphabets = [], set()
  for example in dataset.take(50).as_numpy_iterator():
    if example["alphabet"] not in alphabets and len(labels) < len(NAMES):
      alphabets.add(example["alphabet"])
      labels.append(example["label"])
  chosen = tf.constant(labels, tf.int64)
  pngs = {label: [] for label in labels}
  selected = dataset.filter(lambda ex: tf.reduce_any(ex["label"] == chosen))
  for example in selected.as_numpy_iterator():
    pngs[example["label"]].append(example["image"])
  return {name: pngs[label][:DRAWINGS] for name, label in zip(NAMES, labels)}


def training_pixels(png):
  """float32 [28, 28, 1]: the training pipeline's pixels of a TFDS PNG."""
  image = _sources._resize_uint8(tf.io.decode_png(png, channels=1), SIZE)  # pylint: disable=protected-access
  return tf.cast(image, tf.float32).numpy() / 255.0


def grey(png):
  """uint8 [H, W]: a TFDS PNG (grey RGB) as one channel."""
  return tf.io.decode_png(png, channels=1).numpy()[..., 0]


def write(path, image):
  """Writes uint8 [H, W, C] as PNG, or JPEG for a .jpg path."""
  path.parent.mkdir(parents=True, exist_ok=True)
  encode = tf.io.encode_jpeg if path.suffix == ".jpg" else tf.io.encode_png
  tf.io.write_file(str(path), encode(image))


def to_pixels(image):
  return image_folders.to_model_pixels(image, (SIZE, SIZE, 1))


def cropped(image):
  """[H, W, C] without the blank columns its two sides share (symmetric)."""
  inked = np.flatnonzero((image < 255).any(axis=(0, 2)))
  blank = min(inked[0], image.shape[1] - 1 - inked[-1])
  return image[:, blank : image.shape[1] - blank]


def variants(png):
  """{file name: uint8 image}: a drawing as a person's files might hold it."""
  image = grey(png)[..., None]
  ink = np.array([20, 30, 120], np.float32)
  paper = np.array([250, 240, 215], np.float32)
  colour = paper + (ink - paper) * (1 - image / 255.0)
  return {
    "colour.jpg": np.round(colour).astype(np.uint8),
    "inverted.png": 255 - image,
    # Narrower (its blank sides cut) and twice as large.
    "cropped_2x.png": cropped(image).repeat(2, axis=0).repeat(2, axis=1),
    "transparent.png": np.concatenate(
      [np.zeros_like(image), 255 - image], axis=-1
    ),
  }


@pytest.fixture(scope="module")
def folders(drawings, tmp_path_factory):
  """(support, query) folders of the 5 characters, and the true classes.

  Support: drawing 0, in sub-folders or as <class>_1.png, <class>-1.png and
  <class>.png. Queries: drawing 1 of each as TFDS's PNG in a sub-folder
  named after its class; drawing 2 in a variant of `variants` (the last
  character's as a flat file: true class unknown to the command).
  """
  root = tmp_path_factory.mktemp("classify")
  support, query = root / "support", root / "query"
  names = ["alpha/1.png", "beta/a.png", "delta_1.png", "epsilon-1.png"]
  names.append("gamma.png")
  truth = {}
  for i, (name, pngs) in enumerate(drawings.items()):
    (support / names[i]).parent.mkdir(parents=True, exist_ok=True)
    (support / names[i]).write_bytes(pngs[0])
    (query / name).mkdir(parents=True)
    (query / name / "plain.png").write_bytes(pngs[1])
    truth[f"{name}/plain.png"] = name
    variant, image = list(variants(pngs[2]).items())[i % 4]
    file_name = f"{name}/{variant}" if i < 4 else f"{name}_{variant}"
    write(query / file_name, image)
    truth[file_name] = name
  (support / "README.txt").write_text("not an image: skipped")
  return support, query, truth


@pytest.fixture(scope="module")
def signature():
  return image_folders.load_signature(str(EXPORT_DIR))


def test_an_image_of_the_model_size_keeps_its_pixels(drawings, tmp_path):
  image = (training_pixels(drawings["alpha"][0]) * 255).round()
  # At full contrast, as the drawing at its own size: darkest pixel black.
  image[image == image.min()] = 0
  assert image.max() == 255
  write(tmp_path / "small.png", image.astype(np.uint8))
  pixels = to_pixels(image_folders.read_image(tmp_path / "small.png"))
  np.testing.assert_array_equal(pixels, image / np.float32(255))


def test_preprocessing_matches_training_whatever_the_file(drawings):
  png = drawings["beta"][0]
  expected = training_pixels(png)
  image = grey(png)[..., None]
  np.testing.assert_array_equal(to_pixels(image), expected)
  np.testing.assert_array_equal(to_pixels(np.repeat(image, 3, -1)), expected)
  # 16-bit PNG: tf.io.decode_image scales it to 8 bits.
  deep = tf.io.encode_png(image.astype(np.uint16) * 257)
  np.testing.assert_array_equal(
    to_pixels(tf.io.decode_image(deep, expand_animations=False).numpy()),
    expected,
  )
  # Cut blank sides come back as padding.
  narrow = cropped(image)
  assert narrow.shape[1] < 90
  np.testing.assert_array_equal(to_pixels(narrow), expected)
  # Grey strokes on grey paper: levels stretched back.
  dull = np.round(80 + image * (120 / 255)).astype(np.uint8)
  np.testing.assert_array_equal(to_pixels(dull), expected)
  found = {name: to_pixels(v) for name, v in variants(png).items()}
  np.testing.assert_array_equal(found["inverted.png"], expected)
  np.testing.assert_array_equal(found["transparent.png"], expected)
  jpeg = tf.io.decode_jpeg(tf.io.encode_jpeg(variants(png)["colour.jpg"]))
  assert np.abs(to_pixels(jpeg.numpy()) - expected).mean() < 0.02
  assert np.abs(found["cropped_2x.png"] - expected).mean() < 0.02


def test_padding_keeps_the_aspect_ratio():
  # A black 14x14 square in a white 28x56 image: once padded to 56x56 and
  # halved, a 7x7 square from pixel (10, 10) (if it were stretched
  # instead, 14 rows by 7 columns).
  image = np.full((28, 56, 1), 255, np.uint8)
  image[6:20, 20:34] = 0
  rows, cols = np.nonzero(to_pixels(image)[..., 0] < 0.5)
  assert np.ptp(rows) == np.ptp(cols) == 6
  assert rows.min() == cols.min() == 10


def test_read_task_labels_and_preprocesses_the_folders(folders, drawings):
  support, query, truth = folders
  task = image_folders.read_task(str(EXPORT_DIR), str(support), str(query))
  assert task.classes == list(NAMES)
  assert [file.label for file in task.support] == list(NAMES)
  np.testing.assert_array_equal(task.support_labels, np.arange(5))
  expected = [training_pixels(drawings[name][0]) for name in NAMES]
  np.testing.assert_array_equal(task.support_images, np.stack(expected))
  known = {file.name: file.label for file in task.queries}
  assert known == {
    name: (None if "/" not in name else label) for name, label in truth.items()
  }
  plain = [i for i, file in enumerate(task.queries) if "plain" in file.name]
  np.testing.assert_array_equal(
    task.query_images[plain],
    np.stack([training_pixels(drawings[name][1]) for name in NAMES]),
  )


def run_cli(*args):
  return cli_helpers.run("export.classify", args, timeout=300)


def test_classify_prints_the_predictions_and_draws_the_sheet(
  folders, drawings, signature, tmp_path
):
  support, query, truth = folders
  sheet_path = tmp_path / "sheet.png"
  result = run_cli(
    f"--model={EXPORT_DIR}",
    f"--support={support}",
    f"--query={query}",
    f"--sheet={sheet_path}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == (
    "Support: 5 classes: alpha (1), beta (1), delta (1), epsilon (1), gamma (1)"
  )
  rows = [line.split() for line in lines[1:11]]
  predicted = {row[0]: row[1] for row in rows}
  assert set(predicted) == set(truth)
  assert all(0.2 < float(row[2]) <= 1 for row in rows)
  right = {name: predicted[name] == truth[name] for name in truth}
  # The model classifies ~95% of 5-way 1-shot queries right.
  assert sum(right.values()) >= 8, result.stdout
  # The same classes as the model gives on the training pipeline's pixels
  # of the same drawings (the variants' originals).
  names = [row[0] for row in rows]
  reference = image_folders.Task(
    model=image_folders.read_model_info(str(EXPORT_DIR)),
    classes=list(NAMES),
    support=[],
    queries=[],
    support_images=np.stack([training_pixels(drawings[n][0]) for n in NAMES]),
    support_labels=np.arange(5, dtype=np.int64),
    query_images=np.stack(
      [
        training_pixels(drawings[truth[n]][1 if "plain" in n else 2])
        for n in names
      ]
    ),
  )
  _, classes = image_folders.predict(reference, signature)
  agree = sum(NAMES[c] == predicted[n] for c, n in zip(classes, names))
  assert agree >= 9, (classes, result.stdout)
  known = [right[name] for name in truth if "/" in name]
  assert lines[11].startswith(
    f"10 queries; accuracy {sum(known)}/{len(known)} = "
  )
  assert lines[12] == f"Contact sheet: {sheet_path}"
  sheet = tf.io.decode_png(tf.io.read_file(str(sheet_path))).numpy()
  most = max(list(predicted.values()).count(name) for name in NAMES)
  assert sheet.shape == (4 + 5 * 62, 4 + 62 + 12 + most * 62, 3)


def test_a_refusal_of_the_model_is_one_line(folders, signature):
  support, query, _ = folders
  task = image_folders.read_task(str(EXPORT_DIR), str(support), str(query))
  bad = dataclasses.replace(task, query_images=task.query_images * 2)
  with pytest.raises(image_folders.InputError) as raised:
    image_folders.predict(bad, signature)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(
    "the model refused the task: query_images must hold pixels in [0, 1]"
  ), message


def test_without_true_classes_the_summary_counts_the_predictions():
  model = image_folders.ModelInfo("m", (SIZE, SIZE, 1), None, None, None)
  queries = [image_folders.ImageFile(None, name, None) for name in "xyz"]
  task = image_folders.Task(
    model, ["a", "bb"], [], queries, None, None, np.zeros((3, SIZE, SIZE, 1))
  )
  probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  lines = image_folders.report(task, probabilities, np.array([0, 1, 0]))
  assert lines == [
    "Support: 2 classes: a (0), bb (0)",
    "x  a   0.900",
    "y  bb  0.800",
    "z  a   0.600",
    "3 queries; predicted a 2, bb 1.",
  ]


def fake_export(folder, **metadata):
  """An export folder whose metadata says `metadata` (never loaded)."""
  (folder / "assets.extra").mkdir(parents=True)
  (folder / "saved_model.pb").write_bytes(b"")
  info = {"example_shape": [SIZE, SIZE, 1], "tie_init_rows": True}
  info.update(metadata)
  (folder / "assets.extra" / "comln_export.json").write_text(json.dumps(info))
  return folder


def bad_inputs(tmp_path, support, query):
  """{case: (model, support, query, start of the error)}."""
  empty = tmp_path / "empty"
  empty.mkdir()
  one_class = tmp_path / "one_class"
  shutil.copytree(support / "alpha", one_class / "alpha")
  broken = tmp_path / "broken"
  shutil.copytree(support, broken)
  bad_file = broken / "zeta_1.png"
  bad_file.write_bytes(b"not a png")
  fixed = fake_export(tmp_path / "fixed", num_ways=3, tie_init_rows=False)
  limited = fake_export(tmp_path / "limited", max_serving_support=4)
  model = str(EXPORT_DIR)
  return {
    "no model": (tmp_path / "none", support, query, "model folder"),
    "no SavedModel": (empty, support, query, f"{empty} holds no SavedModel"),
    "no support": (model, tmp_path / "none", query, "support folder"),
    "empty support": (model, empty, query, f"support folder {empty} holds"),
    "no query": (model, support, tmp_path / "none", "query folder"),
    "empty query": (model, support, empty, f"query folder {empty} holds no"),
    "one class": (model, one_class, query, "the support set has only one"),
    "undecodable": (model, broken, query, f"cannot decode {bad_file}"),
    "ways": (fixed, support, query, "the model takes exactly 3 classes"),
    "limit": (limited, support, query, "5 support images, more than"),
  }


def test_bad_inputs_fail_with_one_line(folders, tmp_path):
  support, query, _ = folders
  cases = bad_inputs(tmp_path, support, query)
  for case, (model, support_dir, query_dir, start) in cases.items():
    with pytest.raises(image_folders.InputError) as raised:
      image_folders.read_task(str(model), str(support_dir), str(query_dir))
    message = str(raised.value)
    assert message.startswith(start) and "\n" not in message, (case, message)


@pytest.mark.parametrize("case", ["no support", "undecodable"])
def test_the_command_exits_with_the_error_line(folders, tmp_path, case):
  support, query, _ = folders
  model, support_dir, query_dir, start = bad_inputs(tmp_path, support, query)[
    case
  ]
  result = run_cli(
    f"--model={model}", f"--support={support_dir}", f"--query={query_dir}"
  )
  assert result.returncode != 0
  assert result.stdout == ""
  assert (
    result.stderr.strip().splitlines()[-1].startswith(f"classify: {start}")
  ), result.stderr
