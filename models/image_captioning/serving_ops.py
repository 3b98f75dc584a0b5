"""In-graph pieces of the serving SavedModel (`models.image_captioning.serving`): nothing here needs the
repository once traced.

- `read_header` / `read_headers`: the format, width and height an encoded JPEG / PNG / GIF / BMP announces,
  read without decoding (never failing on short or garbage bytes; a JPEG of more than
  `utils.image_io.MAX_JPEG_SCANS` scans reads as unreadable, as `read_image` refuses it); `admit`: which
  rows may be decoded (the per-image bound ``max_pixels``, the preprocessing's resize bound, the request's
  ``max_request_pixels``).
- the decoding of admitted rows (`models.image_captioning.serving_pixels.decode_images`) uses them.
- `run_bucketed`: call XLA-compiled functions of static batch sizes (powers of two up to a maximum) on a
  batch of any size: chunks of at most the maximum, each padded to the next bucket, as `ClipCap` pads.
- `token_pieces` / `tokens_to_text`: GPT-2 byte-level token ids -> text, equal to
  ``tokenizer.decode(ids).strip()`` (a table of each token's raw bytes, joined, invalid UTF-8 replaced by
  U+FFFD as the tokenizers library does, then Python's ``str.strip`` whitespace removed).
"""

import numpy as np
import tensorflow as tf

from utils.clip_preprocessing import MAX_RESIZED_PIXELS
from utils.image_io import MAX_JPEG_SCANS

#: PIL's default decompression-bomb bound (``Image.MAX_IMAGE_PIXELS``), which `utils.image_io` applies too
DEFAULT_MAX_PIXELS = 89_478_485
#: the most pixels (width x height, summed over the rows) one ``serving_default`` request decodes: rows are
#: admitted in order while they fit in what is left; a row that does not fit gets "" and NaN like a bad image
DEFAULT_MAX_REQUEST_PIXELS = 2 * DEFAULT_MAX_PIXELS
#: a GIF is decoded up to the end of its first frame only; finding that end walks its records and data
#: sub-blocks one at a time, at most this many (16 MiB of first-frame data in the usual 255-byte sub-blocks)
MAX_GIF_BLOCKS = 1 << 16
#: the formats the graph decodes, tested in ``tf.io.decode_image``'s order on the same first bytes; a row's
#: ``format`` (`read_headers`) is an index here, -1 for anything else (WebP, JPEG XL, TIFF, text ...)
FORMATS = ("jpeg", "png", "gif", "bmp")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM")
_HEAD = 32  # the header bytes read for PNG, GIF and BMP
#: the characters Python's ``str.strip()`` removes, as an RE2 class (RE2's \\s lacks \\v, \\x1c-\\x1f, \\x85 ...)
_PY_SPACE = r"[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]"


# ------------------------------------------------------------------------------------------------ images
#
# Two tf.data passes over the request. The first reads each row's header (never its pixels) and the rows are
# admitted (`admit`); the second decodes only the admitted rows (a `filter` before the `map`: the decoder never
# sees a refused row). The header readers below never fail, whatever the length of the bytes (a read past the
# end gives -1), except libjpeg's for a JPEG whose header is broken: that row is dropped by ``ignore_errors``,
# i.e. refused too.


def _head_bytes(data, n=_HEAD):
    """The first ``n`` bytes of a scalar string as int64 (n,), -1 past its end."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, n), tf.uint8), tf.int64)
    return tf.reshape(tf.pad(raw, [[0, n - tf.size(raw)]], constant_values=-1), (n,))


def _uint(head, start, length, big_endian=False):
    """The unsigned integer of ``length`` bytes at ``start`` of `_head_bytes`' vector (-1 if one is missing)."""
    raw = head[start : start + length]
    weights = [256 ** (length - 1 - i) if big_endian else 256**i for i in range(length)]
    value = tf.reduce_sum(raw * tf.constant(weights, tf.int64))
    return tf.where(tf.reduce_all(raw >= 0), value, tf.constant(-1, tf.int64))


def _int32(value):
    """A little-endian uint32 read by `_uint` as the signed int32 it encodes."""
    return tf.where(value >= 2**31, value - 2**32, value)


def _size(data):
    return tf.cast(tf.strings.length(data), tf.int64)


def _result(valid, width, height, pixels, size):
    """(width, height, pixels, bytes to decode), pixels -1 for an unreadable header."""
    return width, height, tf.where(valid, pixels, tf.constant(-1, tf.int64)), size


def jpeg_scans(data):
    """The scans (SOS markers ``FF DA``, which entropy-coded data never holds) of a scalar string, as
    `utils.image_io` counts them."""
    body = tf.io.decode_raw(data, tf.uint8)
    sos = tf.equal(body[:-1], 0xFF) & tf.equal(body[1:], 0xDA)
    return tf.reduce_sum(tf.cast(sos, tf.int64))


