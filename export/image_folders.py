"""Few-shot classification of a person's own image folders by an export.

The logic of `python -m export.classify` (which only adds the flags): a
support folder and a query folder of image files become one task of an
export's adapt_and_predict signature, sent once; the result is printed as
one line per query and can be drawn as a contact sheet.

Support folder: the class of an image is the name of its sub-folder
(`DIR/<class>/*.png`) or, for a file directly in the folder, the part of its
name before the first "_" or "-" (`alpha_1.png` and `alpha-2.jpg` are of
class `alpha`; `beta.png` of class `beta`). Classes are numbered in sorted
order of their names. Query folder: image files, directly in it (true class
unknown) or in sub-folders named after their true class. Files and folders
whose names start with "." are skipped, and so are files without an image
suffix (`IMAGE_SUFFIXES`); folders below the first level are not read.

Images are read by `tf.io.decode_image` (PNG, JPEG, GIF (its first frame),
BMP, WebP, JPEG XL; any size, 8 or 16 bits, grey, grey + alpha, RGB or
RGBA) and brought to the pixels the model was trained on (see
`to_model_pixels`): transparent parts are composited onto white; for a
one-channel model (Omniglot) the image is made grey, inverted if its
background is dark (a border whose median is below mid-grey) and its
levels stretched to a white background and a black darkest pixel, since
Omniglot's training images are black strokes on white; the image is padded
with its background colour to the model's aspect ratio (so its own aspect
ratio is kept), then resized to the model's `example_shape` as in training
(bilinear with antialiasing, rounded to whole grey levels) and scaled into
[0, 1].

Loading the export needs TensorFlow only, not comln_tf.
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import pathlib
import re

import numpy as np
import tensorflow as tf

# Files read as images, by their suffix in lower case.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".jxl", ".png", ".webp")

METADATA_PATH = pathlib.Path("assets.extra") / "comln_export.json"
SIGNATURE = "adapt_and_predict"
# The metadata's limits of one request: max_serving_<kind>.
LIMITS = ("support", "queries")

# The class of a file directly in the support folder: its name up to the
# first of these characters.
_CLASS_END = re.compile(r"[_-]")

# Weights of tf.image.rgb_to_grayscale (ITU-R BT.601 luma).
_LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)

# Contact sheet: images enlarged _SCALE times in a frame _FRAME pixels wide,
# _PAD pixels apart; a gap _GAP pixels wide with a grey line between the
# support images and the queries of a row.
_SCALE, _FRAME, _PAD, _GAP, _LINE_WIDTH = 2, 1, 4, 12, 2
_WHITE = (255, 255, 255)
_LINE_COLOUR = (170, 170, 170)
SUPPORT_COLOUR = (40, 90, 220)
RIGHT_COLOUR = (30, 160, 60)
WRONG_COLOUR = (220, 40, 40)
UNKNOWN_COLOUR = (128, 128, 128)


class InputError(ValueError):
  """A problem with the folders, their files or the model, told in one line."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """An image file of the support or query folder.

  Attributes:
    path: the file.
    name: its path relative to its folder, as printed.
    label: its class (support) or its true class (query), None if unknown.
  """

  path: pathlib.Path
  name: str
  label: str | None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the export's metadata says about the tasks it takes.

  Attributes:
    export_dir: the version folder of the export.
    example_shape: (height, width, channels) of its images.
    num_ways: the number of classes it needs, None if any N >= 2.
    max_support: the most support images of one request, None if unbounded.
    max_queries: the most query images of one request, None if unbounded.
  """

  export_dir: str
  example_shape: tuple[int, int, int]
  num_ways: int | None
  max_support: int | None
  max_queries: int | None


