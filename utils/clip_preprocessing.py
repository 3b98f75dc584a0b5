"""CLIP's image preprocessing, identical to OpenAI's ``clip._transform(n_px)``, channels-last.

OpenAI's pipeline (torchvision on PIL images) is, in this order:

1. ``Resize(n_px, BICUBIC)``: the shorter side becomes n_px, the longer ``int(n_px * long / short)``
   (truncated, torchvision's rule); skipped when the size already matches. PIL resamples P and 1 images
   with NEAREST whatever is asked, and LA / RGBA with premultiplied alpha.
2. ``CenterCrop(n_px)``: offsets ``int(round((size - n_px) / 2))`` (Python's round: half to even).
3. ``convert("RGB")`` *after* resizing and cropping (alpha is dropped, not composited; CMYK, L, LA, P and 1
   are converted by PIL).
4. ``ToTensor`` (/255) and ``Normalize(MEAN, STD)``, in float32.

`preprocess_image` runs exactly these PIL operations, then the same float32 arithmetic, and returns
(n_px, n_px, 3) instead of (3, n_px, n_px). Its only deliberate deviation concerns 16-bit images (see its
docstring). `tf_preprocess` / `tf_resize_crop` do the same in graph (``tf.data``, the serving SavedModel), bit
for bit: PIL's fixed-point resampling written with integer tensor ops (`utils.tf_resample`).

Memory is bounded whatever the image's shape: step 1 resizes the *whole* image before the crop, so a 40000x1
line would become 8,960,000x224 (6 GB) to keep 224x224 of it. Both functions refuse an image whose resized
size would exceed ``MAX_RESIZED_PIXELS`` (2**26 = 67,108,864 pixels, at most 256 MiB in PIL; at 224 px an
aspect ratio beyond about 1337:1, e.g. 40000x1, while 4000x3 still passes) with a clear error, instead of a
crop-first resize: PIL's ``resize(box=...)`` takes its box in float32 and is not
bit-identical to resize-then-crop (measured: up to 21 grey levels on a 7x5000 image), so it would break
the OpenAI identity. Every image within the bound is preprocessed exactly as before.

Example::

    from utils.image_io import read_image
    pixels = preprocess_image(read_image("cat.jpg"), 224)    # (224, 224, 3) float32
"""

import numpy as np
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = np.asarray(MEAN, dtype=np.float32)
_STD = np.asarray(STD, dtype=np.float32)
#: the most pixels the resize before the centre crop may produce (PIL holds at most 4 bytes a pixel: 256 MiB)
MAX_RESIZED_PIXELS = 1 << 26
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def resized_size(width, height, n_px):
    """torchvision's ``Resize(n_px)`` output size (width, height): shorter side n_px, longer truncated."""
    if width <= height:
        return n_px, int(n_px * height / width)
    return int(n_px * width / height), n_px


def check_resized_size(width, height, n_px):
    """ValueError when the resize before the centre crop would make an image of unbounded size."""
    size = resized_size(width, height, n_px)
    if size[0] * size[1] > MAX_RESIZED_PIXELS:
        raise ValueError(
            f"a {width}x{height} image would be resized to {size[0]}x{size[1]} = {size[0] * size[1]} pixels "
            f"before the {n_px}x{n_px} centre crop (more than {MAX_RESIZED_PIXELS}; aspect ratio "
            f"{max(width, height) / min(width, height):.0f}:1): refused to bound memory; crop the image first")
    return size


def center_crop_box(width, height, n_px):
    """torchvision's ``CenterCrop(n_px)`` box (left, top, right, bottom) for an image at least n_px wide."""
    top = int(round((height - n_px) / 2.0))
    left = int(round((width - n_px) / 2.0))
    return left, top, left + n_px, top + n_px


