"""Int8 weights for GPT-2's decoding at one image (``precision="int8"``): weight-only, per output channel.

Decoding one caption is memory-bound: each token reads all of GPT-2's ~124M weights (~500 MB in float32)
for one row of activations. Stored as int8 they are a quarter of that. Each kernel is kept as ``q`` (N, K)
int8 (one row per *output* channel, the layout of the tied LM head ``wte`` (V, C)) and ``scale`` (N,)
float32, symmetric (``w ~= q * scale``, ``|q| <= 127``, ``scale = max|w[n]| / 127``: the rounding error of
every weight is at most ``scale[n] / 2``). Activations stay float: ``y = (x @ q^T) * scale + bias``.

The kernel: ``tf.matmul(x, cast(q), transpose_b=True) * scale``, always run as an XLA program. Compiled,
a one-row product is rewritten as a multiply-and-reduce that reads the int8 rows directly, fused with the
cast: no float32 copy of the weights is made. Two things keep it so: `_in_loop` (XLA would otherwise hoist
the cast of a loop-invariant weight out of the decoding ``tf.while_loop``, which then reads float32 copies),
and `compiled_kernel` for eager and uncompiled-graph callers (a shape's first call under
``jit_compile="auto"``), where TensorFlow's own kernels would cast the whole matrix at every call. Measured
by ``benchmarks/bench_int8.py --kernels``: the (K, N) layout of Keras' ``Dense.quantize("int8")``, an int8 x
int8 -> int32 ``XlaDotV2`` after quantizing the activation row, ``UniformQuantizedDotHybrid`` and oneDNN's
``QuantizedMatMulWithBiasAndDequantize`` are all slower than float32 at one row on this CPU. Nothing here is
CPU-specific (AVX2-only machines run the same XLA code).

- `quantize_rows`: float (N, K) -> (q, scale).
- `Int8Kernel`: the (q, scale) pair `custom_layers.inference_ops.dense` accepts in place of a kernel.
- `Int8Dense`: `custom_layers.linear.Linear` with an int8 kernel (the same (units, in) layout); inference only.
- `Int8Embedding`: a token embedding of int8 rows, also the LM head (``logits = h @ wte^T``).

Example::

    q, scale = quantize_rows(linear.kernel)                              # (N, K) int8, (N,)
    y = int8_matmul(x, q, scale)                                         # ~= x @ linear.kernel^T
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from custom_layers.linear import Linear

#: the weight quantizations a GPT-2 can be built with (None: float weights)
QUANTIZATIONS = (None, "int8")
#: largest int8 magnitude used (symmetric: -127..127, so that -q is representable)
QMAX = 127


class Int8Kernel(NamedTuple):
    """An int8 kernel as `custom_layers.inference_ops.dense` takes it: ``q`` (N, K) int8, ``scale`` (N,)."""
    q: tf.Tensor
    scale: tf.Tensor


def check_quantization(quantization):
    """``quantization`` itself when it is one of `QUANTIZATIONS`, else a ValueError naming them."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    return quantization


def quantize_rows(weights):
    """Symmetric per-row int8: float (N, K) -> (q (N, K) int8, scale (N,) float32) with ``w ~= q * scale``.

    ``scale[n] = max_k |w[n, k]| / 127`` (1 for an all-zero row, whose q is 0), ``q = round(w / scale)``:
    ``|w - q * scale| <= scale / 2`` elementwise. Non-finite weights are refused (a ValueError)."""
    w = tf.convert_to_tensor(weights, tf.float32)
    if w.shape.rank != 2:
        raise ValueError(f"quantize_rows takes a 2-D (N, K) matrix, got shape {w.shape}")
    if not bool(tf.reduce_all(tf.math.is_finite(w))):
        raise ValueError("cannot quantize weights that are not finite (NaN or inf)")
    amax = tf.reduce_max(tf.abs(w), axis=1)  # (N,)
    scale = tf.where(amax > 0, amax / QMAX, tf.ones_like(amax))
    q = tf.clip_by_value(tf.round(w / scale[:, None]), -QMAX, QMAX)
    return tf.cast(q, tf.int8), scale


def dequantize_rows(q, scale):
    """(q (N, K) int8, scale (N,)) -> float32 (N, K): the weights the int8 ones stand for."""
    return tf.cast(q, tf.float32) * tf.cast(scale, tf.float32)[:, None]


def int8_matmul(x, q, scale):
    """x (..., K) float @ (q (N, K) int8 * scale (N,))^T -> (..., N) in x's dtype.

    Always an XLA program: inlined where the caller is compiled (the decoding loop), else `compiled_kernel`'s
    (eager calls, the traced uncompiled block step), since TensorFlow's own kernels would cast the whole
    weight matrix to float32 at every call (slower than float32 itself)."""
    return compiled_kernel(x, q, scale)


def fused_int8_matmul(x, q, scale):
    """`int8_matmul`'s computation: the cast of ``q`` sits inside the product so that XLA fuses it (see the
    module docstring); `_in_loop` keeps it inside a compiled loop."""
    n, k = q.shape
    q = _in_loop(q, x)
    lead = x.shape[:-1]
    lead = lead.as_list() if lead.is_fully_defined() else tf.shape(x)[:-1]
    flat = x if x.shape.rank == 2 else tf.reshape(x, (-1, k))
    y = tf.matmul(flat, tf.cast(q, x.dtype), transpose_b=True) * tf.cast(scale, x.dtype)  # (M, N)
    if x.shape.rank == 2:
        return y
    return tf.reshape(y, tf.concat([lead, [n]], 0) if tf.is_tensor(lead) else [*lead, n])


