"""The user-facing models: `models.image_captioning.ClipCap` and `models.siamese.CLIP`.

``__version__`` is the library's version, recorded in every saved model's ``metadata.json``.

Importing this package points TensorFlow's persistent XLA compilation cache at the model store
(`utils.compile_cache.enable`) when TensorFlow is not imported yet: every module below imports TensorFlow
after this runs. ``IMAGE_CAPTIONING_XLA_CACHE=0`` turns it off. It also marks torch's triton absent unless
it is already imported (`utils.tf_startup.keep_triton_out`): loaded after TensorFlow, triton crashes the
process, so ``import torchvision`` or a transformers PyTorch model after this library would.
"""

import custom_layers  # noqa: F401  (chooses Keras' backend before anything imports Keras)
from utils import compile_cache as _compile_cache
from utils.tf_startup import keep_triton_out as _keep_triton_out

_compile_cache.enable()
_keep_triton_out()  # torch's triton loaded after TensorFlow crashes the process: see its docstring

__version__ = "2.0.0"

JIT_COMPILE_VALUES = (True, False, "auto")


def check_jit_compile(value):
    """``jit_compile`` as `CLIP` and `ClipCap` take it: True (XLA everywhere), False (graph mode, no XLA) or
    "auto" (XLA where it is the faster on CPU: decoding, ViT image encoders; not a ModifiedResNet). Numpy /
    Python bools are accepted; anything else is a ValueError (a typo must not silently mean True)."""
    if isinstance(value, str):
        if value == "auto":
            return value
    elif isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise ValueError(f"jit_compile must be True, False or 'auto', got {value!r}")
