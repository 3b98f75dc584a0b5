"""`utils.image_io`: reading from every source, EXIF orientation, and a clear error for every bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from utils.image_io import IMAGE_EXTENSIONS, ImageReadError, glob_no_links, list_images, read_image


@pytest.fixture()
def jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_reads_paths_pil_and_arrays(jpeg):
    image = read_image(jpeg)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert read_image(str(jpeg)).size == (64, 48)
    pil = Image.new("P", (5, 7))
    assert read_image(pil).mode == "P"  # mode kept for OpenAI's resize-then-convert order
    assert read_image(np.zeros((7, 5, 3), np.uint8)).size == (5, 7)
    assert read_image(np.zeros((7, 5), np.uint8)).mode == "L"
    assert read_image(np.zeros((7, 5, 4), np.uint8)).mode == "RGBA"
    assert read_image(np.zeros((7, 5), np.uint16)).mode == "I;16"
    assert np.asarray(read_image(np.full((2, 2, 3), 1.0))).max() == 255
    assert read_image(jpeg.read_bytes()).size == (64, 48)


def test_exif_orientation_is_applied_by_default(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif.tobytes())
    assert read_image(path).size == (20, 40)
    assert read_image(path, exif_transpose=False).size == (40, 20)  # what OpenAI's pipeline sees


def test_missing_path(tmp_path):
    with pytest.raises(ImageReadError, match="no such image file"):
        read_image(tmp_path / "absent.jpg")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(path)


def test_truncated_jpeg(jpeg, tmp_path):
    data = jpeg.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageReadError, match="not an image file"):
        read_image(path)


def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path, max_pixels=10_000)
    # PIL's own limit: its warning (above the limit) and its error (above twice the limit)
    for limit in (50_000, 20_000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageReadError, match="decompression bomb"):
            read_image(path)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(Image.new("L", (300, 200)))
    # an explicit max_pixels above PIL's limit (below twice it, where PIL itself refuses) is honoured
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    assert read_image(path, max_pixels=60_000).size == (300, 200)


def test_unsupported_sources():
    with pytest.raises(ImageReadError, match="cannot read an image from a int"):
        read_image(3)
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageReadError, match=r"\[0, 1\]"):
        read_image(np.full((4, 4, 3), 2.0))
    with pytest.raises(ImageReadError, match="dtype"):
        read_image(np.zeros((4, 4, 3), np.int64))


def _touch_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)


def test_list_images_expands_files_directories_and_globs(tmp_path):
    for rel in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "other/e.bmp"):
        _touch_image(str(tmp_path / rel))
    (tmp_path / "notes.txt").write_text("x")
    root = str(tmp_path)
    listed = list_images([os.path.join(root, "other", "e.bmp"), root, os.path.join(root, "sub", "*.jpeg")])
    expected_dir = sorted(
        os.path.join(root, rel) for rel in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "other/e.bmp")
    )
    # explicit file first, then the directory (sorted), duplicates dropped
    assert listed == [os.path.join(root, "other", "e.bmp")] + [p for p in expected_dir if not p.endswith("e.bmp")]
    assert list_images(os.path.join(root, "**", "*.webp")) == [os.path.join(root, "sub", "deeper", "d.webp")]
    assert list_images(tmp_path / "b.jpg") == [os.path.join(root, "b.jpg")]
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_recursive_glob_does_not_follow_links_to_folders(tmp_path, monkeypatch):
    """Python's ``**`` follows links to folders: one link to the folder itself listed x.jpg 41 times, two never
    ended. Now as a folder input (`os.walk`): each file once, links not entered; the rest as glob gives it."""
    for rel in ("d/x.jpg", "d/sub/y.jpg", "d/sub/.hidden/z.jpg", "d/.w.jpg"):
        _touch_image(str(tmp_path / rel))
    os.symlink(".", tmp_path / "d" / "loop_a")
    os.symlink(".", tmp_path / "d" / "loop_b")
    os.symlink("sub", tmp_path / "d" / "to_sub")
    expected = [str(tmp_path / "d" / "sub" / "y.jpg"), str(tmp_path / "d" / "x.jpg")]
    assert list_images(str(tmp_path / "d" / "**" / "*.jpg")) == expected
    assert not [p for p in list_images(str(tmp_path / "d")) if "loop" in p or "to_sub" in p]  # as a folder input
    monkeypatch.chdir(tmp_path)
    assert list_images(os.path.join("**", "*.jpg")) == [os.path.join("d", "sub", "y.jpg"), os.path.join("d", "x.jpg")]
    assert list_images(os.path.join("d", "s*", "**", "*.jpg")) == [os.path.join("d", "sub", "y.jpg")]
    # no ** (no loop possible): glob's own, links one level down included
    assert list_images(os.path.join("d", "*", "*.jpg")) == [os.path.join("d", *p) for p in (
        ("loop_a", "x.jpg"), ("loop_b", "x.jpg"), ("sub", "y.jpg"), ("to_sub", "y.jpg"))]
    assert sorted(glob_no_links(os.path.join("d", "**"))) == sorted(
        os.path.join("d", n) for n in ("loop_a", "loop_b", "sub", "sub/y.jpg", "to_sub", "x.jpg"))


def test_list_images_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("x")
    with pytest.raises(ImageReadError, match="no such file or directory"):
        list_images([tmp_path / "absent"])
    with pytest.raises(ImageReadError, match="no images"):
        list_images([tmp_path / "empty_dir"])
    with pytest.raises(ImageReadError, match="matches the pattern"):
        list_images([str(tmp_path / "*.gif")])
    with pytest.raises(ImageReadError, match="no image paths"):
        list_images([])
