"""The one scaled dot-product attention kernel every attention layer of the library calls.

CLIP's `MultiHeadAttention` and `AttentionPool2d`, GPT-2's `GPT2Attention` (full pass and KV-cached step)
and the ClipCap mapper's `MapperAttention` differ only in their projections; the attention itself is
`dot_product_attention`, and every mask is an additive bias built by `mask_bias` / `causal_bias`.

Head layout (one for every caller):

- queries ``q``: (B, Tq, H, D), token-major, as a projection's output reshapes to without a transpose;
- keys and values ``k``, ``v``: (B, H, Tk, D), head-major, the layout GPT-2's cache stores them in, so a
  cached decoding step reads the whole cache as one batched (B, H) matmul without transposing it;
- the result: (B, Tq, H, D), token-major, so ``reshape(out, (B, Tq, H * D))`` merges the heads.

Masks are additive biases (0 = attend, `MASK_VALUE` = masked), broadcastable to the scores (B, H, Tq, Tk).
`MASK_VALUE` is finite on purpose: ``exp`` of a masked score underflows to exactly 0 (the same result as
``-inf`` wherever a row attends to something), and a row whose every key is masked (a padding query of a
right-padded batch) stays finite (uniform weights) instead of NaN.

Example::

    bias = causal_bias(ops.arange(T), ops.arange(T))              # (T, T): key <= query
    out = dot_product_attention(q, k, v, bias=bias)               # (B, T, H, D)
"""

from keras import backend, ops

# Added to the scores of masked slots (future or padded keys); see the module docstring for why finite.
MASK_VALUE = -1e9


def split_heads(x, heads):
    """(B, T, H * D) -> (B, T, H, D), token-major (queries; keys and values after `heads_first`)."""
    batch, length = ops.shape(x)[0], ops.shape(x)[1]
    return ops.reshape(x, (batch, length, heads, x.shape[-1] // heads))


def heads_first(x):
    """(B, T, H, D) -> (B, H, T, D): keys and values in the kernel's head-major layout."""
    return ops.transpose(x, (0, 2, 1, 3))


def merge_heads(x):
    """(B, T, H, D) -> (B, T, H * D): the kernel's output back to the model width."""
    batch, length = ops.shape(x)[0], ops.shape(x)[1]
    return ops.reshape(x, (batch, length, x.shape[-2] * x.shape[-1]))


def mask_bias(allowed):
    """A boolean mask (True = attend), any shape broadcastable to the scores -> the additive float32 bias."""
    return ops.where(allowed, 0.0, MASK_VALUE)


def causal_bias(query_positions, key_positions, key_mask=None):
    """The additive bias letting each query attend to keys at its own position or before.

    Args:
        query_positions: (Tq,) int positions of the queries.
        key_positions: (Tk,) int positions of the keys (the cache slots for a cached step).
        key_mask: optional (B, Tk) padding mask of the keys (1 / True = real, 0 = pad); pads are never
            attended to.

    Returns:
        (1, 1, Tq, Tk) float32, or (B, 1, Tq, Tk) with ``key_mask``.
    """
    allowed = key_positions[None, :] <= query_positions[:, None]  # (Tq, Tk)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_mask is not None:
        allowed = ops.logical_and(allowed, ops.cast(key_mask, "bool")[:, None, None, :])  # (B, 1, Tq, Tk)
    return mask_bias(allowed)


def dot_product_attention(q, k, v, bias=None, dropout=None, training=False, scale=None):
    """``softmax(q k^T * scale + bias) v`` per head.

    Args:
        q: (B, Tq, H, D) queries.
        k, v: (B, H, Tk, D) keys and values.
        bias: additive mask broadcastable to (B, H, Tq, Tk) (see `mask_bias`, `causal_bias`), or None.
        dropout: a callable ``dropout(probs, training=training)`` applied to the attention weights (a
            ``keras.layers.Dropout`` owned by the calling layer), or None.
        training: passed to ``dropout``.
        scale: multiplies the queries before the product; default ``D ** -0.5``.

    Returns:
        (B, Tq, H, D) in the queries' dtype. Half-precision scores (a bfloat16 model's) are cast to float32
        for the bias and the softmax, and the probabilities back for the product with ``v``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * ops.cast(scale, q.dtype)
    scores = ops.einsum("bthd,bhsd->bhts", q, k)  # (B, H, Tq, Tk)
    dtype = backend.standardize_dtype(scores.dtype)
    if dtype in ("bfloat16", "float16"):  # softmax in float32 (a bf16 model's), the product in bf16 again
        scores = ops.cast(scores, "float32")
    if bias is not None:
        scores = scores + ops.cast(bias, scores.dtype)
    probs = ops.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs, training=training)
    return ops.einsum("bhts,bhsd->bthd", ops.cast(probs, dtype), v)  # (B, Tq, H, D)


def grouped_cached_attention(q, context_keys, context_values, keys, values, bias):
    """`dot_product_attention` for a cached decoding step of W rows per group (the beams of one image).

    The rows of a group share the keys/values of their context (the prefix, stored once per group) and read
    their own generated positions from the group's slots: every query of a group is scored against the
    context and against all W * L slots of its group in one batched (B, H) matmul each, and ``bias`` masks
    the slots a row does not own (another lineage's, a future position). The same math as one softmax over
    each row's own K + L keys: masked scores add exact zeros to the softmax and to the product with values.

    Args:
        q: (B, W, T, H, D) queries of the W rows of each of B groups.
        context_keys, context_values: (B, H, K, D), shared by the W rows of a group (K may be 0).
        keys, values: (B, H, W, L, D), the group's generated slots (row-major: slot l of row w at w * L + l).
        bias: additive float32 mask broadcastable to (B, 1, W * T, K + W * L), queries row-major ((w, t) at
            w * T + t), keys as ``[context, slots]``.

    Returns:
        (B, W, T, H, D) in the queries' dtype; scores and softmax in float32 for half-precision queries.
    """
    rows, length, heads, depth = q.shape[1], q.shape[2], q.shape[3], q.shape[4]
    context_length, slots = context_keys.shape[2], keys.shape[2] * keys.shape[3]
    q = q * ops.cast(depth**-0.5, q.dtype)
    q = ops.reshape(ops.transpose(q, (0, 3, 1, 2, 4)), (-1, heads, rows * length, depth))  # (B, H, W*T, D)
    keys = ops.reshape(keys, (-1, heads, slots, depth))  # (B, H, W*L, D): a bitcast
    values = ops.reshape(values, (-1, heads, slots, depth))
    scores = ops.einsum("bhqd,bhsd->bhqs", q, keys)  # (B, H, W*T, W*L)
    if context_length:
        scores = ops.concatenate([ops.einsum("bhqd,bhsd->bhqs", q, context_keys), scores], axis=-1)
    dtype = backend.standardize_dtype(scores.dtype)
    if dtype in ("bfloat16", "float16"):  # softmax in float32 (a bf16 model's), the products in bf16 again
        scores = ops.cast(scores, "float32")
    probs = ops.cast(ops.softmax(scores + ops.cast(bias, scores.dtype), axis=-1), dtype)  # (B, H, W*T, K+W*L)
    out = ops.einsum("bhqs,bhsd->bhqd", probs[..., context_length:], values)  # (B, H, W*T, D)
    if context_length:
        out = out + ops.einsum("bhqs,bhsd->bhqd", probs[..., :context_length], context_values)
    return ops.transpose(ops.reshape(out, (-1, heads, rows, length, depth)), (0, 2, 3, 1, 4))  # (B, W, T, H, D)
