"""Load an exported serving SavedModel the way a deployment does, with nothing of this repository.

Run by `unitest/test_serving.py` as ``python -I savedmodel_client.py SAVEDMODEL REQUEST.json OUT.json`` from a
temporary working directory: ``-I`` keeps the script's folder, the working directory and PYTHONPATH off
``sys.path``, and the script checks that the repository's packages cannot be imported. It calls both
signatures as TF Serving would (``images`` from base64, as in a REST request ``{"instances": [{"b64": ...}]}``)
and writes the outputs as JSON.
"""

import base64
import importlib.util
import json
import sys

for package in ("models", "utils", "custom_architectures", "custom_layers"):
    assert importlib.util.find_spec(package) is None, f"the repository's {package!r} is importable"
assert "torch" not in sys.modules

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

path, request_path, out_path = sys.argv[1:4]
with open(request_path, encoding="utf-8") as f:
    request = json.load(f)
loaded = tf.saved_model.load(path)
images = tf.constant([base64.b64decode(row["b64"]) for row in request["instances"]])
by_bytes = loaded.signatures["serving_default"](images=images)
by_embeddings = loaded.signatures["embeddings"](embeddings=tf.constant(np.asarray(request["embeddings"], np.float32)))
assert "torch" not in sys.modules and importlib.util.find_spec("models") is None
with open(out_path, "w", encoding="utf-8") as f:
    json.dump({
        "signatures": sorted(loaded.signatures),
        "inputs": {name: [str(s.dtype.name), s.shape.as_list()]
                   for name, s in loaded.signatures["serving_default"].structured_input_signature[1].items()},
        "metadata": json.loads(loaded.metadata().numpy().decode()),
        "images": {"captions": [c.decode() for c in by_bytes["captions"].numpy()],
                   "scores": [float(s) for s in by_bytes["scores"].numpy()]},
        "embeddings": {"captions": [c.decode() for c in by_embeddings["captions"].numpy()],
                       "scores": [float(s) for s in by_embeddings["scores"].numpy()]},
    }, f, ensure_ascii=False)