def _to_rgb(image):
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's convert("RGB") saturates 16-bit values at 255 (an almost white picture): scale instead
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def preprocess_image(image, n_px):
    """OpenAI's CLIP preprocessing of a PIL image -> (n_px, n_px, 3) float32, channels-last.

    Identical (bit for bit) to ``clip._transform(n_px)(image).permute(1, 2, 0)`` for every 8-bit mode
    (RGB, L, LA, P, RGBA, CMYK, 1) and float images (F). One deliberate deviation: 16-bit images (I;16*,
    and I, which PIL uses for 16-bit data) are resized at full precision and then mapped to 8 bits as
    ``round(value / 257)`` (65535 -> 255), whereas OpenAI's ``convert("RGB")`` saturates every value above
    255 to white, which is never what a 16-bit photograph (scan, PNG-16, medical or astronomy image)
    means.

    Args:
        image: a `PIL.Image.Image` (use `utils.image_io.read_image` for paths and arrays).
        n_px: the model's input resolution (224 for ViT-B/32, 288 for RN50x4 ...).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(image).__name__} (see read_image)")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"cannot preprocess an empty image ({width}x{height})")
    size = check_resized_size(width, height, n_px)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    image = image.crop(center_crop_box(*image.size, n_px))
    pixels = np.asarray(_to_rgb(image), dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (pixels - _MEAN) / _STD  # (n_px, n_px, 3)


#: the resamplings of `tf_resize_crop`, by index (a graph may choose one per image: an int32 tensor)
RESAMPLINGS = ("bicubic", "premultiplied", "nearest")


def tf_resize_crop(image, n_px, resample="bicubic"):
    """`preprocess_image`'s resize and centre crop in graph: uint8 (H, W, C) -> uint8 (n_px, n_px, C).

    ``resample`` (a name of `RESAMPLINGS`, or its index as an int32 tensor, chosen per image in a graph):
    "bicubic" (PIL's BICUBIC, for RGB, L and CMYK images), "premultiplied" (BICUBIC on premultiplied alpha,
    what PIL does for RGBA and LA: the last channel is alpha; returns it too) or "nearest" (what PIL does for
    palette and 1-bit images, here on their colours). Bit-identical to ``image.resize(size, BICUBIC).crop(box)``
    of the PIL image of that mode (`utils.tf_resample`); the graph holds one BICUBIC resize whatever the choice.
    An image whose resize would exceed ``MAX_RESIZED_PIXELS`` fails with InvalidArgumentError (as
    `preprocess_image`).
    """
    import tensorflow as tf

    from utils.tf_resample import premultiply, resize_bicubic_crop, resize_nearest_crop, unpremultiply

    if isinstance(resample, str):
        if resample not in RESAMPLINGS:
            raise ValueError(f"resample must be one of {RESAMPLINGS}, got {resample!r}")
        resample = RESAMPLINGS.index(resample)
    resample = tf.convert_to_tensor(resample, tf.int32)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    short = tf.minimum(height, width)
    new_h = tf.cast(tf.floor(n_px * height / short), tf.int32)  # n_px for the shorter side (exact)
    new_w = tf.cast(tf.floor(n_px * width / short), tf.int32)
    tf.debugging.assert_less_equal(
        tf.cast(new_h, tf.int64) * tf.cast(new_w, tf.int64), tf.constant(MAX_RESIZED_PIXELS, tf.int64),
        message=f"the image would be resized to more than {MAX_RESIZED_PIXELS} pixels before the {n_px}x{n_px} "
                "centre crop: refused to bound memory; crop the image first")
    top = tf.cast(tf.round(tf.cast(new_h - n_px, tf.float64) / 2.0), tf.int32)  # half to even, like round()
    left = tf.cast(tf.round(tf.cast(new_w - n_px, tf.float64) / 2.0), tf.int32)
    size, corner = (new_h, new_w), (top, left)
    same = tf.equal(new_h, shape[0]) & tf.equal(new_w, shape[1])  # PIL leaves such an image as it is
    premultiplied = tf.equal(resample, 1)

    def bicubic():
        x = tf.cond(premultiplied, lambda: premultiply(image), lambda: image)
        x = resize_bicubic_crop(x, size, corner, n_px)
        return tf.cond(premultiplied, lambda: unpremultiply(x), lambda: x)

    return tf.cond(same, lambda: image[top : top + n_px, left : left + n_px],
                   lambda: tf.cond(tf.equal(resample, 2), lambda: resize_nearest_crop(image, size, corner, n_px),
                                   bicubic))


def _normalized_values():
    """(256, 3) float32: `preprocess_image`'s value of each 8-bit level in each channel (its own numpy ops)."""
    levels = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32) / np.float32(255)
    return (levels - _MEAN) / _STD


def tf_normalize(pixels):
    """uint8 (..., 3) RGB pixels -> `preprocess_image`'s float32 values: looked up in the table of its own
    numpy arithmetic (a graph's ``x / 255`` may be rewritten, e.g. as a multiplication, and differ in the last
    bit)."""
    import tensorflow as tf

    table = tf.constant(_normalized_values().reshape(-1))  # level * 3 + channel
    return tf.gather(table, tf.cast(pixels, tf.int32) * 3 + tf.range(3))


def tf_preprocess(image, n_px):
    """In-graph (``tf.data``-friendly) CLIP preprocessing of one uint8 (H, W, C) image, C in {1, 2, 3, 4}.

    Bit-identical to `preprocess_image` of the PIL image of mode L, LA, RGB or RGBA holding these pixels
    (same size rule, PIL's fixed-point BICUBIC resize with premultiplied alpha when there is an alpha
    channel, same crop, alpha dropped, same float32 normalisation): `tf_resize_crop`. Palette images must be
    resized with ``tf_resize_crop(..., resample="nearest")`` as PIL does.

    An image whose resize would exceed ``MAX_RESIZED_PIXELS`` fails with InvalidArgumentError (bounded
    memory, as in `preprocess_image`).

    Example::

        ds = ds.map(lambda img: tf_preprocess(img, 224))   # uint8 (H, W, 3) -> float32 (224, 224, 3)
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"tf_preprocess expects a uint8 image, got {image.dtype}")
    channels = image.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"tf_preprocess expects 1, 2, 3 or 4 channels (statically known: decode with channels=3), "
            f"got shape {image.shape}"
        )
    pixels = tf_resize_crop(image, n_px, "premultiplied" if channels in (2, 4) else "bicubic")
    pixels = pixels[..., : 1 if channels <= 2 else 3]  # alpha dropped after the resize, as convert("RGB")
    if channels <= 2:
        pixels = tf.image.grayscale_to_rgb(pixels)
    return tf_normalize(tf.ensure_shape(pixels, (n_px, n_px, 3)))
