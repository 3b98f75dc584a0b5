"""Image captioning models: `ClipCap` (CLIP prefix + GPT-2)."""

from models.image_captioning.clip_cap import ClipCap

__all__ = ["ClipCap"]
