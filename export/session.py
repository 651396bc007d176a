"""An export loaded the way TF Serving loads it: the TF1 session loader.

`tf.compat.v1.saved_model.loader.load` into a graph and session of its own
(as `saved_model_cli run` does), fed by signature input names. Used by the
tests and the benchmark; it needs TensorFlow only.
"""

import tensorflow as tf


class SessionModel:
  """A SavedModel in its own tf.Graph and tf.compat.v1.Session.

  Args:
    export_dir: a version folder written by `export.saved_model`.

  Attributes:
    session: the tf.compat.v1.Session holding the loaded graph.
    signatures: signature name -> SignatureDef (including serving_default).
  """

  def __init__(self, export_dir: str):
    self.session = tf.compat.v1.Session(graph=tf.Graph())
    with self.session.graph.as_default():
      meta_graph = tf.compat.v1.saved_model.loader.load(
        self.session, [tf.saved_model.SERVING], export_dir
      )
    self.signatures = dict(meta_graph.signature_def)

  def callable(self, signature: str, input_names):
    """A fast callable: numpy inputs in `input_names` order -> outputs dict.

    Args:
      signature: signature name.
      input_names: the signature's input names, in the order of the args.

    Returns:
      function(*arrays) -> dict of output name -> numpy array.
    """
    signature_def = self.signatures[signature]
    output_names = sorted(signature_def.outputs)
    run = self.session.make_callable(
      [signature_def.outputs[key].name for key in output_names],
      [signature_def.inputs[key].name for key in input_names],
    )
    return lambda *arrays: dict(zip(output_names, run(*arrays)))

  def run(self, request):
    """Outputs of a `PredictRequest` (tensorflow_serving.apis.predict_pb2).

    Returns:
      dict of output name -> numpy array.
    """
    names = sorted(request.inputs)
    # An empty signature name means serving_default, as in TF Serving.
    signature = (
      request.model_spec.signature_name
      or tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
    )
    return self.callable(signature, names)(
      *[tf.make_ndarray(request.inputs[key]) for key in names]
    )
