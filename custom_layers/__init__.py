"""The library runs on Keras 3's **TensorFlow backend only**: the decoder's loop, the samplers, the serving
graph and the data pipeline are TensorFlow code (``tf.while_loop``, ``tf.data``, SavedModel), not
backend-neutral ``keras.ops``.

This is the one place that says so. It is the bottom floor of the house, and every other package's
``__init__`` imports it first, so the backend is chosen before anything imports Keras: ``KERAS_BACKEND``
is set to ``tensorflow`` unless the user set it. Another backend, named in ``KERAS_BACKEND`` or already
loaded, is an ImportError that says so (``~/.keras/keras.json``'s choice is overridden: the variable wins).
Importing this module imports neither Keras nor TensorFlow.
"""

import os
import sys

BACKEND = "tensorflow"


def _choose_backend():
    chosen = os.environ.setdefault("KERAS_BACKEND", BACKEND)
    if chosen != BACKEND:
        raise ImportError(f"image_captioning runs on Keras' {BACKEND!r} backend only; KERAS_BACKEND is "
                          f"{chosen!r}: unset it or set KERAS_BACKEND={BACKEND}")
    keras = sys.modules.get("keras")
    loaded = getattr(getattr(keras, "backend", None), "backend", None)
    if callable(loaded) and loaded() != BACKEND:
        raise ImportError(f"image_captioning runs on Keras' {BACKEND!r} backend only; Keras was imported "
                          f"before it with the {loaded()!r} backend")


_choose_backend()
