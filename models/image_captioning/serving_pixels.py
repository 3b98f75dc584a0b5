"""The serving graph's pixels: an admitted row's bytes -> the uint8 (n_px, n_px, 3) crop `ClipCap.caption` sees.

`ClipCap.caption` reads an image with PIL (`utils.image_io.read_image`: EXIF orientation applied, the mode
kept) and preprocesses it with `utils.clip_preprocessing.preprocess_image` (PIL's resize in the image's own
mode, crop, then RGB). This module does the same in graph, bit for bit, for each format the graph decodes:

- JPEG: ``tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE")`` (libjpeg's islow IDCT, PIL's; the default DCT
  differs by up to 7 grey levels), the EXIF orientation of its first ``Exif`` APP1 segment applied as
  ``ImageOps.exif_transpose`` does, BICUBIC.
- PNG: by the IHDR colour type, PIL's mode and its resampling: palette (P) and 1-bit greyscale ("1"):
  NEAREST; grey + alpha (LA) and RGBA: BICUBIC on premultiplied alpha, alpha then dropped; grey (L) and RGB:
  BICUBIC.
- GIF, first frame: its graphic control extension's transparency flag cleared before decoding (PIL shows a
  transparent pixel's palette colour, TensorFlow would make it black); a frame whose colour table is the grey
  ramp 0..n is PIL's mode L (BICUBIC), any other P (NEAREST).
- BMP: uncompressed 24 and 32 bit (RGB, BICUBIC), and 8 bit with a colour table: its indices looked up (L:
  BICUBIC when the table is the grey ramp, as PIL's reader decides, P: NEAREST otherwise). Other BMPs (RLE,
  bit fields, 1, 4 and 16 bit) are refused (the row fails, "" and NaN), TensorFlow's decoder would misread
  some of them.

Not reproduced (documented in docs/serving.md): 16-bit PNGs (`preprocess_image` resizes them at 16 bits),
CMYK JPEGs (PIL resizes in CMYK), EXIF orientation outside a JPEG's APP1 (PNG ``eXIf``, XMP), a GIF whose first
frame does not cover its logical screen.
"""

import tensorflow as tf

from models.image_captioning import serving_ops as ops
from models.image_captioning.serving_ops import _colour_table, _gif_first_frame
from utils.clip_preprocessing import RESAMPLINGS, tf_normalize, tf_resize_crop

#: a JPEG's markers are walked up to its first scan (SOS) looking for the EXIF segment, at most this many
MAX_JPEG_MARKERS = 1024
#: the IFD0 entries read for the orientation tag (TIFF allows 65535)
MAX_EXIF_ENTRIES = 1024
_ORIENTATION_TAG = 0x0112


def _bytes_at(data, pos, n):
    """``n`` bytes of a scalar string from ``pos`` (int64) as int64 (n,), -1 past its end (or before 0)."""
    pos = tf.cast(pos, tf.int64)
    part = tf.strings.substr(data, tf.maximum(pos, 0), n)
    raw = tf.cast(tf.io.decode_raw(part, tf.uint8), tf.int64)
    raw = tf.reshape(tf.pad(raw, [[0, n - tf.size(raw)]], constant_values=-1), (n,))
    return tf.where(pos >= 0, raw, tf.constant(-1, tf.int64))


def _number(raw, little):
    """The unsigned integer of the bytes ``raw`` (k,) in the given byte order."""
    k = raw.shape[0]
    weights = tf.where(little, tf.constant([256**i for i in range(k)], tf.int64),
                       tf.constant([256 ** (k - 1 - i) for i in range(k)], tf.int64))
    return tf.reduce_sum(raw * weights)


# --------------------------------------------------------------------------------------------------- JPEG


def _exif_offset(data):
    """The offset of the TIFF header in a JPEG's first ``Exif`` APP1 segment before its first scan (-1: none),
    walking the markers as PIL's JPEG reader does."""
    exif_id = tf.constant(list(b"Exif\0\0"), tf.int64)

    def step(pos, found, done):
        head = _bytes_at(data, pos, 10)  # 0xFF, marker, length (2), identifier (6)
        marker = head[1]
        fill = tf.equal(marker, 0xFF)
        standalone = tf.equal(marker, 0x01) | ((marker >= 0xD0) & (marker <= 0xD7))
        length = head[2] * 256 + head[3]
        exif = tf.equal(marker, 0xE1) & tf.reduce_all(tf.equal(head[4:], exif_id))
        stop = ~tf.equal(head[0], 0xFF) | tf.equal(marker, 0xDA) | tf.equal(marker, 0xD9) | exif | \
            (~fill & ~standalone & (length < 2))
        found = tf.where(exif, pos + 10, found)
        pos = tf.where(fill, pos + 1, tf.where(standalone, pos + 2, pos + 2 + length))
        return pos, found, stop

    _, found, _ = tf.while_loop(lambda pos, found, done: ~done, step,
                                (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(False)),
                                maximum_iterations=MAX_JPEG_MARKERS)
    return found


