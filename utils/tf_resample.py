"""PIL's resampling written with TensorFlow integer ops: the same pixels as ``Image.resize``, bit for bit.

`utils.clip_preprocessing.preprocess_image` resizes with PIL; the serving graph (and `tf_preprocess`) must
give the same 8-bit pixels, so this module follows Pillow's C code (``libImaging/Resample.c`` for BICUBIC,
``Geometry.c``'s ``ImagingScaleAffine`` for NEAREST, ``Convert.c`` for premultiplied alpha; Pillow 12):

- BICUBIC (`resize_bicubic_crop`): two separable passes, each rounded and clipped to 8 bits: horizontal first
  (``ImagingResampleInner``), vertical first for an image over 100 times taller than wide that shrinks
  vertically (``Image.resize``'s own rule since Pillow 11).
  Per output pixel, a window of input pixels (support 2 x the downscale factor, at least 2) whose double
  filter weights are normalised by their sum (added in window order, as C adds them), then turned into
  fixed point with ``PRECISION_BITS = 22`` (rounded away from zero); the sum ``2**21 + sum(pixel * weight)``
  in int32, shifted right by 22 (floor) and clipped to 0..255. The weights are computed in the graph, in
  float64 with C's operation order, from the (dynamic) sizes.
- NEAREST (`resize_nearest_crop`, what PIL does for palette and 1-bit images whatever is asked): source
  column ``int(x0)`` where ``x0`` starts at half the scale and is advanced by adding the scale, as C adds it
  (a sequential float64 sum: `tf.scan`).

Both compute only the centre crop the caller keeps (PIL computes each output pixel on its own, so the crop of
the resize is exactly the resize of the crop's pixels), and the image stays uint8 except for one (rows,
n, channels) int32 accumulator: no float copy of the whole image (`premultiply` too works in blocks of rows).

Example::

    crop = resize_bicubic_crop(image, (new_h, new_w), (top, left), 224)  # == PIL resize, then crop
"""

import tensorflow as tf

#: Pillow's fixed-point precision for 8-bit images (``32 - 8 - 2``)
PRECISION_BITS = 22
_SUPPORT = 2.0  # BICUBIC's support


def _bicubic_filter(x):
    """Pillow's ``bicubic_filter`` (a = -0.5), float64, in C's operation order."""
    x = tf.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


class _Windows:
    """``precompute_coeffs`` for the outputs ``start .. start + count - 1`` of an ``in_size`` -> ``out_size``
    resize: per output its first input (``xmin``), window length (``xmax``), and `weights(t)`: the int32
    fixed-point weight of its t-th input (0 past the window)."""

    def __init__(self, in_size, out_size, start, count):
        in_size = tf.cast(in_size, tf.int32)
        scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
        filterscale = tf.maximum(scale, 1.0)
        support = _SUPPORT * filterscale
        self.ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
        self.ss = 1.0 / filterscale
        self.center = (tf.cast(tf.range(start, start + count), tf.float64) + 0.5) * scale
        xmin = tf.maximum(tf.cast(self.center - support + 0.5, tf.int32), 0)  # C's (int): toward zero
        xmax = tf.minimum(tf.cast(self.center + support + 0.5, tf.int32), in_size)
        self.xmin, self.xmax = xmin, xmax - xmin
        self.total = tf.while_loop(  # the weights' sum, added in window order (C's double sum)
            lambda t, total: t < self.ksize, lambda t, total: (t + 1, total + self._raw(t)),
            (tf.constant(0), tf.zeros_like(self.center)))[1]

    def _raw(self, t):
        x = tf.cast(self.xmin + t, tf.float64)
        w = _bicubic_filter((x - self.center + 0.5) * self.ss)
        return tf.where(t < self.xmax, w, tf.zeros_like(w))

    def weights(self, t):
        k = self._raw(t)
        k = tf.where(tf.equal(self.total, 0.0), k, k / self.total)
        scaled = k * float(1 << PRECISION_BITS)
        return tf.cast(tf.where(k < 0.0, scaled - 0.5, scaled + 0.5), tf.int32)  # (int): toward zero

    def first_and_end(self):
        """The input range every output's window lies in: [xmin[0], xmin[-1] + xmax[-1])."""
        return self.xmin[0], self.xmin[-1] + self.xmax[-1]

    @classmethod
    def choose(cls, condition, a, b):
        """``a``'s windows where ``condition`` (a scalar bool tensor), else ``b``'s (both of the same length)."""
        chosen = cls.__new__(cls)
        for name in ("ksize", "ss", "center", "xmin", "xmax", "total"):
            setattr(chosen, name, tf.where(condition, getattr(a, name), getattr(b, name)))
        return chosen


def _pass(image, windows, offset):
    """One separable pass of Pillow's ``ImagingResample{Horizontal,Vertical}_8bpc`` along axis 0: uint8 (N, M, C)
    -> uint8 (outputs, M, C); ``offset``: the input index of ``image``'s first row. One int32 accumulator,
    one window tap at a time (a gather of whole rows: contiguous copies)."""
    limit = tf.shape(image)[0] - 1

    def tap(t, acc):
        index = tf.minimum(windows.xmin - offset + t, limit)  # past the window: weight 0
        pixels = tf.cast(tf.gather(image, index), tf.int32)
        return t + 1, acc + pixels * windows.weights(t)[:, None, None]

    out_shape = tf.concat([tf.shape(windows.xmin), tf.shape(image)[1:]], 0)
    acc = tf.fill(out_shape, tf.constant(1 << (PRECISION_BITS - 1), tf.int32))
    _, acc = tf.while_loop(lambda t, acc: t < windows.ksize, tap, (tf.constant(0), acc))
    return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(acc, PRECISION_BITS), 0, 255), tf.uint8)


