"""CLIP preprocessing vs OpenAI's ``clip._transform`` (torchvision on PIL) on real photos and every mode."""

import numpy as np
import pytest
import skimage.data
from clip.clip import _transform
from PIL import Image
from torchvision.transforms.functional import _compute_resized_output_size

from utils.clip_preprocessing import (
    STD,
    center_crop_box,
    preprocess_image,
    resized_size,
    tf_normalize,
    tf_preprocess,
    tf_resize_crop,
)

ONE_LEVEL = 1 / 255 / min(STD)  # one grey level after normalisation
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera"]


@pytest.fixture(scope="module")
def photos():
    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def reference(image, n_px):
    return _transform(n_px)(image).permute(1, 2, 0).numpy()  # CHW -> HWC


@pytest.mark.parametrize("n_px", [224, 288])
def test_photos_match_openai(photos, n_px):
    for name, array in photos.items():
        image = Image.fromarray(array)
        ours = preprocess_image(image, n_px)
        assert ours.shape == (n_px, n_px, 3) and ours.dtype == np.float32
        assert np.abs(ours - reference(image, n_px)).max() <= 1e-6, name


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "F", "RGB"])
def test_every_8_bit_mode_matches_openai(photos, mode):
    rgba = Image.fromarray(photos["chelsea"]).convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[..., 3] = np.linspace(0, 255, alpha.shape[1], dtype=np.uint8)[None]  # semi-transparent gradient
    image = Image.fromarray(alpha).convert(mode)
    assert image.mode == mode
    np.testing.assert_allclose(preprocess_image(image, 224), reference(image, 224), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(225, 300), (301, 224), (224, 224), (50, 37), (1000, 3), (223, 225)])
def test_sizes_and_crop_offsets_match_openai(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    np.testing.assert_allclose(preprocess_image(image, 224), reference(image, 224), rtol=0, atol=1e-6)


def test_resize_rule_is_torchvision_s():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 5000, size=(2000, 2)):
        for n_px in (224, 288, 336):
            expected_h, expected_w = _compute_resized_output_size((int(height), int(width)), [n_px])
            assert resized_size(int(width), int(height), n_px) == (expected_w, expected_h)
    # Python's round: half to even (1.5 -> 2, 2.5 -> 2)
    assert center_crop_box(227, 229, 224) == (2, 2, 226, 226)
    assert center_crop_box(229, 227, 224) == (2, 2, 226, 226)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_not_saturated(photos, mode):
    gray8 = photos["camera"]
    image16 = Image.fromarray(gray8.astype(np.uint16) * 257)  # I;16, same picture on 16 bits
    if mode == "I":
        image16 = image16.convert("I")
    assert image16.mode == mode
    ours = preprocess_image(image16, 224)
    as_8_bit = reference(Image.fromarray(gray8), 224)
    # resized at 16-bit precision then mapped to 8 bits: I;16 (clipped between PIL's two resampling passes,
    # as 8-bit images are) stays within one grey level of the 8-bit pipeline; I (32-bit, not clipped between
    # passes) differs by a few levels where the bicubic kernel overshoots, and only there
    diff = np.abs(ours - as_8_bit)
    if mode == "I;16":
        assert diff.max() <= ONE_LEVEL + 1e-6
    else:
        assert diff.max() <= 5 * ONE_LEVEL and (diff > ONE_LEVEL + 1e-6).mean() < 0.01
    # OpenAI's convert("RGB") saturates: almost everything white (documented deviation)
    assert (reference(image16, 224) >= (1 - np.asarray([0.48145466, 0.4578275, 0.40821073])) / STD - 1e-5).mean() > 0.9


def test_non_pil_input_is_refused():
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image(np.zeros((10, 10, 3), np.uint8), 224)


def _pil_pixels(image, n_px):
    """`preprocess_image`'s 8-bit pixels before normalisation (its own resize and crop)."""
    size = resized_size(*image.size, n_px)
    resized = image.resize(size, Image.BICUBIC) if size != image.size else image
    return np.asarray(resized.crop(center_crop_box(*size, n_px)).convert("RGB"))


