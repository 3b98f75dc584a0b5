"""Dual-encoder (image / text) models: OpenAI's CLIP in Keras."""

from models.siamese.clip import CLIP

__all__ = ["CLIP"]