def _swap(image):
    return tf.transpose(image, [1, 0, 2])


def resize_bicubic_crop(image, size, corner, n):
    """``Image.fromarray(image).resize((size[1], size[0]), BICUBIC)`` cropped to ``n`` x ``n`` from ``corner``
    (top, left), for a uint8 (H, W, C) image: the same pixels, computing only the crop (from the input rows
    and columns its windows read).

    Horizontal pass first, as ``ImagingResampleInner``; except, as ``Image.resize`` (Pillow >= 11) does, for an
    image more than 100 times taller than wide that shrinks vertically: vertical pass first.
    """
    in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
    rows = _Windows(in_h, size[0], corner[0], n)
    cols = _Windows(in_w, size[1], corner[1], n)
    top, bottom = rows.first_and_end()
    left, right = cols.first_and_end()
    image = image[top:bottom, left:right]
    # one pair of passes in the graph, whichever comes first: the pass runs along axis 0 (image transposed)
    tall = (in_h > in_w * 100) & (tf.cast(size[0], tf.int32) < in_h)
    first, second = _Windows.choose(tall, rows, cols), _Windows.choose(tall, cols, rows)
    offsets = tf.where(tall, tf.stack([top, left]), tf.stack([left, top]))
    x = tf.cond(tall, lambda: image, lambda: _swap(image))
    x = _swap(_pass(x, first, offsets[0]))
    x = _pass(x, second, offsets[1])
    return tf.cond(tall, lambda: _swap(x), lambda: x)


def _nearest_index(in_size, out_size, start, count):
    """``ImagingScaleAffine``'s source index of outputs ``start .. start + count - 1`` (-1: outside the image):
    ``COORD(xo)`` with ``xo = scale / 2`` advanced by ``+= scale`` (a sequential float64 sum)."""
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    steps = tf.scan(lambda xo, _: xo + scale, tf.range(start + count - 1), initializer=scale * 0.5)
    xo = tf.concat([[scale * 0.5], steps], 0)[start:]
    index = tf.where(xo < 0.0, -1, tf.cast(xo, tf.int32))
    return tf.where(index < tf.cast(in_size, tf.int32), index, -1)


def resize_nearest_crop(image, size, corner, n):
    """PIL's NEAREST ``resize`` (as for palette images) cropped to ``n`` x ``n`` from ``corner``: uint8 pixels
    of a uint8 (H, W, C) image (an output mapped outside the image is 0, as PIL fills it)."""
    in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
    rows = _nearest_index(in_h, size[0], corner[0], n)
    cols = _nearest_index(in_w, size[1], corner[1], n)
    out = tf.gather(tf.gather(image, tf.maximum(rows, 0), axis=0), tf.maximum(cols, 0), axis=1)
    inside = (rows >= 0)[:, None, None] & (cols >= 0)[None, :, None]
    return tf.where(inside, out, tf.zeros_like(out))


def _muldiv255(a, b):
    """Pillow's ``MULDIV255``: a * b / 255 rounded, in integers."""
    tmp = a * b + 128
    return tf.bitwise.right_shift(tf.bitwise.right_shift(tmp, 8) + tmp, 8)


#: rows premultiplied at a time: the int32 arithmetic holds one block of rows, never the whole image
PREMULTIPLY_ROWS = 256


def premultiply(image):
    """RGBA -> RGBa, LA -> La (Pillow's ``rgbA2rgba``) of a uint8 (H, W, C) image whose last channel is alpha.

    Computed `PREMULTIPLY_ROWS` rows at a time into a uint8 result: the whole image in int32 (and
    `_muldiv255`'s temporaries of that size) cost 36 bytes a pixel, 1.3 GB more for a 6000 x 6000 RGBA PNG
    of 150 kB than for the same RGB one in the serving graph. The same integers, block by block."""
    def block(rows):
        x = tf.cast(rows, tf.int32)
        colour = _muldiv255(x[..., :-1], x[..., -1:])
        return tf.cast(tf.concat([colour, x[..., -1:]], -1), tf.uint8)

    count = tf.maximum((tf.shape(image)[0] + PREMULTIPLY_ROWS - 1) // PREMULTIPLY_ROWS, 1)
    blocks = tf.TensorArray(tf.uint8, size=count, infer_shape=False,
                            element_shape=tf.TensorShape([None]).concatenate(image.shape[1:]))

    def body(i, blocks):
        return i + 1, blocks.write(i, block(image[i * PREMULTIPLY_ROWS : (i + 1) * PREMULTIPLY_ROWS]))

    _, blocks = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), blocks))
    return blocks.concat()


def unpremultiply(image):
    """RGBa -> RGBA, La -> LA (Pillow's ``rgba2rgbA``): colour * 255 / alpha (integer division), clipped; alpha 0 and
    255 keep the colour."""
    x = tf.cast(image, tf.int32)
    alpha = x[..., -1:]
    divided = tf.minimum((255 * x[..., :-1]) // tf.maximum(alpha, 1), 255)
    colour = tf.where((alpha == 0) | (alpha == 255), x[..., :-1], divided)
    return tf.cast(tf.concat([colour, alpha], -1), tf.uint8)