def exif_orientation(data):
    """The EXIF orientation (1..8; 1 when absent or unreadable) of a JPEG: the last Orientation (0x0112, SHORT)
    entry of IFD0 in its first Exif segment, as PIL's ``getexif()`` reads it."""
    start = _exif_offset(data)
    header = _bytes_at(data, start, 8)
    little = tf.equal(header[0], 0x49) & tf.equal(header[1], 0x49)  # "II"; "MM": big-endian
    valid = (start >= 0) & (little | (tf.equal(header[0], 0x4D) & tf.equal(header[1], 0x4D)))
    ifd = start + _number(header[4:8], little)
    count = tf.minimum(_number(_bytes_at(data, ifd, 2), little), MAX_EXIF_ENTRIES)
    raw = tf.strings.substr(data, tf.maximum(ifd + 2, 0), 12 * count)
    entries = tf.cast(tf.io.decode_raw(raw, tf.uint8), tf.int64)
    entries = tf.reshape(entries[: tf.size(entries) // 12 * 12], (-1, 12))

    def field(a, b):
        k = b - a
        weights = tf.where(little, tf.constant([256**i for i in range(k)], tf.int64),
                           tf.constant([256 ** (k - 1 - i) for i in range(k)], tf.int64))
        return tf.reduce_sum(entries[:, a:b] * weights, axis=1)

    match = tf.equal(field(0, 2), _ORIENTATION_TAG) & tf.equal(field(2, 4), 3)  # type SHORT
    values = tf.boolean_mask(field(8, 10), match)
    value = tf.cond(tf.size(values) > 0, lambda: values[-1], lambda: tf.constant(1, tf.int64))
    return tf.where(valid & (value >= 1) & (value <= 8), value, tf.constant(1, tf.int64))


def orient(image, orientation):
    """``ImageOps.exif_transpose`` of a (H, W, C) image for an EXIF orientation 1..8."""
    def swap(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,                              # 1: as stored
        lambda: image[:, ::-1],                     # 2: FLIP_LEFT_RIGHT
        lambda: image[::-1, ::-1],                  # 3: ROTATE_180
        lambda: image[::-1],                        # 4: FLIP_TOP_BOTTOM
        lambda: swap(image),                        # 5: TRANSPOSE
        lambda: swap(image)[:, ::-1],               # 6: ROTATE_270 (90 degrees clockwise)
        lambda: swap(image)[::-1, ::-1],            # 7: TRANSVERSE
        lambda: swap(image)[::-1],                  # 8: ROTATE_90 (counter-clockwise)
    ]
    return tf.switch_case(tf.cast(orientation, tf.int32) - 1, branches)


# Each format's reader returns (uint8 (H, W, C) image, C = 3 or 4 with alpha last, its `RESAMPLINGS` index):
# `row_pixels` then resizes once (one resize in the graph: each copy costs seconds of graph optimisation).
_BICUBIC, _PREMULTIPLIED, _NEAREST = (RESAMPLINGS.index(name) for name in ("bicubic", "premultiplied", "nearest"))


def _jpeg(data):
    image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    return orient(image, exif_orientation(data)), _BICUBIC


# ---------------------------------------------------------------------------------------------------- PNG


def _rgb(pixels):
    """The crop's colours (3 channels, or 4 with alpha last) as RGB: alpha dropped (PIL's ``convert("RGB")``)."""
    return pixels[..., :3]


def _png(data):
    head = _bytes_at(data, 24, 2)  # IHDR bit depth, colour type
    depth, colour = head[0], head[1]
    nearest = tf.equal(colour, 3) | (tf.equal(colour, 0) & tf.equal(depth, 1))  # P, "1"
    alpha = tf.equal(colour, 4) | tf.equal(colour, 6)  # LA (as RGBA: grey repeated), RGBA
    image = tf.cond(alpha, lambda: tf.io.decode_png(data, channels=4), lambda: tf.io.decode_png(data, channels=3))
    return image, tf.where(nearest, _NEAREST, tf.where(alpha, _PREMULTIPLIED, _BICUBIC))


# ---------------------------------------------------------------------------------------------------- GIF


def _is_grey_ramp(table, entries):
    """Whether a colour table (int64 (k, 3), -1 past the data) of ``entries`` colours is 0, 1, 2 ... on every
    channel (PIL then reads the image as mode L, as ``GifImagePlugin._is_palette_needed`` decides)."""
    ramp = tf.range(tf.shape(table)[0], dtype=tf.int64)[:, None]
    used = tf.range(tf.shape(table)[0], dtype=tf.int64)[:, None] < entries
    return tf.reduce_all(tf.equal(table, ramp) | ~used)


def _with_byte(data, pos, value):
    """A scalar string with its byte at ``pos`` replaced by ``value`` (0..255)."""
    byte = tf.gather(tf.constant([bytes([i]) for i in range(256)]), tf.cast(value, tf.int32))
    pos = tf.cast(pos, tf.int64)
    return tf.strings.join([tf.strings.substr(data, tf.constant(0, tf.int64), pos), byte,
                            tf.strings.substr(data, pos + 1, tf.constant(-1, tf.int64))])


def _gif(data, size):
    body = tf.io.decode_raw(data, tf.uint8)
    global_table = _colour_table(_bytes_at(data, 10, 1)[0])
    _, _, _, _, descriptor, control = _gif_first_frame(body, 13 + global_table, stop_at_descriptor=True)
    local_table = _colour_table(_bytes_at(data, descriptor + 9, 1)[0])
    table_at = tf.where(local_table > 0, descriptor + 10, tf.constant(13, tf.int64))
    table_size = tf.where(local_table > 0, local_table, global_table)
    table = tf.reshape(_bytes_at(data, table_at, 3 * 256), (256, 3))
    grey = tf.equal(table_size, 0) | _is_grey_ramp(table, table_size // 3)
    # the first frame's transparency flag cleared: its transparent pixels get their palette colour, as in PIL
    first_frame = tf.strings.substr(data, tf.constant(0, tf.int64), size)
    flags = _bytes_at(data, control, 1)[0]
    first_frame = tf.cond(control >= 0, lambda: _with_byte(first_frame, control, tf.bitwise.bitwise_and(flags, 0xFE)),
                          lambda: first_frame)
    image = tf.io.decode_gif(tf.strings.join([first_frame, b";"]))[0]
    return image, tf.where(grey, _BICUBIC, _NEAREST)


# ---------------------------------------------------------------------------------------------------- BMP


def _bmp(data):
    head = _bytes_at(data, 14, 36)  # from the info header: its size, ..., bit count (14), compression (16)
    header_size, bits = _number(head[0:4], True), _number(head[14:16], True)
    compression, used = _number(head[16:20], True), _number(head[32:36], True)
    tf.debugging.assert_equal((header_size >= 40) & tf.equal(compression, 0) &
                              (tf.equal(bits, 8) | tf.equal(bits, 24) | tf.equal(bits, 32)), True,
                              message="BMP: only uncompressed 8, 24 and 32-bit images are decoded")
    image = tf.io.decode_bmp(data, channels=3)

    def palette():  # 8 bit: BGRX colour table after the info header, `used` entries (0: 256)
        colours = tf.where(tf.equal(used, 0), tf.constant(256, tf.int64), used)
        tf.debugging.assert_less_equal(colours, tf.constant(256, tf.int64), message="BMP: colour table too long")
        table = tf.reshape(_bytes_at(data, 14 + header_size, 4 * 256), (256, 4))[:, 2::-1]  # RGB
        indices = image[..., 0]
        colours_of = tf.gather(tf.cast(tf.maximum(table, 0), tf.uint8), tf.cast(indices, tf.int32))
        grey = ~tf.equal(colours, 2) & _is_grey_ramp(table, colours)  # PIL's "L" (2 colours: "1", NEAREST)
        return tf.cond(grey, lambda: (image, _BICUBIC), lambda: (colours_of, _NEAREST))

    return tf.cond(tf.equal(bits, 8), palette, lambda: (image, _BICUBIC))


def row_pixels(index, data, size, n_px):
    """The uint8 (n_px, n_px, 3) crop of an admitted row: ``index`` its format (`serving_ops.FORMATS`), ``size``
    the bytes to decode (`serving_ops.read_header`)."""
    branches = [lambda: _jpeg(data), lambda: _png(data), lambda: _gif(data, size), lambda: _bmp(data)]
    image, resample = tf.switch_case(index, branches)
    image = tf.ensure_shape(image, (None, None, None))
    return tf.ensure_shape(_rgb(tf_resize_crop(image, n_px, resample)), (n_px, n_px, 3))


def decode_images(images, n_px, max_pixels=ops.DEFAULT_MAX_PIXELS, max_request_pixels=ops.DEFAULT_MAX_REQUEST_PIXELS):
    """Encoded images (N,) string -> (rows (M,) int32 of the images that decoded, pixels (M, n_px, n_px, 3)).

    Rows keep their order; a row that is refused by `admit` (never decoded) or fails to decode (corrupt data
    after a valid header, a BMP kind this module does not decode) is left out, so one bad image never fails
    the others. Only admitted rows reach a decoder (a decompression bomb is refused before any pixel buffer
    is allocated); each is decoded in a ``tf.data`` pipeline with ``ignore_errors()``. Pixels: `row_pixels`
    (uint8 until the crop), then `preprocess_image`'s normalisation (`tf_normalize`).
    """
    headers = ops.read_headers(images)
    admitted = ops.admit(headers, n_px, max_pixels, max_request_pixels) & (headers["format"] >= 0)
    n = tf.shape(images)[0]
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images, headers["format"], headers["size"], admitted))
    ds = ds.filter(lambda i, data, index, size, admitted: admitted)
    ds = ds.map(lambda i, data, index, size, admitted: (i, tf_normalize(row_pixels(index, data, size, n_px))),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    # one sentinel row, so the single batch below exists even when every image failed (or N == 0)
    sentinel = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int32), tf.zeros((n_px, n_px, 3), tf.float32)))
    rows, pixels = ds.concatenate(sentinel).batch(tf.cast(n, tf.int64) + 1).get_single_element()
    return rows[:-1], pixels[:-1]
