"""The serving graph's pixels (`models.image_captioning.serving_pixels`) equal `ClipCap.caption`'s, bit for bit.

`caption` reads with `utils.image_io.read_image` (EXIF orientation, the mode kept) and preprocesses with
`preprocess_image` (PIL's resize in that mode, crop, RGB, normalisation). Each generated file (JPEG: 4:4:4,
4:2:2, 4:2:0, progressive, greyscale, the 8 EXIF orientations; PNG: RGB, L, 1-bit, 4-bit grey, palette with and
without transparency, RGBA and LA with varied alpha; GIF: palette, grey ramp, transparency; BMP: 24 and 32 bit,
8-bit palette and grey) at several sizes (landscape, portrait, exactly n_px, upscaled, 1000 x 7) must give the
same uint8 crop through the graph's decoder, and the same float32 values through `decode_images`.
"""

import io

import numpy as np
import pytest
from PIL import Image

from testing.tiny_models import DEMO_DIR

SIZES = [(301, 203), (203, 301), (224, 224), (40, 33), (1000, 7)]


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _files(width, height):
    """(name, bytes) of every kind of file, from a demo photo resized to width x height."""
    photo = Image.open(DEMO_DIR / "astronaut.jpg").convert("RGB").resize((width, height), Image.BILINEAR)
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[..., 3] = np.random.default_rng(width).integers(0, 256, (height, width))  # alpha 0 .. 255
    rgba = Image.fromarray(rgba)
    palette, grey = photo.quantize(64), photo.convert("L")
    files = [(f"jpeg 4:{s}", _encode(photo, "JPEG", subsampling=i, quality=90))
             for i, s in enumerate(("4:4", "2:2", "2:0"))]
    files += [("jpeg progressive", _encode(photo, "JPEG", progressive=True)), ("jpeg L", _encode(grey, "JPEG"))]
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files.append((f"jpeg EXIF {orientation}", _encode(photo, "JPEG", exif=exif.tobytes())))
    files += [(f"png {name}", _encode(image, "PNG", **kwargs)) for name, image, kwargs in [
        ("RGB", photo, {}), ("L", grey, {}), ("1", photo.convert("1"), {}), ("P", palette, {}),
        ("P transparent", palette, {"transparency": 3}), ("RGBA", rgba, {}), ("LA", rgba.convert("LA"), {}),
        ("L 4-bit", grey.point(lambda v: v // 17 * 17), {"bits": 4})]]
    files += [(f"gif {name}", _encode(image, "GIF", **kwargs)) for name, image, kwargs in [
        ("P", palette, {}), ("L", grey, {}), ("P transparent", palette, {"transparency": 3})]]
    files += [(f"bmp {name}", _encode(image, "BMP")) for name, image in [
        ("RGB", photo), ("32-bit", rgba), ("P", palette), ("L", grey)]]
    return files


def _pil_pixels(data, n_px=224):
    """`preprocess_image`'s uint8 pixels (before normalisation) of the image `read_image` reads from ``data``."""
    from utils.clip_preprocessing import center_crop_box, resized_size
    from utils.image_io import read_image

    image = read_image(data)
    size = resized_size(*image.size, n_px)
    resized = image.resize(size, Image.BICUBIC) if size != image.size else image
    return np.asarray(resized.crop(center_crop_box(*size, n_px)).convert("RGB"))


@pytest.fixture(scope="module")
def graph_pixels():
    """A scalar-string -> uint8 (224, 224, 3) function: the header read and the decoding of one row."""
    import tensorflow as tf

    from models.image_captioning import serving_ops
    from models.image_captioning.serving_pixels import row_pixels

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def pixels(data):
        index, _, _, _, size = serving_ops.read_header(data)
        return row_pixels(index, data, size, 224)
    return lambda data: pixels(tf.constant(data)).numpy()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_graph_pixels_are_caption_s(graph_pixels, size):
    files = _files(*size)
    for name, data in files:
        np.testing.assert_array_equal(graph_pixels(data), _pil_pixels(data), err_msg=name)


def test_decode_images_values_are_preprocess_image_s():
    """The normalised float32 batch of `decode_images` equals `preprocess_image(read_image(...))`, row by row."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images
    from utils.clip_preprocessing import preprocess_image
    from utils.image_io import read_image

    files = [data for _, data in _files(301, 203)] + [p.read_bytes() for p in sorted(DEMO_DIR.glob("*.jpg"))]
    rows, values = decode_images(tf.constant(files), 224)
    assert rows.numpy().tolist() == list(range(len(files)))
    for i, data in enumerate(files):
        np.testing.assert_array_equal(values[i].numpy(), preprocess_image(read_image(data), 224), err_msg=str(i))


def test_bmp_kinds_the_graph_cannot_reproduce_are_refused():
    """An RLE-compressed BMP (PIL decodes it, TensorFlow's decoder would misread it) fails alone: "" and NaN."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images

    photo = Image.open(DEMO_DIR / "astronaut.jpg").convert("RGB").resize((64, 48)).quantize(16)
    rle = bytearray(_encode(photo, "BMP"))
    rle[30:34] = (1).to_bytes(4, "little")  # BI_RLE8 announced: not a BMP kind the graph decodes
    rows, _ = decode_images(tf.constant([bytes(rle), _encode(photo, "PNG")]), 224)
    assert rows.numpy().tolist() == [1]
