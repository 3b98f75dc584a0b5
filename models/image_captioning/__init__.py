"""Image captioning models: `ClipCap` (CLIP prefix + GPT-2).

``ClipCap`` is imported on first use (PEP 562), so that the light modules of this package (`presets`: the
official names; `prediction`, `cached_answers`) can be used without importing TensorFlow: ``main.py caption``
answers a rerun from map.json without loading a model or TensorFlow.
"""

__all__ = ["ClipCap"]


def __getattr__(name):
    if name == "ClipCap":
        from models.image_captioning.clip_cap import ClipCap

        return ClipCap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
