"""What every tf.data pipeline of comln_tf sets."""

import tensorflow as tf


def without_autotune_thread(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` without tf.data's autotuning thread.

  Destroying an iterator waits for that thread to wake from a sleep that
  grows with the iterator's life: the end of an evaluation or a training
  would idle for seconds. The pipelines here are cheap beside the model,
  so `tf.data.AUTOTUNE` may as well mean fixed defaults: one parallel call
  per thread of the pool, a prefetch buffer sized as it is consumed.

  Args:
    dataset: a tf.data.Dataset.

  Returns:
    The same dataset, with `options().autotune.enabled` False.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)
