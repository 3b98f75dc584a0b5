"""The models: `models.image_captioning.ClipCap`, `models.siamese.CLIP`.

Importing this package points TensorFlow's persistent XLA compilation cache at the model store
(`utils.compile_cache.enable`) when TensorFlow is not imported yet: every module below imports TensorFlow
after this runs. ``IMAGE_CAPTIONING_XLA_CACHE=0`` turns it off.
"""

from utils import compile_cache as _compile_cache

_compile_cache.enable()
