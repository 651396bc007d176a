"""The pretrained model in pretrained/omniglot/1/, served as TF Serving would.

The SavedModel is loaded with the TF1 session loader in a process that never
imports comln_tf and fed a PredictRequest of one fixed within-alphabet
20-way 1-shot episode of the TFDS Omniglot test split (the evaluation
alphabets); its predictions must equal the ones recorded when the model was
exported (`pretrained/omniglot/expected_episode.json`).

Run `python tests/test_pretrained.py` after exporting a new model to record
its predictions again.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

from comln_tf import data

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPORT_DIR = REPO / "pretrained" / "omniglot" / "1"
EXPECTED = REPO / "pretrained" / "omniglot" / "expected_episode.json"
# Episode 0 of the within-alphabet 20-way 1-shot test stream with this seed,
# 5 queries per class.
EPISODE_SEED = 2022
MAX_SIZE_BYTES = 5 * 2**20

# Runs in a fresh interpreter from a folder outside the repository, with the
# repository's export/ importable only for the session loader, which needs
# TensorFlow alone.
_SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from export import session
    from tensorflow_serving.apis import predict_pb2
    import tensorflow as tf
    episode = np.load(sys.argv[3])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "comln"
    for name in ("support_images", "support_labels", "query_images"):
      request.inputs[name].CopyFrom(tf.make_tensor_proto(episode[name]))
    outputs = session.SessionModel(sys.argv[2]).run(request)
    assert "comln_tf" not in sys.modules, "the served model imported comln_tf"
    print(json.dumps({"classes": outputs["classes"].tolist(),
                      "logits": outputs["logits"].tolist()}))
""")


def fixed_episode():
  """The fixed test episode: dict of numpy arrays of a PredictRequest."""
  test = data.load_splits("omniglot").test
  episode = next(
    data.eval_episodes(
      test,
      ways=20,
      shots=1,
      queries=5,
      seed=EPISODE_SEED,
      num_episodes=1,
      class_sampling="within_alphabet",
    ).as_numpy_iterator()
  )
  return {
    "support_images": episode["support_images"],
    "support_labels": episode["support_labels"].astype(np.int64),
    "query_images": episode["query_images"],
    "query_labels": episode["query_labels"],
  }


def serve(episode, tmp_dir):
  """Predictions of the pretrained export on `episode`, in a fresh process."""
  path = pathlib.Path(tmp_dir) / "episode.npz"
  np.savez(path, **episode)
  result = subprocess.run(
    [sys.executable, "-c", _SERVE, str(REPO), str(EXPORT_DIR), str(path)],
    cwd=tmp_dir,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_pretrained_model_predicts_the_recorded_episode(tmp_path):
  size = sum(f.stat().st_size for f in EXPORT_DIR.rglob("*") if f.is_file())
  assert size <= MAX_SIZE_BYTES
  metadata = json.loads(
    (EXPORT_DIR / "assets.extra" / "comln_export.json").read_text()
  )
  assert metadata["tie_init_rows"]
  expected = json.loads(EXPECTED.read_text())
  episode = fixed_episode()
  served = serve(episode, tmp_path)
  np.testing.assert_allclose(
    served["logits"], expected["logits"], rtol=1e-4, atol=1e-3
  )
  # Classes agree except at near-ties, which float rounding on another CPU
  # may break either way.
  top2 = np.sort(np.array(expected["logits"]), axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-3
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(
    np.array(served["classes"])[clear], np.array(expected["classes"])[clear]
  )
  # A trained model: most of these 100 queries, by other drawers than the
  # support images, are classified right (chance is 5%).
  accuracy = np.mean(np.array(served["classes"]) == episode["query_labels"])
  assert accuracy >= 0.5


if __name__ == "__main__":
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    episode = fixed_episode()
    served = serve(episode, tmp)
  EXPECTED.write_text(json.dumps(served) + "\n")
  accuracy = np.mean(np.array(served["classes"]) == episode["query_labels"])
  print(f"Recorded {EXPECTED}: accuracy {accuracy:.2%} on the episode.")
