"""Activations of the checkpoints we load: GPT-2's tanh-approximated GELU and CLIP's QuickGELU.

Both are plain functions of a tensor (usable as ``keras.layers.Dense(..., activation=gelu_new)`` or called
directly) and match their PyTorch originals to float32 round-off.

Example::

    from custom_layers.activations import gelu_new, quick_gelu
    y = gelu_new(keras.ops.ones((2, 3)))
"""

import math

import keras

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_new(x):
    """GPT-2's GELU, tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Same formula as transformers' ``NewGELUActivation`` (``gelu_new``), written out so the order of
    operations, hence the round-off, follows the PyTorch original.
    """
    x = keras.ops.convert_to_tensor(x)
    return 0.5 * x * (1.0 + keras.ops.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * keras.ops.power(x, 3.0))))


def quick_gelu(x):
    """CLIP's QuickGELU: ``x * sigmoid(1.702 x)`` (OpenAI CLIP's ``QuickGELU`` module)."""
    x = keras.ops.convert_to_tensor(x)
    return x * keras.ops.sigmoid(1.702 * x)