#: `fused_int8_matmul` as one XLA program per (x, q) shape and dtype, like an op's kernel: compiled on the
#: first call of a shape (~0.1 s; a one-image caption meets ~10: 5 weight shapes x prefix and step rows),
#: inlined when called from a compiled function. Module-level on purpose, not owned by a model: it holds no
#: weights (they are arguments) and its programs depend on shapes only; one per model would compile them
#: again for every model loaded, and TensorFlow's XLA cache keeps a function's programs for the process
#: anyway (`benchmarks/bench_int8_owner.py`: ~0.1 s per shape and ~1.5 MiB per model, never given back).
compiled_kernel = tf.function(fused_int8_matmul, jit_compile=True, autograph=False)


def _in_loop(q, x):
    """``q`` itself, made to depend on ``x`` so that the cast stays inside a compiled decoding loop.

    XLA's loop-invariant code motion hoists ``cast(q)`` of a weight (loop-invariant) out of a
    ``tf.while_loop``: the loop would then read float32 weights again, as slow as float32 (measured: the
    optimized HLO held one ``convert`` per kernel before the loop). ``max(q, -128 + isnan(x[0, 0]))`` is
    ``q`` whatever x holds (``q >= -127``), but XLA cannot prove it, so the cast, fused with the product,
    runs in the loop on the int8 rows. The elementwise max fuses into the same loop (no extra pass)."""
    flag = tf.cast(tf.math.is_nan(tf.reshape(x, (-1,))[0]), tf.int8)
    return tf.maximum(q, tf.constant(-QMAX - 1, tf.int8) + flag)


def projection(units, initializer_range, quantization, name):
    """A GPT-2 block's projection, kernel (units, in): `Linear` (float weights, GPT-2's initialiser) or
    `Int8Dense` (``quantization="int8"``)."""
    if check_quantization(quantization) == "int8":
        return Int8Dense(units, name=name)
    init = keras.initializers.RandomNormal(stddev=initializer_range)
    return Linear(units, kernel_initializer=init, name=name)


def _refuse_training(layer, training):
    if training:
        raise RuntimeError(f"{layer.name} holds int8 weights (precision='int8'), which are for inference only: "
                           "train the float32 model (ClipCap.load(name) without precision) and quantize after")


@keras.saving.register_keras_serializable(package="image_captioning")
class Int8Dense(keras.layers.Layer):
    """`custom_layers.linear.Linear` (``keras.layers.Dense`` without activation, kernel (units, in)) whose kernel
    is int8 per output channel; inference only.

    Variables: ``kernel_q`` (units, in) int8, ``kernel_scale`` (units,) and ``bias`` (units,), none
    trainable. `set_from_linear` fills them from a float `Linear`; ``call(training=True)`` raises."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        self.kernel_q = self.add_weight(name="kernel_q", shape=(self.units, fan_in), dtype="int8",
                                        initializer="zeros", trainable=False)
        self.kernel_scale = self.add_weight(name="kernel_scale", shape=(self.units,), dtype="float32",
                                            initializer="ones", trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.units,), dtype="float32", initializer="zeros",
                                    trainable=False)
        self.built = True

    def set_from_linear(self, linear):
        """Quantize a float `Linear` (kernel (units, in), with bias) into this layer."""
        q, scale = quantize_rows(linear.kernel)
        self.kernel_q.assign(q)
        self.kernel_scale.assign(scale)
        self.bias.assign(tf.cast(linear.bias, tf.float32))

    def inference_kernel(self):
        """The kernel as `Int8Kernel` (what `custom_layers.inference_ops.dense` takes)."""
        return Int8Kernel(self.kernel_q.value, self.kernel_scale.value)

    def call(self, x, training=None):
        _refuse_training(self, training)
        return int8_matmul(x, self.kernel_q.value, self.kernel_scale.value) + tf.cast(self.bias.value, x.dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class Int8Embedding(keras.layers.Layer):
    """A token embedding (V, C) stored as int8 rows (one scale per vocabulary row), used both ways:
    `lookup` (ids -> vectors) and `logits` (the tied LM head, ``h @ wte^T``). Inference only."""

    def __init__(self, input_dim, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim

    def build(self, input_shape=None):
        self.embeddings_q = self.add_weight(name="embeddings_q", shape=(self.input_dim, self.output_dim),
                                            dtype="int8", initializer="zeros", trainable=False)
        self.embeddings_scale = self.add_weight(name="embeddings_scale", shape=(self.input_dim,),
                                                dtype="float32", initializer="ones", trainable=False)
        self.built = True

    def set_from_embeddings(self, embeddings):
        """Quantize float embeddings (V, C), one scale per row."""
        q, scale = quantize_rows(embeddings)
        self.embeddings_q.assign(q)
        self.embeddings_scale.assign(scale)

    def lookup(self, token_ids, dtype="float32"):
        """(...) int ids -> (..., C) dequantized rows in ``dtype``."""
        ids = tf.cast(token_ids, tf.int32)
        rows = tf.gather(self.embeddings_q.value, ids)  # (..., C) int8
        scale = tf.gather(self.embeddings_scale.value, ids)[..., None]  # (..., 1)
        return tf.cast(rows, dtype) * tf.cast(scale, dtype)

    def logits(self, hidden):
        """(N, C) hidden states -> (N, V) logits of the tied head (int8 rows, fused dequantization)."""
        return int8_matmul(hidden, self.embeddings_q.value, self.embeddings_scale.value)

    def call(self, token_ids, training=None):
        _refuse_training(self, training)
        return self.lookup(token_ids, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim)
        return config