@dataclasses.dataclass(frozen=True)
class Task:
  """A task read from the folders, ready for the model.

  Attributes:
    model: the export's ModelInfo.
    classes: the class names, sorted; class i is label i.
    support: the support files, in the order of `support_images`.
    queries: the query files, in the order of `query_images`.
    support_images: float32 [M, H, W, C] in [0, 1].
    support_labels: int64 [M], indices into `classes`.
    query_images: float32 [Q, H, W, C] in [0, 1].
  """

  model: ModelInfo
  classes: list[str]
  support: list[ImageFile]
  queries: list[ImageFile]
  support_images: np.ndarray
  support_labels: np.ndarray
  query_images: np.ndarray


def read_model_info(export_dir: str) -> ModelInfo:
  """Checks that `export_dir` holds an export and reads its metadata.

  Args:
    export_dir: a version folder written by `export.saved_model`.

  Returns:
    Its ModelInfo.

  Raises:
    InputError: no such folder, no SavedModel in it, or no readable
      metadata file.
  """
  folder = pathlib.Path(export_dir)
  if not folder.is_dir():
    raise InputError(f"model folder {export_dir} does not exist.")
  if not tf.saved_model.contains_saved_model(export_dir):
    raise InputError(
      f"{export_dir} holds no SavedModel (saved_model.pb): give an export's "
      "version folder, such as pretrained/omniglot/1."
    )
  try:
    metadata = json.loads((folder / METADATA_PATH).read_text())
    shape = tuple(int(size) for size in metadata["example_shape"])
    num_ways = None if metadata.get("tie_init_rows") else metadata["num_ways"]
    limits = [metadata.get(f"max_serving_{kind}") for kind in LIMITS]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    raise InputError(
      f"cannot read {folder / METADATA_PATH} (written with every export): "
      f"{type(error).__name__}: {error}"
    ) from None
  if len(shape) != 3 or shape[2] not in (1, 3):
    raise InputError(
      f"{export_dir} takes examples of shape {list(shape)}, not images of "
      "1 or 3 channels."
    )
  return ModelInfo(
    export_dir=export_dir,
    example_shape=(shape[0], shape[1], shape[2]),
    num_ways=num_ways,
    max_support=limits[0],
    max_queries=limits[1],
  )


def class_of(file_name: str) -> str:
  """The class of a file directly in the support folder, from its name.

  Args:
    file_name: e.g. "alpha_1.png", "alpha-2.jpg" or "beta.png".

  Returns:
    The name up to the first "_" or "-" ("alpha"), or the whole name
    without its suffix if it has neither ("beta").

  Raises:
    InputError: the name starts with "_" or "-".
  """
  stem = pathlib.Path(file_name).stem
  name = _CLASS_END.split(stem, maxsplit=1)[0]
  if not name:
    raise InputError(
      f"cannot tell the class of support image {file_name}: name it "
      "<class>_<n>.png or put it in a sub-folder named after its class."
    )
  return name


def _visible(paths: Sequence[pathlib.Path]) -> list[pathlib.Path]:
  """`paths` without hidden ones (names starting with "."), sorted."""
  return sorted(path for path in paths if not path.name.startswith("."))


