"""The one scaled dot-product attention kernel every attention layer of the library calls.

CLIP's `MultiHeadAttention` and `AttentionPool2d`, GPT-2's `GPT2Attention` (full pass and KV-cached step)
and the ClipCap mapper's `MapperAttention` differ only in their projections; the attention itself is
`dot_product_attention` (`segmented_attention` for GPT-2's cached step, whose keys are held in several
tensors), and every mask is an additive bias built by `mask_bias` / `causal_bias`.

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


def segmented_attention(q, segments, bias):
    """`dot_product_attention` over keys/values held in several tensors (a cached decoding step's).

    The scores against each segment are concatenated before one softmax, and the output is the sum of each
    segment's probabilities times its values: the same math as one attention over the concatenated keys,
    without concatenating (copying) the keys. GPT-2's cached step attends to the context (a prefix stored
    once for its W rows) and to the group's generated slots (`custom_layers.gpt2_block.cached_block_step`).

    Args:
        q: (B, H, Q, D) head-major queries (all the queries of a group of rows).
        segments: sequence of (keys, values) pairs, each (B, H, S_i, D); empty ones (S_i = 0) are skipped.
        bias: additive float32 mask broadcastable to (B, H, Q, sum S_i), keys in segment order.

    Returns:
        (B, H, Q, D) in the queries' dtype; scores and softmax in float32 for half-precision queries.
    """
    q = q * ops.cast(q.shape[-1] ** -0.5, q.dtype)
    lengths = [keys.shape[2] for keys, _ in segments]
    scores = ops.concatenate([ops.einsum("bhqd,bhsd->bhqs", q, keys) for (keys, _), n in zip(segments, lengths)
                              if n], axis=-1)  # (B, H, Q, S)
    dtype = backend.standardize_dtype(scores.dtype)
    if dtype in ("bfloat16", "float16"):  # softmax in float32 (a bf16 model's), the products in bf16 again
        scores = ops.cast(scores, "float32")
    probs = ops.cast(ops.softmax(scores + ops.cast(bias, scores.dtype), axis=-1), dtype)
    out, start = None, 0
    for (_, values), n in zip(segments, lengths):
        if n:
            part = ops.einsum("bhqs,bhsd->bhqd", probs[..., start : start + n], values)
            out, start = (part if out is None else out + part), start + n
    return out
