"""Building a COMLN model and its optimizer from a configuration."""

import keras
import ml_collections

from comln_tf.config import OPTIMIZERS
from comln_tf.model import COMLN
from comln_tf.training._config import make_comln


def build_model(
  config: ml_collections.ConfigDict, jit_compile: bool = False
) -> COMLN:
  """A built COMLN model, with fresh weights, ready to train or restore.

  The weights are drawn from Keras' global random state: call
  `keras.utils.set_random_seed` first for reproducible ones.

  Args:
    config: a configuration with `data.example_shape` (the shape of one
      image, [H, W, C], or of one feature vector, [d]), as saved by
      training.
    jit_compile: XLA-compile the adaptation (see `GradientFlowClassifier`).
      Off for models that are exported.

  Returns:
    A built `COMLN`.
  """
  model = make_comln(config, jit_compile=jit_compile)
  model.build(
    {"support_images": (None, None) + tuple(config.data.example_shape)}
  )
  return model


def build_optimizer(
  config: ml_collections.ConfigDict, model: COMLN
) -> keras.optimizers.Optimizer:
  """The configured Keras optimizer, built for the model's trainable weights.

  It is built here, not at the first step, so that a checkpoint restores
  its slots (e.g. momentum) before training resumes.

  Args:
    config: a configuration (optim group).
    model: the built COMLN.

  Returns:
    keras.optimizers.SGD (momentum, Nesterov per config) or Adam, with a
    constant learning rate or a cosine decay (optim.lr_decay_steps).
  """
  optim = config.optim
  learning_rate = optim.learning_rate
  if optim.lr_decay_steps:
    # Driven by optimizer.iterations, which checkpoints hold: a resumed run
    # continues the schedule where it stopped.
    learning_rate = keras.optimizers.schedules.CosineDecay(
      learning_rate, optim.lr_decay_steps
    )
  make = {
    "sgd": lambda: keras.optimizers.SGD(
      learning_rate, momentum=optim.momentum, nesterov=optim.nesterov
    ),
    "adam": lambda: keras.optimizers.Adam(learning_rate),
  }
  assert set(make) == set(OPTIMIZERS)
  optimizer = make[optim.optimizer]()
  optimizer.build(model.trainable_variables)
  return optimizer
