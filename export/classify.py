"""Classifies a person's own images with an export, from two folders.

The support folder gives one or more images per class: in a sub-folder per
class (support/alpha/1.png) or directly in the folder with the class as the
file name's prefix, up to the first "_" or "-" (support/alpha_1.png). The
query folder holds the images to classify; queries in sub-folders named
after their true class are scored. Any size and format TensorFlow decodes
(PNG, JPEG, GIF, BMP, WebP), grey or colour, dark on light or light on dark,
of any contrast: images are brought to the model's training pixels, their
aspect ratio kept by padding (see `export.image_folders`). The export's
adapt_and_predict signature runs once; one line per query is printed (file,
predicted class, probability, true class if known), then a summary.

Usage:
  python -m export.classify --model=pretrained/omniglot/1 \
      --support=my_support --query=my_queries [--sheet=sheet.png]
"""

import sys

from absl import app
from absl import flags

from export import image_folders
import launch

_MODEL = flags.DEFINE_string(
  "model",
  None,
  "An export's version folder (written by export.export_model), e.g. "
  "pretrained/omniglot/1.",
)
_SUPPORT = flags.DEFINE_string(
  "support",
  None,
  "Folder of support images: sub-folders named after their class, or files "
  "named <class>_<anything>.png (or <class>-...; the whole name without "
  "its suffix if it has neither). Classes are numbered in sorted order.",
)
_QUERY = flags.DEFINE_string(
  "query",
  None,
  "Folder of images to classify; those in a sub-folder named after their "
  "true class are scored.",
)
_SHEET = flags.DEFINE_string(
  "sheet",
  None,
  "Also write a contact sheet PNG here: one row per class in sorted order; "
  "left of the grey line the class's support images (blue frames), right "
  "of it the queries predicted as that class (green frame: right, red: "
  "wrong, grey: true class unknown). Images are shown as the model got "
  "them, enlarged 2x.",
)
flags.mark_flags_as_required(["model", "support", "query"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"classify: unexpected arguments {argv[1:]}")
  launch.quiet_library_logs()
  try:
    if _SHEET.value:
      image_folders.check_writable(_SHEET.value)
    task = image_folders.read_task(_MODEL.value, _SUPPORT.value, _QUERY.value)
    probabilities, predicted = image_folders.predict(task)
    print("\n".join(image_folders.report(task, probabilities, predicted)))
    if _SHEET.value:
      sheet = image_folders.contact_sheet(task, predicted)
      image_folders.write_png(_SHEET.value, sheet)
      print(f"Contact sheet: {_SHEET.value}")
  except image_folders.InputError as error:
    sys.exit(f"classify: {error}")


if __name__ == "__main__":
  app.run(main)
