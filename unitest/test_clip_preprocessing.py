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
    tf_preprocess,
)

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera"]
ONE_LEVEL = 1 / 255 / min(STD)  # one grey level after normalisation


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


@pytest.mark.parametrize("n_px", [224, 288])
def test_tf_preprocess_stays_within_its_documented_deviation(photos, n_px):
    for name, array in photos.items():
        expected = reference(Image.fromarray(array), n_px)
        ours = tf_preprocess(array if array.ndim == 3 else array[..., None], n_px).numpy()
        diff = np.abs(ours - expected)
        assert ours.shape == (n_px, n_px, 3)
        assert diff.max() <= 0.0151, name  # one grey level, as the docstring states
        assert (diff > 1e-5).mean() <= 0.0012, name  # at most 0.12% of the values differ


def test_tf_preprocess_in_tf_data_with_gray_and_alpha(photos):
    import tensorflow as tf

    rgba = np.asarray(Image.fromarray(photos["coffee"]).convert("RGBA"))
    gray = photos["camera"][..., None]
    for array, reference_image in ((rgba, Image.fromarray(rgba[..., :3])), (gray, Image.fromarray(gray[..., 0]))):
        dataset = tf.data.Dataset.from_tensors(array).map(lambda x: tf_preprocess(x, 224))
        ours = next(iter(dataset)).numpy()
        assert np.abs(ours - reference(reference_image, 224)).max() <= 0.0151
    with pytest.raises(TypeError, match="uint8"):
        tf_preprocess(np.zeros((10, 10, 3), np.float32), 224)
