"""GPT-2's pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

Sub-layer names mirror the PyTorch module (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``).

The KV-cached inference step is `cached_block_step`, a function of the block's weight tensors
(`GPT2Block.inference_weights`) rather than a method: the same function, traced once, serves all the blocks
of a model (`GPT2.call_with_cache`'s ``block_fn``), which is what makes a process's first caption cheap.
The cache of one block is four tensors ``(context_keys, context_values, keys, values)``: the context
(B, n_head, K, head_dim), keys/values of a prefix stored once for the W rows (beams) that share it, and the
generated slots (B, n_head, L * W, head_dim), slot-major, written in place with one ``dynamic_update_slice``
at a possibly symbolic slot (so one compiled step serves every position) and read by attention as batched
``(B, H)`` matmuls without a transpose or a reshape (`custom_layers.attention.segmented_attention`; a
(B, H, W, L, D) layout needed a reshape between the write and the read, and XLA then copied the cache).
Beam search never moves them: a reorder changes which row's slots each row reads (`GPT2.reorder_cache`),
so no step copies a cache.
Separate tensors, not one stacked ``(2, ...)``: XLA copied each half out of a stacked cache before attention
read it (two cache-sized copies per block and step, 70 MB a step at 16 rows and 59 slots).

Example::

    block = GPT2Block(n_embd=768, n_head=12, name="h_0")
    y = block(x, attention_bias=bias)          # (B, T, C)
"""

import keras
import tensorflow as tf
from keras import ops

from custom_layers.activations import gelu_new
from custom_layers.attention import segmented_attention
from custom_layers.gpt2_attention import GPT2Attention
from custom_layers.inference_ops import dense, gpt2_gelu, layer_norm, variable_value
from custom_layers.quantized import Int8Dense, check_quantization, projection


def cached_block_step(x, layer_cache, slot, attention_bias, weights, n_head, epsilon, inplace=False,
                      packed=False):
    """One GPT-2 block on a chunk x (N, T, C) of N = B * W rows (W rows per group), inference only.

    ``layer_cache`` = (context_keys, context_values, keys, values): the context (B, H, K, D) shared by the W
    rows of a group (a prefix), and the group's generated slots (B, H, L * W, D), slot-major (slot l of row w
    at l * W + w). The chunk's keys/values are written at slots ``[slot, slot + T)`` (its first position
    minus K; may be symbolic) of every row, one contiguous write (`write_slots`), then every row attends over
    its group's context and slots (`segmented_attention`) with ``attention_bias`` (B or 1, 1, W * T,
    K + L * W) masking what it may not see (later positions, another row's lineage: see
    `GPT2.call_with_cache`). ``weights``: the block's tensors in `GPT2Block.inference_weights` order.
    ``inplace``: `write_slots` writes into the cache's own buffer (for a cache the caller made fresh with
    `GPT2.prefill(..., inplace=True)` and never reads again; not under XLA).
    ``packed``: the four projections keep their kernels packed (`custom_layers.packed_weights`: the weights of
    a frozen model, read in the graph being built; a plain graph, not a function shared by the blocks).
    Returns (y (N, T, C), updated layer_cache). The computation of `GPT2Block.call` (same ops, same
    kernel), with direct TensorFlow ops.
    """
    ln_1_g, ln_1_b, attn_w, attn_b, proj_w, proj_b, ln_2_g, ln_2_b, fc_w, fc_b, mlp_w, mlp_b = weights
    context_keys, context_values, keys, values = layer_cache
    length, width = x.shape[1], x.shape[2]
    head_dim = width // n_head
    rows = _rows_per_group(x, context_keys)
    qkv = dense(layer_norm(x, ln_1_g, ln_1_b, epsilon), attn_w, attn_b, packed=packed)  # (N, T, 3C)
    q, k, v = tf.unstack(tf.reshape(qkv, (-1, rows, length, 3, n_head, head_dim)), axis=3)  # (B, W, T, H, D)

    one = rows * length == 1  # one query per group (a greedy step): the transposes below only move size-1 axes

    def slot_major(t):  # (B, W, T, H, D) -> (B, H, T * W, D): the chunk's slots, as the cache holds them
        t = t if one else tf.transpose(t, (0, 3, 2, 1, 4))
        return tf.reshape(t, (-1, n_head, length * rows, head_dim))

    start = tf.cast(slot, tf.int32) * rows
    keys = write_slots(keys, start, slot_major(k), inplace)  # (B, H, L * W, D)
    values = write_slots(values, start, slot_major(v), inplace)
    q = q if one else tf.transpose(q, (0, 3, 1, 2, 4))
    q = tf.reshape(q, (-1, n_head, rows * length, head_dim))  # (B, H, W * T, D)
    out = segmented_attention(q, [(context_keys, context_values), (keys, values)], attention_bias)
    out = tf.reshape(out, (-1, n_head, rows, length, head_dim))
    out = out if one else tf.transpose(out, (0, 2, 3, 1, 4))  # (B, W, T, H, D)
    x = x + dense(tf.reshape(out, (-1, length, width)), proj_w, proj_b, packed=packed)
    h = dense(layer_norm(x, ln_2_g, ln_2_b, epsilon), fc_w, fc_b, activation=gpt2_gelu, packed=packed)
    return x + dense(h, mlp_w, mlp_b, packed=packed), (context_keys, context_values, keys, values)


