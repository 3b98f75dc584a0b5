"""In-graph pieces of the serving SavedModel (`models.image_captioning.serving`): nothing here needs the
repository once traced.

- `image_pixel_count`: the width x height an encoded JPEG / PNG / GIF / BMP announces in its header, read
  without decoding (so a decompression bomb is refused before any pixel buffer is allocated).
- `decode_images`: a 1-D batch of encoded images -> preprocessed pixels of the rows that decode, and which
  rows those are. Each row is decoded in a ``tf.data`` pipeline with ``ignore_errors()``: a row whose bytes
  are not an image, are truncated, exceed the pixel bound or would be resized beyond ``MAX_RESIZED_PIXELS``
  is dropped there instead of failing the whole request.
- `run_bucketed`: call XLA-compiled functions of static batch sizes (powers of two up to a maximum) on a
  batch of any size: chunks of at most the maximum, each padded to the next bucket, as `ClipCap` pads.
- `token_pieces` / `tokens_to_text`: GPT-2 byte-level token ids -> text, equal to
  ``tokenizer.decode(ids).strip()`` (a table of each token's raw bytes, joined, invalid UTF-8 replaced by
  U+FFFD as the tokenizers library does, then Python's ``str.strip`` whitespace removed).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from utils.clip_preprocessing import tf_preprocess  # noqa: E402

#: PIL's default decompression-bomb bound (``Image.MAX_IMAGE_PIXELS``), which `utils.image_io` applies too
DEFAULT_MAX_PIXELS = 89_478_485
#: the characters Python's ``str.strip()`` removes, as an RE2 class (RE2's \\s lacks \\v, \\x1c-\\x1f, \\x85 ...)
_PY_SPACE = r"[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]"


# ------------------------------------------------------------------------------------------------ images


def _read_uint(data, start, length, big_endian):
    """The unsigned integer of ``length`` bytes at ``start`` of a scalar string, as int64 (error if short)."""
    raw = tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8)
    raw = tf.ensure_shape(tf.cast(raw, tf.int64), (length,))  # fails (the row is dropped) when truncated
    weights = [256 ** (length - 1 - i) if big_endian else 256 ** i for i in range(length)]
    return tf.reduce_sum(raw * tf.constant(weights, tf.int64))


def image_pixel_count(data):
    """width * height (int64) announced by the header of an encoded JPEG, PNG, GIF or BMP (scalar string);
    InvalidArgumentError for anything else (not an image, or a format the serving graph does not decode)."""
    magic = tf.strings.substr(data, 0, 8)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    def png():  # IHDR: width, height as big-endian uint32 at bytes 16 and 20
        return _read_uint(data, 16, 4, True) * _read_uint(data, 20, 4, True)

    def gif():  # logical screen: little-endian uint16 at bytes 6 and 8
        return _read_uint(data, 6, 2, False) * _read_uint(data, 8, 2, False)

    def bmp():  # BITMAPCOREHEADER (12 bytes): uint16; later headers: int32 (a negative height is top-down)
        core = tf.equal(_read_uint(data, 14, 4, False), 12)

        def signed(start):
            value = _read_uint(data, start, 4, False)
            return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

        return tf.cond(core, lambda: _read_uint(data, 18, 2, False) * _read_uint(data, 20, 2, False),
                       lambda: signed(18) * signed(22))

    def unknown():
        # a condition on the data, so that it fails when run, not when traced
        tf.debugging.assert_negative(tf.strings.length(data), message="not a JPEG, PNG, GIF or BMP image")
        return tf.constant(0, tf.int64)

    index = tf.case([
        (tf.equal(tf.strings.substr(magic, 0, 3), b"\xff\xd8\xff"), lambda: tf.constant(0)),
        (tf.equal(magic, b"\x89PNG\r\n\x1a\n"), lambda: tf.constant(1)),
        (tf.equal(tf.strings.substr(magic, 0, 4), b"GIF8"), lambda: tf.constant(2)),
        (tf.equal(tf.strings.substr(magic, 0, 2), b"BM"), lambda: tf.constant(3)),
    ], default=lambda: tf.constant(4))
    return tf.switch_case(index, [jpeg, png, gif, bmp, unknown])


def decode_one(data, n_px, max_pixels=DEFAULT_MAX_PIXELS):
    """One encoded image (scalar string) -> (n_px, n_px, 3) float32, OpenAI's preprocessing in graph
    (`utils.clip_preprocessing.tf_preprocess`); InvalidArgumentError for bad bytes or too many pixels."""
    pixels = image_pixel_count(data)
    tf.debugging.assert_less_equal(pixels, tf.constant(max_pixels, tf.int64),
                                   message=f"more than {max_pixels} pixels: refused as a possible decompression bomb")
    tf.debugging.assert_positive(pixels, message="an empty (0-pixel) image")
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)  # GIF: first frame
    image = tf.ensure_shape(image, (None, None, 3))
    return tf_preprocess(image, n_px)


def decode_images(images, n_px, max_pixels=DEFAULT_MAX_PIXELS):
    """Encoded images (N,) string -> (rows (M,) int32 of the images that decoded, pixels (M, n_px, n_px, 3)).

    Rows keep their order; a row that fails (bad bytes, truncated, too many pixels) is left out, so one bad
    image never fails the others.
    """
    n = tf.shape(images)[0]
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images))
    ds = ds.map(lambda i, data: (i, decode_one(data, n_px, max_pixels)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).ignore_errors()
    # one sentinel row, so the single batch below exists even when every image failed (or N == 0)
    sentinel = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int32), tf.zeros((n_px, n_px, 3), tf.float32)))
    rows, pixels = ds.concatenate(sentinel).batch(tf.cast(n, tf.int64) + 1).get_single_element()
    return rows[:-1], pixels[:-1]


# ---------------------------------------------------------------------------------------------- batching


def bucket_sizes(max_batch_size):
    """The compiled batch sizes: powers of two up to ``max_batch_size`` (itself a power of two)."""
    if max_batch_size < 1 or max_batch_size & (max_batch_size - 1):
        raise ValueError(f"max_batch_size must be a power of two >= 1, got {max_batch_size}")
    return [1 << i for i in range(max_batch_size.bit_length())]


def run_bucketed(functions, inputs, fills, outputs):
    """``functions[i]`` (static batch ``2**i``) applied to ``inputs`` (tensors of N rows) of any N.

    Chunks of at most the largest bucket, each padded with ``fills[j]`` rows to the smallest bucket that holds
    it (as `ClipCap` and `PrefixDecoder` pad, so the compiled shapes are the same). ``outputs``: a list of
    (dtype, shape without the batch axis) of what each function returns. Returns tensors of N rows.
    """
    sizes = [1 << i for i in range(len(functions))]
    largest = sizes[-1]
    n = tf.shape(inputs[0])[0]
    arrays = [tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False, element_shape=(None, *shape))
              for dtype, shape in outputs]

    def branch(function, size, chunk, m):
        def call():
            padded = [tf.pad(x, [[0, size - m]] + [[0, 0]] * (len(x.shape) - 1), constant_values=fill)
                      for x, fill in zip(chunk, fills, strict=True)]
            return [y[:m] for y in function(*padded)]
        return call

    def body(i, *arrays):
        start = i * largest
        m = tf.minimum(largest, n - start)
        chunk = [x[start : start + m] for x in inputs]
        index = tf.reduce_sum(tf.cast(tf.constant(sizes) < m, tf.int32))  # the smallest bucket >= m
        results = tf.switch_case(index, [branch(f, s, chunk, m) for f, s in zip(functions, sizes, strict=True)])
        return (i + 1, *[a.write(i, r) for a, r in zip(arrays, results, strict=True)])

    chunks = (n + largest - 1) // largest
    _, *arrays = tf.while_loop(lambda i, *_: i < chunks, body, (tf.constant(0), *arrays))
    return [a.concat() for a in arrays]


# -------------------------------------------------------------------------------------------------- text


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map (OpenAI's ``bytes_to_unicode``); inverted in `token_pieces`."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def token_pieces(tokenizer, vocab_size):
    """The raw bytes of every token id below ``vocab_size`` (ids the tokenizer lacks: empty), as a numpy
    object array; added tokens (``<|endoftext|>``) are their text, as ``tokenizer.decode`` writes them."""
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = np.full((vocab_size,), b"", dtype=object)
    for token, i in tokenizer.get_vocab().items():
        if i >= vocab_size:
            continue
        if i in added:
            pieces[i] = added[i].encode("utf-8")
        else:
            pieces[i] = bytes(byte_of[c] for c in token)
    return pieces


def tokens_to_text(pieces, tokens, lengths):
    """tokens (N, T) int32, lengths (N,) -> (N,) string: the first ``lengths[i]`` tokens of each row joined,
    invalid UTF-8 replaced by U+FFFD, surrounding whitespace stripped (= ``tokenizer.decode(...).strip()``)."""
    keep = tf.range(tf.shape(tokens)[1])[None] < tf.cast(lengths, tf.int32)[:, None]  # (N, T)
    parts = tf.where(keep, tf.gather(pieces, tokens), "")
    text = tf.strings.reduce_join(parts, axis=-1)  # (N,)
    text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    return tf.strings.regex_replace(text, f"^{_PY_SPACE}+|{_PY_SPACE}+$", "")
