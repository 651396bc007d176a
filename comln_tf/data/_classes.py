"""Class sets: the examples of one split, grouped by class."""

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSet:
  """The examples of one split of a dataset, grouped by class.

  The examples of class `c` are `images[offsets[c]:offsets[c + 1]]`, so
  classes may have different numbers of examples.

  Attributes:
      images: the examples, grouped by class: uint8 [n, H, W, C] images
          (pixel values 0..255), or float32 [n, d] feature vectors (the
          `"embeddings"` source).
      offsets: int64 [num_classes + 1], non-decreasing, `offsets[0] == 0`
          and `offsets[-1] == n`.
      class_names: num_classes names, unique within the set.
      dataset: the source the set comes from (used in error messages).
      split: `"train"`, `"validation"` or `"test"`.
      groups: None, or num_classes group names, one per class (Omniglot:
          the alphabet of each character), for episodes whose classes all
          come from one group (`class_sampling="within_alphabet"`).
  """

  images: np.ndarray = dataclasses.field(repr=False)
  offsets: np.ndarray = dataclasses.field(repr=False)
  class_names: tuple = dataclasses.field(repr=False)
  dataset: str
  split: str
  groups: tuple | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.images.dtype not in (np.uint8, np.float32):
      raise ValueError(
        f"images must be uint8 or float32, got {self.images.dtype}"
      )
    if (
      self.offsets.ndim != 1
      or len(self.offsets) != len(self.class_names) + 1
      or self.offsets[0] != 0
      or self.offsets[-1] != len(self.images)
      or np.any(np.diff(self.offsets) < 0)
    ):
      raise ValueError(
        "offsets must be non-decreasing, of length num_classes + 1, "
        "from 0 to the number of images"
      )
    if self.groups is not None and len(self.groups) != len(self.class_names):
      raise ValueError(
        f"groups must name one group per class: got "
        f"{len(self.groups)} for {len(self.class_names)} classes"
      )

  @classmethod
  def from_labels(
    cls,
    images: np.ndarray,
    labels: npt.ArrayLike,
    *,
    dataset: str,
    split: str,
    groups: npt.ArrayLike | None = None,
  ) -> "ClassSet":
    """Groups examples by label.

    Classes are ordered by sorted label; examples keep their order within
    a class, so the set is the same whenever the inputs are.

    Args:
        images: uint8 [n, H, W, C] or float32 [n, d] examples.
        labels: [n] class labels (ints or strings); their string forms
            become the class names.
        dataset: name of the source.
        split: `"train"`, `"validation"` or `"test"`.
        groups: None, or [n] group names of the examples (e.g. the
            alphabet of each Omniglot image); all examples of a class
            must share their group.

    Returns:
        A ClassSet.

    Raises:
        ValueError: a class whose examples name different groups.
    """
    names, inverse = np.unique(np.asarray(labels), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(names))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    class_groups = None
    if groups is not None:
      groups = np.asarray(groups)[order]
      class_groups = tuple(str(group) for group in groups[offsets[:-1]])
      for c, group in enumerate(class_groups):
        if np.any(groups[offsets[c] : offsets[c + 1]] != group):
          raise ValueError(
            f"the examples of class '{names[c]}' belong to "
            f"several groups; a class must have one group"
          )
    return cls(
      np.ascontiguousarray(images[order]),
      offsets,
      tuple(str(name) for name in names),
      dataset,
      split,
      class_groups,
    )

  def group_ids(
    self, min_classes: int = 1
  ) -> tuple[tuple[str, ...], np.ndarray]:
    """Which classes form each group of at least `min_classes` classes.

    Args:
        min_classes: groups with fewer classes are left out.

    Returns:
        (group names, tuple of G str; class_group: int32 [num_classes],
        the index of each class's group in the names, or -1 for a class
        whose group has fewer than `min_classes` classes).

    Raises:
        ValueError: the set has no groups.
    """
    if self.groups is None:
      raise ValueError(
        f"split '{self.split}' of dataset '{self.dataset}' has no "
        f"class groups (alphabets); within-alphabet episodes need a "
        f"source that records them, such as 'omniglot'"
      )
    names, inverse, counts = np.unique(
      np.asarray(self.groups), return_inverse=True, return_counts=True
    )
    kept = counts >= min_classes
    new_index = np.where(kept, np.cumsum(kept) - 1, -1)
    return (
      tuple(str(name) for name in names[kept]),
      new_index[inverse.reshape(-1)].astype(np.int32),
    )

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def counts(self) -> np.ndarray:
    """int64 [num_classes]: number of examples of each class."""
    return np.diff(self.offsets)

  @property
  def example_shape(self) -> tuple[int, ...]:
    """Shape of one example: (H, W, C) for images, (d,) for features."""
    return self.images.shape[1:]

  def class_examples(self, c: int) -> np.ndarray:
    """The examples of class `c`: [counts[c], *example_shape]."""
    return self.images[self.offsets[c] : self.offsets[c + 1]]

  def merged_with(self, other: "ClassSet", split: str) -> "ClassSet":
    """This set's classes, then `other`'s, as one set named `split`.

    Args:
        other: a ClassSet with examples of the same shape and dtype and
            no class name in common with this one.
        split: the name of the merged set.

    Returns:
        A ClassSet with num_classes + other.num_classes classes.

    Raises:
        ValueError: if the examples differ in shape or dtype, or the sets
            share a class name.
    """
    if (
      self.example_shape != other.example_shape
      or self.images.dtype != other.images.dtype
    ):
      raise ValueError(
        f"cannot merge split '{self.split}' ({self.images.dtype} "
        f"{self.example_shape}) with split '{other.split}' "
        f"({other.images.dtype} {other.example_shape})"
      )
    shared = sorted(set(self.class_names) & set(other.class_names))
    if shared:
      raise ValueError(
        f"cannot merge splits '{self.split}' and '{other.split}': "
        f"they share classes (e.g. {shared[:3]})"
      )
    offsets = np.concatenate(
      [self.offsets[:-1], other.offsets + len(self.images)]
    )
    groups = None
    if self.groups is not None and other.groups is not None:
      groups = self.groups + other.groups
    return ClassSet(
      np.concatenate([self.images, other.images]),
      offsets.astype(np.int64),
      self.class_names + other.class_names,
      self.dataset,
      split,
      groups,
    )

  def check_square_images(self, option: str) -> None:
    """Raises ValueError unless the examples are square images [H, H, C].

    Args:
        option: the argument that needs them, named in the message.
    """
    shape = tuple(self.example_shape)
    if len(shape) != 3 or shape[0] != shape[1]:
      raise ValueError(
        f"{option} needs square images [H, H, C]; split "
        f"'{self.split}' of dataset '{self.dataset}' has examples of "
        f"shape {shape}"
      )

  def with_rotations(self) -> "ClassSet":
    """Adds 90, 180 and 270 degree rotations of every class as new classes.

    Class `r * num_classes + c` of the result is class `c` rotated by
    `90 * r` degrees counter-clockwise (r = 0 is the original class).
    A rotated class's group is its group's rotation
    ("<group>/rot<degrees>"), so a within-group episode keeps one
    script in one orientation.

    Returns:
        A ClassSet with 4 * num_classes classes.

    Raises:
        ValueError: if the examples are not square images.
    """
    self.check_square_images("rotations")
    n = len(self.images)
    images = np.concatenate(
      [np.rot90(self.images, r, axes=(1, 2)) for r in range(4)]
    )
    offsets = np.concatenate(
      [self.offsets[:-1] + r * n for r in range(4)] + [[4 * n]]
    )
    names = tuple(
      f"{name}/rot{90 * r}" for r in range(4) for name in self.class_names
    )
    groups = None
    if self.groups is not None:
      groups = tuple(
        f"{group}/rot{90 * r}" for r in range(4) for group in self.groups
      )
    return ClassSet(
      images, offsets.astype(np.int64), names, self.dataset, self.split, groups
    )

  @functools.cached_property
  def tensors(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(images, offsets, counts) as CPU tensors, made once per set.

    Input pipelines capture these instead of converting the arrays again
    for every dataset built from the set.
    """
    with tf.device("/cpu:0"):
      return (
        tf.constant(self.images),
        tf.constant(self.offsets),
        tf.constant(self.counts),
      )


class Splits(NamedTuple):
  """The three disjoint class sets of a dataset."""

  train: ClassSet
  validation: ClassSet
  test: ClassSet