def cached_column_step(xt, layer_cache, slot, attention_bias, weights, n_head, epsilon):
    """`cached_block_step` for one token per row with the activations as columns: xt (C, N) -> (C, N), and the
    projections as ``kernel @ h`` (kernel (out, in), as stored). XLA only (the decoding loop's step at a few
    rows), float kernels only.

    Why: at a few rows a step's matmuls are compute-bound and XLA's CPU kernel runs ``x @ kernel^T`` (rows
    times out) well below its speed for ``kernel @ x^T`` (out times rows): GPT-2 124M's 48 block matmuls in
    a chain took 32.9 ms at 16 rows and 27.8 ms in this form (28.4 / 21.7 ms at 8 rows, 36.3 / 31.2 at 32;
    but 57.4 / 81.5 ms at 80 rows, so the decoder takes it up to `COLUMN_ROWS` rows). The same values as
    `cached_block_step` (same formulas per element; the matmuls' sums in another order). The cache is the
    same (`write_slots`, never in place: XLA writes a loop variable's buffer in place)."""
    ln_1_g, ln_1_b, attn_w, attn_b, proj_w, proj_b, ln_2_g, ln_2_b, fc_w, fc_b, mlp_w, mlp_b = weights
    context_keys, context_values, keys, values = layer_cache
    width, n = xt.shape[0], xt.shape[1]
    head_dim = width // n_head
    batch = context_keys.shape[0] if context_keys.shape[0] is not None else tf.shape(context_keys)[0]
    rows = n // batch if isinstance(batch, int) else tf.shape(xt)[1] // batch

    def project(kernel, h, bias):  # (out, in) @ (in, N) + bias -> (out, N)
        return tf.matmul(kernel, h) + bias[:, None]

    def heads(t):  # (C, N) -> (B, H, W, D): each group's W rows, slot-major as the cache holds them (T = 1)
        return tf.transpose(tf.reshape(t, (n_head, head_dim, -1, rows)), (2, 0, 3, 1))

    qkv = project(attn_w, layer_norm(xt, ln_1_g, ln_1_b, epsilon, axis=0), attn_b)  # (3C, N)
    q, k, v = heads(qkv[:width]), heads(qkv[width : 2 * width]), heads(qkv[2 * width :])
    start = tf.cast(slot, tf.int32) * rows
    keys = write_slots(keys, start, k)  # (B, H, L * W, D)
    values = write_slots(values, start, v)
    out = segmented_attention(q, [(context_keys, context_values), (keys, values)], attention_bias)  # (B, H, W, D)
    out = tf.reshape(tf.transpose(out, (1, 3, 0, 2)), (width, -1))  # (C, N)
    xt = xt + project(proj_w, out, proj_b)
    h = gpt2_gelu(project(fc_w, layer_norm(xt, ln_2_g, ln_2_b, epsilon, axis=0), fc_b))  # (4C, N)
    return xt + project(mlp_w, h, mlp_b), (context_keys, context_values, keys, values)


def write_slots(cache, start, update, inplace=False):
    """``cache`` (B, H, S, D) with ``update`` (B, H, n, D) written at slots ``[start, start + n)`` (start may be
    symbolic).

    Not ``inplace``: one ``dynamic_update_slice``, in place inside an XLA program (a loop variable's buffer) but a
    copy of the whole cache outside one (TensorFlow runs it as its own small XLA program: 263 ms of a 2.0 s
    bfloat16 beam call at 80 rows). ``inplace``: TensorFlow's ``InplaceUpdate`` on the cache's rows viewed as
    (B * H * S, D), which writes into the input's buffer and returns it: the old tensor *is* the new one, so
    the cache must be one the caller created fresh (`GPT2.prefill(..., inplace=True)` makes it with ``Empty``,
    an op TensorFlow never folds into a constant nor shares between calls) and passes along without keeping
    the old value. ``start`` is clamped to ``[0, S - n]`` as ``dynamic_update_slice`` clamps it (``InplaceUpdate``
    wraps an out-of-range row around, modulo the rows: it would write another head's slots). Plain graphs and
    eager only."""
    if not inplace:
        zero = tf.zeros((), tf.int32)
        return ops.slice_update(cache, (zero, zero, start, zero), update)
    shape = tf.shape(cache)
    slots, depth = shape[2], shape[3]
    n = tf.shape(update)[2]
    start = tf.clip_by_value(start, 0, slots - n)  # dynamic_update_slice's clamp: every row inside the buffer
    rows = tf.range(shape[0] * shape[1])[:, None] * slots + start + tf.range(n)[None]  # (B * H, n)
    flat = tf.raw_ops.InplaceUpdate(x=tf.reshape(cache, (-1, depth)), i=tf.reshape(rows, (-1,)),
                                    v=tf.reshape(update, (-1, depth)))  # the cache's buffer, written
    return tf.ensure_shape(tf.reshape(flat, shape), cache.shape)


