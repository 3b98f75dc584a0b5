"""Dual-encoder (image / text) models: OpenAI's CLIP in Keras.

``CLIP`` is imported on first use (PEP 562), so that the light modules of this package (`presets`: OpenAI's
names, URLs and hashes) can be imported without loading TensorFlow.
"""

__all__ = ["CLIP"]


def __getattr__(name):
    if name == "CLIP":
        from models.siamese.clip import CLIP

        return CLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
