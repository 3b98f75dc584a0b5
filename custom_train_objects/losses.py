"""The captioning loss: next-token cross-entropy over the caption tokens only.

With a prefix of K positions and T caption tokens, GPT-2's logits at positions K-1 .. K+T-2 predict tokens
0 .. T-1 (the last prefix position predicts the first word, as in the official code). The mask (B, K+T) of
the input pipeline says which tokens are real: prefix positions never enter the loss and padding is masked
out **by the mask**. The official code instead passes ``ignore_index=0`` to ``cross_entropy``, which also
drops every real token whose id is 0 (``!`` in GPT-2's vocabulary; any token in another vocabulary).

Example::

    logits = gpt2(token_ids=tokens, inputs_embeds=prefix, padding_mask=mask)    # (B, K+T, V)
    loss = caption_loss(logits, tokens, mask, prefix_length=K)                  # mean over real tokens
"""

import tensorflow as tf


def caption_loss_sum(logits, token_ids, mask, prefix_length):
    """(sum of the token cross-entropies, number of real tokens): float32 scalars.

    Args:
        logits: (B, K+T, V) GPT-2 logits over [prefix, tokens] (any float dtype; computed in float32).
        token_ids: (B, T) int caption tokens (padding: any id).
        mask: (B, K+T) 1 = real (prefix and caption tokens), 0 = padding.
        prefix_length: K.
    """
    k = prefix_length
    length = tf.shape(token_ids)[1]
    predicted = tf.cast(logits[:, k - 1 : k - 1 + length], tf.float32)  # (B, T, V)
    weights = tf.cast(mask[:, k:], tf.float32)  # (B, T)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(token_ids, tf.int32),
                                                        logits=predicted)  # (B, T)
    return tf.reduce_sum(ce * weights), tf.reduce_sum(weights)


def caption_loss(logits, token_ids, mask, prefix_length):
    """Mean cross-entropy over the real caption tokens of the batch (see `caption_loss_sum`)."""
    total, count = caption_loss_sum(logits, token_ids, mask, prefix_length)
    return total / tf.maximum(count, 1.0)
