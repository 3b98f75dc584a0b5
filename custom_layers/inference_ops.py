"""Inference-only forms of GPT-2's projection (`custom_layers.linear.Linear`) and Keras' ``LayerNormalization``,
on weight tensors passed in.

The KV-cached decoding step (`GPT2.call_with_cache`) runs ~60 small ops per block for each token. Through
Keras' ``Layer.__call__`` each layer call cost ~1-2 ms of Python in eager mode and extra graph ops
(``tensordot`` reshapes) when traced. These functions compute the same values (`Linear`'s matmul on the
flattened input, and Keras' own layer-norm formula) with direct TensorFlow ops and take the
weights as tensors, so that one traced function of a block serves every block of the model
(`custom_layers.gpt2_block.cached_block_step`). No dropout, regularisers or masking: inference only;
training and the full forward pass still call the layers.

Example::

    y = dense(layer_norm(x, gamma, beta, 1e-5), kernel, bias)      # == c_fc(ln_2(x))
"""

import tensorflow as tf

from custom_layers.activations import gelu_new
from custom_layers.linear import linear
from custom_layers.packed_weights import packed_linear
from custom_layers.quantized import Int8Kernel, int8_matmul


def dense(x, kernel, bias=None, activation=None, packed=False):
    """activation(x (..., Cin) @ kernel^T + bias (Cout,)) -> (..., Cout), kernel (Cout, Cin) as
    `custom_layers.linear.Linear` stores it: `custom_layers.linear.linear` (bias and activation fused with the
    matmul in a plain graph). ``kernel`` may be an `Int8Kernel` (q (Cout, Cin) int8, scale (Cout,)):
    `custom_layers.quantized`, ``precision="int8"``. ``packed``: one oneDNN kernel that keeps ``kernel``
    packed (`custom_layers.packed_weights.packed_linear`: a frozen model's variable read in this graph, graph
    mode; ``activation`` None or `gpt2_gelu` on bfloat16)."""
    if packed:
        if activation not in (None, gpt2_gelu) or (activation is gpt2_gelu and x.dtype != tf.bfloat16):
            raise ValueError("a packed dense applies no activation or gpt2_gelu's bfloat16 form (GELU, tanh)")
        return packed_linear(x, kernel, bias, activation=None if activation is None else "gelu_approximate")
    if not isinstance(kernel, Int8Kernel):
        return linear(x, kernel, bias, activation)
    y = int8_matmul(x, kernel.q, kernel.scale)
    y = y if bias is None else tf.nn.bias_add(y, bias)
    return y if activation is None else activation(y)


def gpt2_gelu(x):
    """GPT-2's GELU (tanh form) for the cached decoding step: `custom_layers.activations.gelu_new` (the
    PyTorch original's order of operations) in float32; in bfloat16 TensorFlow's ``tf.nn.gelu(approximate=True)``,
    the same formula, which the remapper fuses with the matmul and bias before it into one oneDNN kernel
    (computed in float32 inside it, where the written-out form rounded each of its 8 steps to bfloat16)."""
    return tf.nn.gelu(x, approximate=True) if x.dtype == tf.bfloat16 else gelu_new(x)


def layer_norm(x, gamma, beta, epsilon, axis=-1):
    """``keras.layers.LayerNormalization`` over the last axis: Keras' formula (``x * inv + (beta - mean *
    inv)`` with ``inv = gamma / sqrt(var + eps)``), computed in float32 at least, returned in x's dtype.
    ``axis=0``: over the first axis of x (C, N), columns normalised (`gpt2_block.cached_column_step`)."""
    dtype = x.dtype
    compute = tf.float64 if dtype == tf.float64 else tf.float32
    x = tf.cast(x, compute) if dtype != compute else x
    gamma, beta = tf.cast(gamma, compute), tf.cast(beta, compute)
    if axis == 0:
        gamma, beta = gamma[:, None], beta[:, None]
    elif axis != -1:
        raise ValueError(f"layer_norm normalises axis -1 or 0, not {axis}")
    mean = tf.reduce_mean(x, axis=axis, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=axis, keepdims=True)
    inv = tf.math.rsqrt(variance + epsilon) * gamma
    out = x * inv + (beta - mean * inv)
    return out if out.dtype == dtype else tf.cast(out, dtype)


def variable_value(variable, dtype):
    """A Keras variable's current value as a tensor in ``dtype`` (its layer's compute dtype)."""
    value = variable.value
    return value if value.dtype == dtype else tf.cast(value, dtype)