def _jpeg(data):
    # libjpeg's header reader (the decoder's own: same SOF, same dimensions); reads no scan data. A JPEG of
    # more than MAX_JPEG_SCANS scans is unreadable here: each scan is a pass over the whole image (a CPU bomb)
    shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
    valid = jpeg_scans(data) <= MAX_JPEG_SCANS
    return _result(valid, shape[1], shape[0], shape[0] * shape[1], _size(data))


def _png(data):
    # IHDR, which libpng requires first: width, height big-endian at bytes 16 and 20, both in 1 .. 2**31 - 1
    head = _head_bytes(data)
    width, height = _uint(head, 16, 4, big_endian=True), _uint(head, 20, 4, big_endian=True)
    ihdr = tf.reduce_all(tf.equal(head[12:16], tf.constant(list(b"IHDR"), tf.int64)))
    valid = ihdr & (width > 0) & (height > 0) & (width < 2**31) & (height < 2**31)
    return _result(valid, width, height, width * height, _size(data))


def _bmp(data):
    # as TensorFlow's BMP decoder reads it: >= 32 bytes, int32 width at 18 (> 0), int32 height at 22 (< 0 for
    # top-down rows); that decoder also requires the file to hold every pixel uncompressed (no bomb possible)
    head = _head_bytes(data)
    width, height = _int32(_uint(head, 18, 4)), tf.abs(_int32(_uint(head, 22, 4)))
    valid = (head[_HEAD - 1] >= 0) & (width > 0) & (height > 0)
    return _result(valid, width, height, width * height, _size(data))


def _colour_table(packed):
    """The bytes of the colour table a GIF's packed flags byte announces (flag 0x80: 3 * 2**(1 + low 3 bits))."""
    present = (packed >= 0) & (tf.bitwise.bitwise_and(packed, 0x80) > 0)
    size = 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), tf.bitwise.bitwise_and(packed, 7))
    return tf.where(present, size, tf.constant(0, tf.int64))


def _gif_first_frame(body, start, stop_at_descriptor=False):
    """Walk a GIF's records from ``start`` (after the global colour table) to the end of its first frame.

    ``body``: the file as uint8 bytes (read one at a time as int64: no widened copy of the whole file). Extension records (0x21, label, data sub-blocks) are skipped; the first
    image descriptor (0x2C) gives the frame's width and height; its data sub-blocks are followed to their
    zero-length terminator, as giflib follows them. Returns (width, height, end: the offset just past that
    terminator, ok, descriptor: the image descriptor's offset, control: the offset of the packed flags of the
    last graphic control extension before it, -1 if none); not ok for a truncated file, an unknown record, a
    trailer before any image, or more than `MAX_GIF_BLOCKS` steps. ``stop_at_descriptor``: stop there (``end``
    is then meaningless): what `serving_pixels` needs of an admitted GIF.
    """
    n = tf.size(body, out_type=tf.int64)

    def at(i):
        return tf.where(i < n, tf.cast(tf.gather(body, tf.minimum(i, n - 1)), tf.int64), tf.constant(-1, tf.int64))

    def step(pos, mode, status, width, height, descriptor, control):
        # mode 0: at a record; 1: in an extension's sub-blocks; 2: in the first image's sub-blocks
        # status 0: walking, 1: found the end of the first frame, 2: not a GIF giflib decodes
        byte = at(pos)
        extension = tf.equal(mode, 0) & tf.equal(byte, 0x21)
        image = tf.equal(mode, 0) & tf.equal(byte, 0x2C)
        fields = [at(pos + k) for k in range(5, 10)]  # width (2), height (2), packed flags
        table = _colour_table(fields[4])
        chain = mode > 0
        terminator = chain & tf.equal(byte, 0)
        broken = (tf.equal(mode, 0) & ~extension & ~image) | (chain & (byte < 0)) | \
            (image & tf.reduce_any(tf.stack(fields) < 0))
        control = tf.where(extension & tf.equal(at(pos + 1), 0xF9) & tf.equal(at(pos + 2), 4), pos + 3, control)
        descriptor = tf.where(image, pos, descriptor)
        pos = tf.where(extension, pos + 2,  # the label, then its sub-blocks
                       tf.where(image, pos + 10 + table + 1,  # descriptor, local table, LZW code size
                                tf.where(chain, pos + tf.maximum(byte, 0) + 1, pos)))
        width = tf.where(image, fields[0] + 256 * fields[1], width)
        height = tf.where(image, fields[2] + 256 * fields[3], height)
        found = (terminator & tf.equal(mode, 2)) | (image & stop_at_descriptor)
        status = tf.where(broken, 2, tf.where(found, 1, status))
        mode = tf.where(extension, 1, tf.where(image, 2, tf.where(terminator & tf.equal(mode, 1), 0, mode)))
        return pos, mode, status, width, height, descriptor, control

    minus_one = tf.constant(-1, tf.int64)
    pos, _, status, width, height, descriptor, control = tf.while_loop(
        lambda pos, mode, status, *_: tf.equal(status, 0), step,
        (start, tf.constant(0), tf.constant(0), minus_one, minus_one, minus_one, minus_one),
        maximum_iterations=MAX_GIF_BLOCKS)
    return width, height, pos, tf.equal(status, 1), descriptor, control


