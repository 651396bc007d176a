"""Few-shot episode data: class splits and tf.data pipelines of episodes.

Public API:
  load_splits: the disjoint train / validation / test classes of a source.
  available_sources: names of the sources load_splits knows.
  OMNIGLOT_VALIDATION_ALPHABETS: background alphabets held out for validation.
  OMNIGLOT_CHARACTER_SPLIT: train / validation / test character counts of
    the "omniglot_characters" and "omniglot_vinyals" sources.
  VINYALS_VALIDATION_ALPHABETS, VINYALS_TEST_ALPHABETS: the alphabets of
    "omniglot_vinyals"'s validation and test classes.
  ClassSet, Splits: examples grouped by class, and the three splits.
  meta_batches: endless, seeded stream of meta-batches of N-way k-shot
    q-query episodes (resumable at any batch, sliceable per replica).
  distributed_meta_batches: one worker's stream, for
    strategy.distribute_datasets_from_function.
  eval_episodes: a fixed, seeded, finite set of evaluation episodes.
  check_episode_args: validate ways / shots / queries against a class set.
  CLASS_SAMPLING: how episodes draw their classes ("uniform", or
    "within_alphabet": all N classes from one alphabet, as Lake et al.).
  AffineDistortion, affine_transform_images: random affine distortions of
    training images (Koch et al. 2015).

Example:
  splits = load_splits("omniglot", rotations=True)
  train = meta_batches(splits.train, ways=5, shots=1, queries=15,
                       batch_size=16, seed=0)
  test = eval_episodes(splits.test, ways=5, shots=1, queries=15, seed=1)
"""

from comln_tf.data._classes import ClassSet
from comln_tf.data._classes import Splits
from comln_tf.data._episodes import AffineDistortion
from comln_tf.data._episodes import CLASS_SAMPLING
from comln_tf.data._episodes import affine_transform_images
from comln_tf.data._episodes import check_episode_args
from comln_tf.data._episodes import distributed_meta_batches
from comln_tf.data._episodes import eval_episodes
from comln_tf.data._episodes import meta_batches
from comln_tf.data._sources import OMNIGLOT_CHARACTER_SPLIT
from comln_tf.data._sources import OMNIGLOT_VALIDATION_ALPHABETS
from comln_tf.data._sources import VINYALS_TEST_ALPHABETS
from comln_tf.data._sources import VINYALS_VALIDATION_ALPHABETS
from comln_tf.data._sources import available_sources
from comln_tf.data._sources import load_splits

__all__ = [
  "AffineDistortion",
  "CLASS_SAMPLING",
  "affine_transform_images",
  "ClassSet",
  "Splits",
  "check_episode_args",
  "distributed_meta_batches",
  "eval_episodes",
  "meta_batches",
  "OMNIGLOT_CHARACTER_SPLIT",
  "OMNIGLOT_VALIDATION_ALPHABETS",
  "VINYALS_TEST_ALPHABETS",
  "VINYALS_VALIDATION_ALPHABETS",
  "available_sources",
  "load_splits",
]
