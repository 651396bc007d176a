"""The meta-training step, and the check that stops a diverging run."""

from collections.abc import Callable
import math
import os

import keras
import tensorflow as tf

from comln_tf.model import COMLN
from comln_tf.training._checkpoints import BEST_DIR

# Means over the replicas of one step, summed over the steps of a log window.
METRICS = ("loss", "accuracy", "num_evals", "grad_norm")


def make_train_step(
  model: COMLN,
  optimizer: keras.optimizers.Optimizer,
  step: tf.Variable,
  strategy: tf.distribute.Strategy,
  totals: dict[str, tf.Variable],
  clip_norm: float | None = None,
) -> Callable:
  """The compiled meta-training step.

  Each replica adapts to its slice of the meta-batch and contributes its
  part of the meta-gradient (`COMLN.replica_gradients`: 1/R of the
  gradient of its mean query loss plus the L2 term, R replicas). The
  optimizer sums the parts over replicas, so it applies the gradient of
  the mean loss over the global meta-batch (all slices have B/R episodes:
  the mean of the slice means is the global mean) plus the L2 term
  counted once.

  The global norm of that gradient is computed from an all-reduced copy
  (Keras optimizers' own clipnorm/global_clipnorm would clip each
  replica's part before the sum); with `clip_norm`, every part is scaled
  by min(1, clip_norm / norm), so the applied gradient has norm
  <= clip_norm.

  The accuracy of a step whose logits are not all finite is NaN (see
  `COMLN.query_correct`), so that the divergence check stops the run
  instead of logging an accuracy made of argmaxes of NaN.

  Args:
    model: a built COMLN, created under `strategy`.
    optimizer: a built Keras optimizer, created under `strategy`.
    step: int64 tf.Variable, the number of steps done, incremented.
    strategy: the tf.distribute.Strategy.
    totals: dict of float32 tf.Variables: "loss", "accuracy", "num_evals",
      "grad_norm" (before clipping) (each step adds its value, averaged over
      replicas) and "steps".
    clip_norm: float > 0 or None (no clipping).

  Returns:
    tf.function taking an iterator of distributed meta-batches: runs one
    step, updates `step` and `totals`, returns nothing (no host
    round-trip).
  """

  def replica_step(batch):
    loss, logits, stats, gradients = model.replica_gradients(batch)
    grad_norm = tf.linalg.global_norm(
      tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, gradients
      )
    )
    if clip_norm is not None:
      scale = tf.minimum(1.0, clip_norm / grad_norm)
      gradients = [g * scale for g in gradients]
    optimizer.apply(gradients, model.trainable_variables)
    return {
      "loss": loss,
      "accuracy": tf.reduce_mean(
        model.query_correct(batch["query_labels"], logits)
      ),
      "num_evals": tf.cast(stats.num_evals, tf.float32),
      "grad_norm": grad_norm,
    }

  @tf.function
  def train_step(iterator):
    results = strategy.run(replica_step, args=(next(iterator),))
    for name in METRICS:
      totals[name].assign_add(
        strategy.reduce(tf.distribute.ReduceOp.MEAN, results[name], axis=None)
      )
    totals["steps"].assign_add(1.0)
    step.assign_add(1)

  return train_step


class DivergedError(RuntimeError):
  """Meta-training stopped: the loss, logits, gradient or T is not finite."""


def check_finite(
  totals: dict[str, tf.Variable],
  model: COMLN,
  step: int,
  last_checked: int,
  model_dir: str,
  error: tf.errors.OpError | None = None,
) -> None:
  """Raises DivergedError if a step since `last_checked` was not finite.

  Under XLA the engine's assertions are compiled away and a diverged step
  gives NaN values, not an error; without XLA the step after it fails in
  the engine (e.g. "t_final must be > 0, got nan"). Either way training
  stops here, before a non-finite checkpoint can be written. A step whose
  query logits are not all finite has a NaN accuracy
  (`COMLN.query_correct`), so no accuracy is ever logged from them.

  Args:
    totals: the step accumulators (sums since the last log).
    model: the COMLN being trained.
    step: int, the last step run. last_checked: int, the last step checked.
    model_dir: str, for the message.
    error: the tf.errors.OpError the step raised, if any (re-raised as is
      when the state is finite: it is not a divergence).
  """
  # A step's loss precedes its update: a non-finite gradient is what makes
  # the updated weights non-finite.
  loss = float(totals["loss"].numpy())
  accuracy = float(totals["accuracy"].numpy())
  grad_norm = float(totals["grad_norm"].numpy())
  t_final = float(model.classifier.t_final)
  if all(map(math.isfinite, (loss, accuracy, grad_norm, t_final))):
    if error is not None:
      raise error
    return
  logits = "" if math.isfinite(accuracy) else " (query logits not finite)"
  raise DivergedError(
    f"Meta-training diverged between steps {last_checked + 1} and {step}: "
    f"loss {loss}{logits}, gradient norm {grad_norm}, T {t_final}. Nothing "
    f"after step {last_checked} was saved (latest checkpoints in "
    f"{model_dir!r}, the best in "
    f"{os.path.join(model_dir, BEST_DIR)!r}). Train again in a new "
    f"model_dir with config.optim.clip_norm or a lower "
    f"config.optim.learning_rate."
  ) from error