def _rows_per_group(x, context_keys):
    """W = N / B: the rows of x (N, T, C) per group of the context (B, H, K, D) (static where both are)."""
    if x.shape[0] is not None and context_keys.shape[0] is not None:
        return x.shape[0] // context_keys.shape[0]
    return tf.shape(x)[0] // tf.shape(context_keys)[0]


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2MLP(keras.layers.Layer):
    """``c_proj(gelu_new(c_fc(x)))`` with residual dropout; hidden width ``4 * n_embd`` as in GPT-2."""

    def __init__(self, n_embd, n_inner=None, resid_pdrop=0.0, initializer_range=0.02, quantization=None, **kwargs):
        super().__init__(**kwargs)
        self.n_embd = n_embd
        self.n_inner = n_inner or 4 * n_embd
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        self.quantization = check_quantization(quantization)
        self.c_fc = projection(self.n_inner, initializer_range, quantization, name="c_fc")
        self.c_proj = projection(n_embd, initializer_range, quantization, name="c_proj")
        self.dropout = keras.layers.Dropout(resid_pdrop, name="dropout")

    def build(self, input_shape=None):
        self.c_fc.build((None, None, self.n_embd))
        self.c_proj.build((None, None, self.n_inner))
        self.built = True

    def call(self, x, training=False):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))), training=training)  # (B, T, C)

    def get_config(self):
        config = super().get_config()
        config.update(n_embd=self.n_embd, n_inner=self.n_inner, resid_pdrop=self.resid_pdrop,
                      initializer_range=self.initializer_range)
        if self.quantization is not None:  # absent for float weights: float configs (and identities) unchanged
            config.update(quantization=self.quantization)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2Block(keras.layers.Layer):
    """One GPT-2 transformer block (pre-LayerNorm attention and MLP, each with a residual)."""

    def __init__(self, n_embd, n_head, layer_norm_epsilon=1e-5, attn_pdrop=0.0, resid_pdrop=0.0,
                 initializer_range=0.02, quantization=None, **kwargs):
        super().__init__(**kwargs)
        self.n_embd = n_embd
        self.n_head = n_head
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        self.quantization = check_quantization(quantization)
        self.ln_1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="ln_1")
        self.attn = GPT2Attention(n_embd, n_head, attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop,
                                  initializer_range=initializer_range, quantization=quantization, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="ln_2")
        self.mlp = GPT2MLP(n_embd, resid_pdrop=resid_pdrop, initializer_range=initializer_range,
                           quantization=quantization, name="mlp")

    def build(self, input_shape=None):
        shape = (None, None, self.n_embd)
        for layer in (self.ln_1, self.attn, self.ln_2, self.mlp):
            layer.build(shape)
        self.built = True

    def call(self, x, attention_bias=None, training=False):
        """x (B, T, C), attention_bias additive, broadcastable to (B, H, T, T) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x), attention_bias=attention_bias, training=training)
        return x + self.mlp(self.ln_2(x), training=training)

    def inference_weights(self):
        """The block's weights as tensors in its compute dtype, in `cached_block_step`'s order."""
        dtype = tf.as_dtype(self.compute_dtype)
        attn, mlp, ln_1, ln_2 = self.attn, self.mlp, self.ln_1, self.ln_2
        def kernel_and_bias(layer):  # an Int8Dense's kernel is an Int8Kernel (custom_layers.quantized)
            kernel = layer.inference_kernel() if isinstance(layer, Int8Dense) else variable_value(layer.kernel, dtype)
            return kernel, variable_value(layer.bias, dtype)

        # layer norms compute in float32 from their float32 weights, as Keras' LayerNormalization does
        return (ln_1.gamma.value, ln_1.beta.value, *kernel_and_bias(attn.c_attn), *kernel_and_bias(attn.c_proj),
                ln_2.gamma.value, ln_2.beta.value, *kernel_and_bias(mlp.c_fc), *kernel_and_bias(mlp.c_proj))

    def call_with_cache(self, x, layer_cache, slot, attention_bias, inplace=False, packed=False):
        """`cached_block_step` with this block's weights; returns (y (N, T, C), layer_cache)."""
        return cached_block_step(x, layer_cache, slot, attention_bias, self.inference_weights(),
                                 self.n_head, self.layer_norm_epsilon, inplace=inplace, packed=packed)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_embd=self.n_embd, n_head=self.n_head, layer_norm_epsilon=self.layer_norm_epsilon,
            attn_pdrop=self.attn_pdrop, resid_pdrop=self.resid_pdrop, initializer_range=self.initializer_range,
        )
        if self.quantization is not None:
            config.update(quantization=self.quantization)
        return config