def _gif(data):
    # giflib reads (slurps) every frame, each as large as its own descriptor says (not bounded by the logical
    # screen), and TensorFlow's canvas is the largest frame: so the graph decodes the bytes up to the end of
    # the first frame followed by a trailer (";"), and counts max(screen, first frame) pixels
    head = _head_bytes(data)
    body = tf.io.decode_raw(data, tf.uint8)
    width, height, end, ok, _, _ = _gif_first_frame(body, 13 + _colour_table(head[10]))
    screen = _uint(head, 6, 2) * _uint(head, 8, 2)
    valid = ok & (head[12] >= 0) & (width > 0) & (height > 0)
    return _result(valid, width, height, tf.maximum(screen, width * height), end)


def _unknown(data):
    minus_one = tf.constant(-1, tf.int64)
    return minus_one, minus_one, minus_one, _size(data)


def image_format(data):
    """The index in `FORMATS` of a scalar string's format, by its first bytes (-1: none of them)."""
    index = tf.constant(-1)
    for i, magic in reversed(list(enumerate(_MAGIC))):  # the first match wins, as in tf.io.decode_image
        index = tf.where(tf.equal(tf.strings.substr(data, 0, len(magic)), magic), i, index)
    return index


def read_header(data):
    """(format, width, height, pixels, size) of one encoded image (scalar string), read without decoding it.

    ``pixels`` is what decoding allocates per channel (-1: unreadable header or unknown format); ``size`` the
    bytes to hand to the decoder (a GIF: its first frame, see `_gif`). Only a broken JPEG header fails.
    """
    index = image_format(data)
    branches = [lambda f=f: f(data) for f in (_jpeg, _png, _gif, _bmp, _unknown)]
    width, height, pixels, size = tf.switch_case(tf.where(index < 0, len(FORMATS), index), branches)
    return index, width, height, pixels, size


def read_headers(images):
    """`read_header` of every row of a (N,) string batch: a dict of (N,) tensors ``format``, ``width``,
    ``height``, ``pixels``, ``size`` (a row whose JPEG header is broken: format -1, pixels -1)."""
    n = tf.shape(images)[0]
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images))
    ds = ds.map(lambda i, data: (i, *read_header(data)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).ignore_errors()
    minus_one = tf.constant(-1, tf.int64)
    sentinel = tf.data.Dataset.from_tensors((tf.constant(-1), tf.constant(-1), minus_one, minus_one, minus_one,
                                             minus_one))
    rows, *values = ds.concatenate(sentinel).batch(tf.cast(n, tf.int64) + 1).get_single_element()
    rows = rows[:-1, None]
    return {name: tf.tensor_scatter_nd_update(tf.fill([n], tf.constant(-1, v.dtype)), rows, v[:-1])
            for name, v in zip(("format", "width", "height", "pixels", "size"), values, strict=True)}


def _resize_fits(width, height, n_px):
    """Whether `utils.clip_preprocessing.tf_resize_crop` accepts the size (its resize within MAX_RESIZED_PIXELS),
    computed as it computes it, so that such a row is refused before decoding."""
    width, height = tf.cast(width, tf.float64), tf.cast(height, tf.float64)
    short = tf.maximum(tf.minimum(width, height), 1.0)
    resized = tf.floor(n_px * height / short) * tf.floor(n_px * width / short)
    return resized <= MAX_RESIZED_PIXELS


def admit(headers, n_px, max_pixels=DEFAULT_MAX_PIXELS, max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
    """(N,) bool: the rows to decode. A row is admitted when its header is readable, of a known format, of at
    most ``max_pixels`` pixels, resizable by the preprocessing, and fits in what is left of
    ``max_request_pixels`` after the rows admitted before it (in order; a row that does not fit is skipped,
    a later smaller one may still fit)."""
    pixels = headers["pixels"]
    ok = (headers["format"] >= 0) & (pixels > 0) & (pixels <= max_pixels) & \
        _resize_fits(headers["width"], headers["height"], n_px)

    def take(state, row):
        total, _ = state
        cost, candidate = row
        fits = candidate & (total + cost <= max_request_pixels)
        return total + tf.where(fits, cost, tf.constant(0, tf.int64)), fits

    _, admitted = tf.scan(take, (pixels, ok), initializer=(tf.constant(0, tf.int64), tf.constant(False)))
    return admitted


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