@pytest.fixture(scope="module")
def tf_pixels():
    """A function array -> (tf_resize_crop's uint8 crop as RGB, tf_preprocess' float32 values); traced once per
    channel count and resampling (any size)."""
    import tensorflow as tf

    functions = {}

    def build(channels, resample):
        def both(x):
            pixels = tf_resize_crop(x, 224, resample)[..., : 1 if channels <= 2 else 3]
            pixels = tf.image.grayscale_to_rgb(pixels) if channels <= 2 else pixels
            values = tf_normalize(pixels) if resample == "nearest" else tf_preprocess(x, 224)
            return pixels, values

        return tf.function(both, input_signature=[tf.TensorSpec((None, None, channels), tf.uint8)])

    def run(array, resample=None):
        resample = resample or ("premultiplied" if array.shape[-1] in (2, 4) else "bicubic")
        key = (array.shape[-1], resample)
        functions[key] = functions.get(key) or build(*key)
        return [t.numpy() for t in functions[key](array)]
    return run


# sizes: 1 x N, N x 1, exactly n_px, one off, odd, upscaled, huge downscales and aspect ratios, and a shrinking
# image over 100 times taller than wide (PIL resizes it vertically first)
TF_SIZES = [(1, 1), (1, 300), (300, 1), (224, 224), (225, 224), (224, 223), (17, 33), (50, 37), (7, 1500),
            (1500, 7), (640, 480), (999, 1001), (3000, 2000), (223, 5000), (230, 23100)]


def test_tf_preprocess_is_bit_identical_on_photos(photos, tf_pixels):
    """The in-graph resize is PIL's fixed-point one: same uint8 pixels, same float32 values."""
    for name, array in photos.items():
        image = Image.fromarray(array)
        pixels, values = tf_pixels(array if array.ndim == 3 else array[..., None])
        np.testing.assert_array_equal(pixels, _pil_pixels(image, 224), err_msg=name)
        np.testing.assert_array_equal(values, preprocess_image(image, 224), err_msg=name)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P"])
def test_tf_resize_crop_is_bit_identical_at_every_size(photos, tf_pixels, mode):
    """Every size of TF_SIZES (textured crops of a photo, semi-transparent alpha), in the mode's own resampling:
    BICUBIC, BICUBIC on premultiplied alpha (RGBA, LA), NEAREST (palette)."""
    rng = np.random.default_rng(len(mode))
    source = Image.fromarray(photos["chelsea"]).convert("RGBA")
    for width, height in TF_SIZES:
        image = source.resize((width, height), Image.BILINEAR)
        rgba = np.asarray(image).copy()
        rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2])  # alpha 0, 255 and everything between
        image = Image.fromarray(rgba).convert(mode)
        array = np.asarray(image.convert("RGB") if mode == "P" else image)
        array = array[..., None] if array.ndim == 2 else array
        pixels, values = tf_pixels(array, "nearest" if mode == "P" else None)
        np.testing.assert_array_equal(pixels, _pil_pixels(image, 224), err_msg=f"{mode} {width}x{height}")
        np.testing.assert_array_equal(values, preprocess_image(image, 224), err_msg=f"{mode} {width}x{height}")


def test_tf_preprocess_refuses_other_inputs():
    with pytest.raises(TypeError, match="uint8"):
        tf_preprocess(np.zeros((10, 10, 3), np.float32), 224)
    with pytest.raises(ValueError, match="resample must be"):
        tf_resize_crop(np.zeros((10, 10, 3), np.uint8), 224, "lanczos")


def test_tf_preprocess_in_tf_data(photos):
    import tensorflow as tf

    for array in (photos["coffee"], photos["camera"][..., None]):
        dataset = tf.data.Dataset.from_tensors(array).map(lambda x: tf_preprocess(x, 224))
        image = Image.fromarray(array if array.shape[-1] == 3 else array[..., 0])
        np.testing.assert_array_equal(next(iter(dataset)).numpy(), preprocess_image(image, 224))