def _is_image(path: pathlib.Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _sub_folder_images(folder: pathlib.Path, kind: str) -> list[ImageFile]:
  """The image files of a sub-folder, labelled with its name."""
  files = [path for path in _visible(list(folder.iterdir())) if _is_image(path)]
  if not files and kind == "support":
    raise InputError(
      f"support class folder {folder} holds no image files "
      f"({', '.join(IMAGE_SUFFIXES)})."
    )
  return [
    ImageFile(path, f"{folder.name}/{path.name}", folder.name) for path in files
  ]


def list_images(folder: str, kind: str) -> list[ImageFile]:
  """The image files of a folder and of its sub-folders, labelled.

  Args:
    folder: the support or query folder.
    kind: "support" or "query"; support files directly in `folder` get
      the class of their name (`class_of`), query files no label.

  Returns:
    The files, sorted by name within each sub-folder; files of a
    sub-folder get its name as label.

  Raises:
    InputError: the folder does not exist or holds no images, or a
      sub-folder of the support folder holds none.
  """
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise InputError(f"{kind} folder {folder} does not exist.")
  try:
    files = []
    for entry in _visible(list(root.iterdir())):
      if entry.is_dir():
        files += _sub_folder_images(entry, kind)
      elif _is_image(entry):
        label = class_of(entry.name) if kind == "support" else None
        files.append(ImageFile(entry, entry.name, label))
  except OSError as error:
    raise InputError(
      f"cannot read {kind} folder {error.filename}: {error.strerror}."
    ) from None
  if not files:
    raise InputError(
      f"{kind} folder {folder} holds no image files "
      f"({', '.join(IMAGE_SUFFIXES)})."
    )
  return files


def check_task(
  model: ModelInfo, classes: Sequence[str], num_support: int, num_queries: int
) -> None:
  """Checks a task's sizes against what the model takes.

  Args:
    model: the export's ModelInfo.
    classes: the class names of the support set.
    num_support: how many support images.
    num_queries: how many query images.

  Raises:
    InputError: fewer than two classes, another number of classes than a
      model with a fixed number takes, or more images than its limits.
  """
  if len(classes) < 2:
    raise InputError(
      f"the support set has only one class ({classes[0]}): give at least "
      "two, as sub-folders or file-name prefixes (<class>_<n>.png)."
    )
  if model.num_ways is not None and len(classes) != model.num_ways:
    raise InputError(
      f"the model takes exactly {model.num_ways} classes; the support set "
      f"has {len(classes)} ({', '.join(classes)})."
    )
  for count, limit, what, name in (
    (num_support, model.max_support, "support", "max_serving_support"),
    (num_queries, model.max_queries, "query", "max_serving_queries"),
  ):
    if limit is not None and count > limit:
      raise InputError(
        f"{count} {what} images, more than the model takes in one request "
        f"({name}={limit})."
      )


def read_image(path: pathlib.Path) -> np.ndarray:
  """Decodes an image file.

  Args:
    path: the file.

  Returns:
    uint8 [H, W, C], C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA);
    the first frame of an animation.

  Raises:
    InputError: the file cannot be read or decoded.
  """
  name = str(path)
  try:
    contents = path.read_bytes()
    image = tf.io.decode_image(
      contents, channels=0, dtype=tf.uint8, expand_animations=False
    )
    pixels = image.numpy()
  except OSError as error:
    raise InputError(f"cannot read {name}: {error.strerror}.") from None
  except tf.errors.OpError as error:
    raise InputError(
      f"cannot decode {name} as an image: {error_line(error)}"
    ) from None
  if pixels.size == 0:
    raise InputError(f"cannot decode {name} as an image: it has no pixels.")
  return pixels


def _flatten_alpha(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [H, W, 1 or 3], transparency onto white."""
  pixels = image.astype(np.float32)
  if image.shape[-1] in (2, 4):
    alpha = pixels[..., -1:] / 255.0
    pixels = pixels[..., :-1] * alpha + 255.0 * (1.0 - alpha)
  return pixels


def _border(pixels: np.ndarray) -> np.ndarray:
  """The pixels of the outermost rows and columns of [H, W, C], [n, C]."""
  return np.concatenate(
    [pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]], axis=0
  )


def _dark_on_white(pixels: np.ndarray) -> np.ndarray:
  """Grey [H, W, 1] with its background at 255 and its darkest pixel at 0.

  The background is the median of the border: an image whose border is
  darker than mid-grey is inverted first. Levels are then stretched
  linearly (rounded to whole levels), as Omniglot's images are black
  strokes on white; an image of one level is left as it is.
  """
  if np.median(_border(pixels)) < 128:
    pixels = 255.0 - pixels
  background, darkest = np.median(_border(pixels)), pixels.min()
  if background <= darkest:
    return pixels
  stretched = (pixels - darkest) * (255.0 / (background - darkest))
  return np.round(np.clip(stretched, 0.0, 255.0))


def _pad_to_aspect(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pads [h, w, C] evenly with its border's median to a height:width shape."""
  h, w = pixels.shape[:2]
  # The smallest padded size of the wanted aspect ratio holding the image.
  new_h = max(h, int(np.ceil(w * height / width)))
  new_w = max(w, int(np.ceil(h * width / height)))
  top, left = (new_h - h) // 2, (new_w - w) // 2
  fill = np.round(np.median(_border(pixels), axis=0))
  padded = np.empty((new_h, new_w, pixels.shape[2]), np.float32)
  padded[...] = fill
  padded[top : top + h, left : left + w] = pixels
  return padded


def to_model_pixels(
  image: np.ndarray, example_shape: Sequence[int]
) -> np.ndarray:
  """An image brought to the pixels of the model's training images.

  Transparent parts are composited onto white. For a one-channel model the
  image is made grey (tf.image.rgb_to_grayscale's weights), inverted if
  its border's median is darker than mid-grey, and stretched to a white
  background (the border's median) and a black darkest pixel, as
  Omniglot's training images, black strokes on white; a three-channel
  model gets RGB (grey repeated) as it is. The image is then padded evenly
  with its border's median colour to the model's aspect ratio, so that
  the resize keeps its own, and resized as training resized
  (`tf.image.resize`, bilinear with antialiasing, rounded to whole levels
  of 0..255).

  Args:
    image: uint8 [H, W, C], C in 1..4, as `read_image` returns.
    example_shape: the model's (height, width, channels), channels 1 or 3.

  Returns:
    float32 [height, width, channels] in [0, 1].
  """
  height, width, channels = example_shape
  pixels = _flatten_alpha(image)
  if channels == 1:
    if pixels.shape[-1] == 3:
      pixels = (pixels @ _LUMA)[..., None]
    pixels = _dark_on_white(np.round(pixels))
  else:
    pixels = np.round(np.broadcast_to(pixels, pixels.shape[:2] + (3,)))
  pixels = _pad_to_aspect(pixels, height, width)
  resized = tf.image.resize(
    pixels, [height, width], method="bilinear", antialias=True
  ).numpy()
  return (np.round(np.clip(resized, 0.0, 255.0)) / 255.0).astype(np.float32)


def load_images(
  files: Sequence[ImageFile], example_shape: Sequence[int]
) -> np.ndarray:
  """The model's pixels of `files` (`read_image`, `to_model_pixels`).

  Returns:
    float32 [len(files), *example_shape] in [0, 1].

  Raises:
    InputError: a file cannot be read or decoded.
  """
  return np.stack(
    [to_model_pixels(read_image(file.path), example_shape) for file in files]
  )


def read_task(export_dir: str, support_dir: str, query_dir: str) -> Task:
  """Checks the model and the folders, and reads the task's images.

  Everything is checked before any image is decoded, and the model is not
  loaded.

  Args:
    export_dir: the export's version folder.
    support_dir: the support folder.
    query_dir: the query folder.

  Returns:
    The Task.

  Raises:
    InputError: on the first problem found.
  """
  model = read_model_info(export_dir)
  support = list_images(support_dir, "support")
  queries = list_images(query_dir, "query")
  classes = sorted({str(file.label) for file in support})
  check_task(model, classes, len(support), len(queries))
  index = {name: i for i, name in enumerate(classes)}
  return Task(
    model=model,
    classes=classes,
    support=support,
    queries=queries,
    support_images=load_images(support, model.example_shape),
    support_labels=np.array(
      [index[str(file.label)] for file in support], np.int64
    ),
    query_images=load_images(queries, model.example_shape),
  )


def error_line(error: tf.errors.OpError) -> str:
  """A TensorFlow error's message as one line.

  A failed check of the SavedModel ("assertion failed: [message] [data]")
  gives "message data"; another error its message's first line.
  """
  lines = [line.strip() for line in error.message.splitlines()]
  for line in lines:
    if line.startswith("assertion failed:"):
      text = line[len("assertion failed:") :].split("[[", 1)[0].strip()
      return text.removeprefix("[").removesuffix("]").replace("] [", " ")
  first = next((line for line in lines if line), type(error).__name__)
  # Without where it ran: "{{function_node ...}} ... [Op:DecodeImage]".
  return re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\]$", "", first)


def load_signature(export_dir: str) -> Callable[..., dict[str, tf.Tensor]]:
  """The adapt_and_predict signature of an export (tf.saved_model.load).

  Raises:
    InputError: the SavedModel cannot be loaded or has no such signature.
  """
  try:
    signatures = tf.saved_model.load(export_dir).signatures
  except (tf.errors.OpError, OSError, ValueError) as error:
    message = (
      error_line(error) if isinstance(error, tf.errors.OpError) else error
    )
    raise InputError(
      f"cannot load the SavedModel {export_dir}: {message}"
    ) from None
  if SIGNATURE not in signatures:
    raise InputError(f"{export_dir} has no {SIGNATURE} signature.")
  return signatures[SIGNATURE]


def predict(
  task: Task, signature: Callable[..., dict[str, tf.Tensor]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Runs the export's adapt_and_predict signature once on the task.

  Args:
    task: the Task.
    signature: the signature; default `load_signature` of the task's model.

  Returns:
    (probabilities float32 [Q, N], classes int64 [Q]).

  Raises:
    InputError: the SavedModel cannot be loaded, or it refuses the task
      (its message, in one line).
  """
  if signature is None:
    signature = load_signature(task.model.export_dir)
  try:
    outputs = signature(
      support_images=tf.constant(task.support_images),
      support_labels=tf.constant(task.support_labels, tf.int64),
      query_images=tf.constant(task.query_images),
    )
  except tf.errors.OpError as error:
    raise InputError(
      f"the model refused the task: {error_line(error)}"
    ) from None
  return outputs["probabilities"].numpy(), outputs["classes"].numpy()


def report(
  task: Task, probabilities: np.ndarray, predicted: np.ndarray
) -> list[str]:
  """The lines printed: the support set, one per query, a summary.

  Args:
    task: the Task.
    probabilities: float32 [Q, N], as `predict` returns.
    predicted: int64 [Q], the predicted classes.

  Returns:
    The lines, without newlines.
  """
  counts = [
    sum(file.label == name for file in task.support) for name in task.classes
  ]
  lines = [
    f"Support: {len(task.classes)} classes: "
    + ", ".join(f"{name} ({n})" for name, n in zip(task.classes, counts))
  ]
  names = [task.classes[i] for i in predicted]
  name_width = max(len(file.name) for file in task.queries)
  class_width = max(len(name) for name in names)
  right = known = 0
  for file, name, row, i in zip(task.queries, names, probabilities, predicted):
    line = f"{file.name:<{name_width}}  {name:<{class_width}}  {row[i]:.3f}"
    if file.label is not None:
      known += 1
      right += file.label == name
      wrong = "" if file.label == name else ", wrong"
      line += f"  (true: {file.label}{wrong})"
    lines.append(line.rstrip())
  summary = f"{len(task.queries)} queries"
  if known:
    summary += (
      f"; accuracy {right}/{known} = {100 * right / known:.1f}% (queries of "
      "known class)"
    )
  else:
    summary += "; predicted " + ", ".join(
      f"{name} {names.count(name)}" for name in task.classes
    )
  return lines + [summary + "."]


def sheet_shape(
  support_counts: Sequence[int],
  query_counts: Sequence[int],
  example_shape: Sequence[int],
) -> tuple[int, int]:
  """(height, width) in pixels of the contact sheet of `contact_sheet`.

  Args:
    support_counts: support images per class.
    query_counts: queries predicted as each class.
    example_shape: the model's (height, width, channels).
  """
  cell_h, cell_w = (size * _SCALE + 2 * _FRAME for size in example_shape[:2])
  height = _PAD + len(support_counts) * (cell_h + _PAD)
  width = (
    _PAD
    + max(support_counts) * (cell_w + _PAD)
    + _GAP
    + max(query_counts) * (cell_w + _PAD)
  )
  return height, width


def _framed(image: np.ndarray, colour: Sequence[int]) -> np.ndarray:
  """float [H, W, C] in [0, 1] -> uint8 RGB, enlarged, in a frame."""
  pixels = np.round(255 * np.clip(image, 0.0, 1.0)).astype(np.uint8)
  pixels = np.broadcast_to(pixels, pixels.shape[:2] + (3,))
  pixels = pixels.repeat(_SCALE, axis=0).repeat(_SCALE, axis=1)
  framed = np.empty(
    (pixels.shape[0] + 2 * _FRAME, pixels.shape[1] + 2 * _FRAME, 3), np.uint8
  )
  framed[...] = colour
  framed[_FRAME:-_FRAME, _FRAME:-_FRAME] = pixels
  return framed


def _query_colour(
  task: Task, query: int, predicted: np.ndarray
) -> tuple[int, int, int]:
  """The frame colour of a query: right, wrong or true class unknown."""
  label = task.queries[query].label
  if label is None:
    return UNKNOWN_COLOUR
  right = label == task.classes[predicted[query]]
  return RIGHT_COLOUR if right else WRONG_COLOUR


def contact_sheet(task: Task, predicted: np.ndarray) -> np.ndarray:
  """A picture of the result: one row per class, in the order of `classes`.

  A row holds the class's support images (blue frames), a gap with a grey
  line, then the queries predicted as that class (green frame: its
  sub-folder names this class; red: another; grey: true class unknown).
  Images are the pixels the model was given, enlarged `_SCALE` times.

  Args:
    task: the Task.
    predicted: int64 [Q], the predicted classes.

  Returns:
    uint8 [height, width, 3] of `sheet_shape`.
  """
  rows = range(len(task.classes))
  supports = [np.flatnonzero(task.support_labels == c) for c in rows]
  queries = [np.flatnonzero(predicted == c) for c in rows]
  example_shape = task.model.example_shape
  height, width = sheet_shape(
    [len(s) for s in supports], [len(q) for q in queries], example_shape
  )
  sheet = np.empty((height, width, 3), np.uint8)
  sheet[...] = _WHITE
  cell_h, cell_w = (size * _SCALE + 2 * _FRAME for size in example_shape[:2])
  gap_x = _PAD + max(len(s) for s in supports) * (cell_w + _PAD)
  line_x = gap_x + (_GAP - _LINE_WIDTH) // 2
  sheet[:, line_x : line_x + _LINE_WIDTH] = _LINE_COLOUR
  pitch = cell_w + _PAD
  for row in rows:
    y = _PAD + row * (cell_h + _PAD)
    for n, i in enumerate(supports[row]):
      x = _PAD + n * pitch
      cell = _framed(task.support_images[i], SUPPORT_COLOUR)
      sheet[y : y + cell_h, x : x + cell_w] = cell
    for n, i in enumerate(queries[row]):
      x = gap_x + _GAP + n * pitch
      cell = _framed(
        task.query_images[i], _query_colour(task, int(i), predicted)
      )
      sheet[y : y + cell_h, x : x + cell_w] = cell
  return sheet


def write_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] as a PNG file (tf.io.encode_png).

  Raises:
    InputError: the file cannot be written.
  """
  try:
    tf.io.write_file(path, tf.io.encode_png(image))
  except tf.errors.OpError as error:
    raise InputError(f"cannot write {path}: {error_line(error)}") from None


def check_writable(path: str) -> None:
  """Fails early if the folder of an output file does not exist.

  Raises:
    InputError: it does not.
  """
  folder = pathlib.Path(path).parent
  if not folder.is_dir():
    raise InputError(f"cannot write {path}: folder {folder} does not exist.")
