"""The training input pipeline: (CLIP embedding, caption token ids, mask) batches as a ``tf.data.Dataset``.

As in the official ClipCap ``ClipCocoDataset``:

- every caption is tokenized once; captions longer than ``max_length`` tokens are cut, shorter ones padded;
- ``max_length`` is given, or chosen from the caption lengths: ``min(int(mean + 10 * std), max)`` (std with
  Bessel's correction, as ``torch.std``);
- the mask (B, K + T) is 1 over the K prefix positions and the real tokens, 0 over padding. It is both
  GPT-2's attention mask and, from position K on, the loss mask.

Differences: a caption that does not end with the stop token gets it appended (``append_stop=True``), so
that the model learns to stop where generation stops; the padding id is never used to find padding (the
mask is), so token id 0 stays a real token.

Batches come in an order fixed by ``(seed, epoch)``: a run resumed at batch b of epoch e sees exactly the
batches an uninterrupted run would (``skip_batches``).

Example::

    tokens, mask = encode_captions(tokenizer, data.captions, prefix_length=10)
    ds = caption_batches(embeddings, data.image_index, tokens, mask, batch_size=40, seed=0, epoch=0)
    for embedding, token_ids, mask in ds: ...     # (40, D) float32, (40, T) int32, (40, 10 + T) float32
"""

import numpy as np

from utils.tokenizer import stop_token_id


def official_max_length(lengths):
    """ClipCap's choice of the padded length: ``min(int(mean + 10 * std), max)`` of the caption lengths."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.size == 0:
        raise ValueError("no captions: cannot choose a maximum length")
    std = lengths.std(ddof=1) if lengths.size > 1 else 0.0
    return int(min(int(lengths.mean() + 10 * std), int(lengths.max())))


def tokenize_captions(tokenizer, captions, stop_token=".", append_stop=True):
    """Token id lists, one per caption; ``stop_token`` appended where a caption does not end with it."""
    stop = stop_token_id(tokenizer, stop_token) if append_stop else None
    out = []
    for caption in captions:
        ids = list(tokenizer.encode(caption))
        if not ids:
            raise ValueError(f"caption {caption!r} tokenizes to nothing")
        if stop is not None and ids[-1] != stop:
            ids.append(stop)
        out.append(ids)
    return out


def pad_tokens(token_lists, max_length, prefix_length, pad_id=0):
    """(N, T) int32 token ids (cut / right-padded to ``max_length``) and (N, K + T) float32 mask."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = np.full((len(token_lists), max_length), pad_id, dtype=np.int32)
    mask = np.zeros((len(token_lists), prefix_length + max_length), dtype=np.float32)
    mask[:, :prefix_length] = 1.0
    for i, ids in enumerate(token_lists):
        ids = ids[:max_length]
        tokens[i, : len(ids)] = ids
        mask[i, prefix_length : prefix_length + len(ids)] = 1.0
    return tokens, mask


def encode_captions(tokenizer, captions, prefix_length, max_length=None, stop_token=".", append_stop=True):
    """Tokenize, choose ``max_length`` (official rule) unless given, pad: returns (tokens, mask)."""
    token_lists = tokenize_captions(tokenizer, captions, stop_token, append_stop)
    if max_length is None:
        max_length = official_max_length([len(t) for t in token_lists])
    return pad_tokens(token_lists, max_length, prefix_length)


def epoch_order(num_captions, seed, epoch, shuffle=True):
    """The caption order of one epoch: a permutation drawn from ``(seed, epoch)`` (or 0..N-1)."""
    if not shuffle:
        return np.arange(num_captions)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_captions)


def num_batches(num_captions, batch_size, drop_remainder=True):
    return num_captions // batch_size if drop_remainder else -(-num_captions // batch_size)


def caption_batches(embeddings, image_index, tokens, mask, batch_size, seed=0, epoch=0, shuffle=True,
                    skip_batches=0, drop_remainder=True):
    """A ``tf.data.Dataset`` of (embedding (B, D), token ids (B, T), mask (B, K+T)) for one epoch.

    Args:
        embeddings: (N_images, D) CLIP embeddings, one per image.
        image_index: (N_captions,) the image of every caption.
        tokens, mask: from `encode_captions`.
        batch_size: the global batch size.
        seed, epoch, shuffle: the caption order (`epoch_order`).
        skip_batches: start at this batch of the epoch (exact resume).
        drop_remainder: drop the last incomplete batch (the official ``drop_last=True``; static shapes).
    """
    import tensorflow as tf

    image_index = np.asarray(image_index, np.int64)
    if len(image_index) != len(tokens) or len(tokens) != len(mask):
        raise ValueError(f"{len(image_index)} captions, {len(tokens)} token rows and {len(mask)} mask rows")
    if len(image_index) and image_index.max() >= len(embeddings):
        raise ValueError(f"image index {image_index.max()} out of range for {len(embeddings)} embeddings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(len(tokens), seed, epoch, shuffle)[skip_batches * batch_size :]
    embeddings_t = tf.constant(np.asarray(embeddings, np.float32))
    image_index_t = tf.constant(image_index)
    tokens_t = tf.constant(np.asarray(tokens, np.int32))
    mask_t = tf.constant(np.asarray(mask, np.float32))

    def gather(rows):
        return (tf.gather(embeddings_t, tf.gather(image_index_t, rows)), tf.gather(tokens_t, rows),
                tf.gather(mask_t, rows))

    ds = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
