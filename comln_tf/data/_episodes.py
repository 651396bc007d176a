"""N-way k-shot q-query episodes as tf.data pipelines.

Episode i of the stream with seed s is a pure function of (s, i): it is
drawn with stateless Philox random ops keyed by [s, i]. Meta-batch j holds
episodes j*B .. j*B + B - 1, so a stream can start at any meta-batch, and
replicas can each build their own slice of every meta-batch, without any
shared random state.
"""

import numpy as np
import tensorflow as tf

# A fixed algorithm: "auto_select" may pick a different one per device, and
# the episodes must be identical on every machine.
_RNG_ALG = "philox"


def check_int(name, value, minimum):
    """Raises ValueError unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}")


def check_episode_args(class_set, ways, shots, queries):
    """Checks that `class_set` can make `ways`-way episodes.

    Args:
        class_set: a ClassSet.
        ways: classes per episode (N).
        shots: support examples per class (k).
        queries: query examples per class (q).

    Raises:
        ValueError: if an argument is not a positive integer, if `ways` is
            larger than the number of classes, or if `shots + queries` is
            larger than the number of examples of some class.
    """
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        check_int(name, value, 1)
    where = f"split '{class_set.split}' of dataset '{class_set.dataset}'"
    if ways > class_set.num_classes:
        raise ValueError(
            f"ways={ways} is larger than the {class_set.num_classes} classes "
            f"of {where}")
    counts = class_set.counts
    smallest = int(np.argmin(counts))
    if shots + queries > counts[smallest]:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} is "
            f"larger than the {counts[smallest]} examples of class "
            f"'{class_set.class_names[smallest]}' in {where}")


def _episode_fn(class_set, ways, shots, queries, seed, rotate_classes=False):
    """Returns `episode(index)`: int64 index -> one unbatched episode dict."""
    images, offsets, counts = class_set.tensors
    num_classes = class_set.num_classes
    max_count = int(np.max(class_set.counts))
    example_shape = list(class_set.example_shape)
    positions = tf.range(max_count, dtype=tf.int64)
    seed = tf.constant(seed, tf.int64)
    # Class-major order: label n's examples are rows n*shots .. n*shots+shots-1.
    support_labels = tf.repeat(tf.range(ways, dtype=tf.int32), shots)
    query_labels = tf.repeat(tf.range(ways, dtype=tf.int32), queries)

    def to_float(examples):
        if examples.dtype == tf.uint8:
            return tf.cast(examples, tf.float32) / 255.0
        return examples

    def episode(index):
        class_key, example_key = tf.unstack(
            tf.random.split(tf.stack([seed, index]), 2, alg=_RNG_ALG))
        # The `ways` largest of i.i.d. uniform noise are a uniformly random
        # ordered subset of the classes, so giving label n to the n-th one is
        # a random class -> label assignment.
        class_noise = tf.random.stateless_uniform(
            [num_classes], class_key, alg=_RNG_ALG)
        classes = tf.math.top_k(class_noise, ways).indices
        # The same trick picks shots + queries distinct examples per class;
        # positions past a class's example count get noise -1 so they are
        # never among the largest (check_episode_args ensures enough remain).
        noise = tf.random.stateless_uniform(
            [ways, max_count], example_key, alg=_RNG_ALG)
        valid = positions[None, :] < tf.gather(counts, classes)[:, None]
        noise = tf.where(valid, noise, -1.0)
        picks = tf.cast(tf.math.top_k(noise, shots + queries).indices, tf.int64)
        picks += tf.gather(offsets, classes)[:, None]
        examples = tf.gather(images, picks)  # [ways, shots + queries, ...]
        if rotate_classes:
            # Its own key, folded from the class key, so that the classes
            # and examples drawn are those of the unrotated episode.
            rotation_key = tf.random.experimental.stateless_fold_in(
                class_key, 1, alg=_RNG_ALG)
            turns = tf.random.stateless_uniform(
                [ways], rotation_key, minval=0, maxval=4, dtype=tf.int32,
                alg=_RNG_ALG)
            # All four rotations of every class, then each class's own:
            # [ways, 4, shots + queries, H, H, C] -> [ways, shots + queries,
            # H, H, C]. Counter-clockwise, as `ClassSet.with_rotations`.
            flat = tf.reshape(examples, [-1, *example_shape])
            rotations = tf.stack(
                [tf.reshape(tf.image.rot90(flat, k), examples.shape)
                 for k in range(4)], axis=1)
            examples = tf.gather(rotations, turns, batch_dims=1)
        return {
            "support_images": to_float(
                tf.reshape(examples[:, :shots], [-1, *example_shape])),
            "support_labels": support_labels,
            "query_images": to_float(
                tf.reshape(examples[:, shots:], [-1, *example_shape])),
            "query_labels": query_labels,
        }

    return episode


def _stream(class_set, *, ways, shots, queries, seed, batch_size,
            start_batch, replica_ids, num_replicas):
    """Meta-batch slices of `replica_ids`, in order, from `start_batch` on.

    For each global meta-batch j = start_batch, start_batch + 1, ..., yields
    one batch of B/R episodes for each replica r in `replica_ids`: episodes
    j*B + r*B/R .. j*B + (r+1)*B/R - 1.
    """
    check_episode_args(class_set, ways, shots, queries)
    check_int("batch_size", batch_size, 1)
    check_int("num_replicas", num_replicas, 1)
    check_int("start_batch", start_batch, 0)
    if batch_size % num_replicas:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"num_replicas={num_replicas}")
    per_replica = batch_size // num_replicas
    for r in replica_ids:
        if not 0 <= r < num_replicas:
            raise ValueError(
                f"replica_id={r} is not in [0, num_replicas={num_replicas})")
    # Positions, within a global meta-batch, of the episodes these replicas
    # take, in the order they are yielded.
    within = tf.constant([r * per_replica + t
                          for r in replica_ids for t in range(per_replica)],
                         tf.int64)
    indices = (tf.data.Dataset.counter(start_batch)
               .map(lambda j: j * batch_size + within)
               .unbatch())
    episode = _episode_fn(class_set, ways, shots, queries, seed)
    return (indices
            .map(episode, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .batch(per_replica, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def meta_batches(class_set, *, ways, shots, queries, batch_size, seed,
                 start_batch=0, replica_id=0, num_replicas=1):
    """An endless stream of meta-batches of episodes.

    Meta-batch j holds episodes j*B .. j*B + B - 1 (B = `batch_size`), and
    episode i depends only on (`seed`, i). Starting at `start_batch=k` gives
    exactly what skipping k meta-batches of the stream from 0 gives, so a
    run resumed at step k sees the batches an uninterrupted run sees.

    With `num_replicas=R`, the stream holds only replica `replica_id`'s part
    of every global meta-batch: its B/R episodes j*B + r*B/R ..
    j*B + (r+1)*B/R - 1. The R replica streams together hold each episode of
    the single-replica stream exactly once.

    Args:
        class_set: a ClassSet (e.g. `load_splits(...).train`).
        ways: classes per episode (N).
        shots: support examples per class (k).
        queries: query examples per class (q).
        batch_size: episodes per global meta-batch (B), divisible by
            `num_replicas`.
        seed: integer seed of the stream.
        start_batch: index of the first global meta-batch.
        replica_id: which replica's slice to yield, in [0, num_replicas).
        num_replicas: number of replicas sharing each global meta-batch.

    Returns:
        An infinite tf.data.Dataset of dicts (b = B / num_replicas; examples
        are [H, W, C] images in [0, 1], or [d] feature vectors):
            "support_images": float32 [b, N*k, *example_shape],
            "support_labels": int32 [b, N*k], in [0, N),
            "query_images": float32 [b, N*q, *example_shape],
            "query_labels": int32 [b, N*q], in [0, N).
        Examples are class-major: label n's support examples are rows
        n*k .. n*k + k - 1 (queries likewise); which class gets label n is
        random. Support and query examples of an episode are distinct.

    Raises:
        ValueError: on arguments the class set cannot serve (see
            `check_episode_args`) or inconsistent batch and replica arguments.
    """
    return _stream(class_set, ways=ways, shots=shots, queries=queries,
                   seed=seed, batch_size=batch_size, start_batch=start_batch,
                   replica_ids=[replica_id], num_replicas=num_replicas)


def distributed_meta_batches(input_context, class_set, *, ways, shots,
                             queries, global_batch_size, seed, start_batch=0):
    """One worker's meta-batches, for `distribute_datasets_from_function`.

    Worker p of P (`input_context.input_pipeline_id`) with L = R/P local
    replicas runs replicas p*L .. p*L + L - 1 of R
    (`input_context.num_replicas_in_sync`). The strategy hands the
    elements of the worker's dataset to its local replicas in turn, so this
    dataset yields, for each global meta-batch j, the slice of replica p*L,
    then p*L + 1, ..., each as `meta_batches(..., replica_id=r,
    num_replicas=R)` would.

    Args:
        input_context: the tf.distribute.InputContext the strategy passes.
        class_set: a ClassSet.
        ways: classes per episode (N).
        shots: support examples per class (k).
        queries: query examples per class (q).
        global_batch_size: episodes per global meta-batch (B), divisible by R.
        seed: integer seed of the stream.
        start_batch: index of the first global meta-batch.

    Returns:
        An infinite tf.data.Dataset of per-replica meta-batches of B/R
        episodes, in the format of `meta_batches`.
    """
    num_replicas = input_context.num_replicas_in_sync
    local = num_replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local
    return _stream(class_set, ways=ways, shots=shots, queries=queries,
                   seed=seed, batch_size=global_batch_size,
                   start_batch=start_batch,
                   replica_ids=range(first, first + local),
                   num_replicas=num_replicas)


def eval_episodes(class_set, *, ways, shots, queries, seed,
                  num_episodes=1000, rotate_classes=False):
    """A fixed, finite set of evaluation episodes.

    Episode i is episode i of the stream with `seed` (the same function of
    (seed, i) as in `meta_batches`), so the set is identical across runs and
    machines.

    With `rotate_classes`, each class of an episode is rotated by its own
    random multiple of 90 degrees, support and queries alike, as the code of
    MAML (Finn et al. 2017) rotates its Omniglot test classes. The classes,
    labels and examples stay those of the unrotated episode.

    Args:
        class_set: a ClassSet (e.g. `load_splits(...).test`).
        ways: classes per episode (N).
        shots: support examples per class (k).
        queries: query examples per class (q).
        seed: integer seed.
        num_episodes: number of episodes.
        rotate_classes: bool, rotate each class by a random multiple of 90
            degrees (square images only).

    Returns:
        A tf.data.Dataset of `num_episodes` single episodes, unbatched:
            "support_images": float32 [N*k, *example_shape],
            "support_labels": int32 [N*k],
            "query_images": float32 [N*q, *example_shape],
            "query_labels": int32 [N*q].
        `.batch(b)` gives elements in the format of `meta_batches`.

    Raises:
        ValueError: on arguments the class set cannot serve (`rotate_classes`
            with examples that are not square images).
    """
    check_episode_args(class_set, ways, shots, queries)
    check_int("num_episodes", num_episodes, 1)
    if rotate_classes:
        class_set.check_square_images("rotate_classes")
    episode = _episode_fn(class_set, ways, shots, queries, seed,
                          rotate_classes)
    return (tf.data.Dataset.range(num_episodes)
            .map(episode, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True))
