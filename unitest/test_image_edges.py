"""Hostile or careless images, every way they reach the model: each bad one fails alone, with a clear error.

- crafted files on which a PIL decoder raises something else than its usual errors (a DDS with unknown pixel
  format flags: NotImplementedError; a TIFF whose StripOffsets are RATIONALs: TypeError; a WebP whose EXIF
  block is broken, read from bytes or as a PIL image: SyntaxError) are `ImageReadError`s, so the web
  demo's other images of the request are still captioned and `predict`'s message names the file;
- a progressive JPEG of many scans (each scan costs a pass over the whole image: 178 kB of 2,006 scans of a
  4096 x 4096 image took 20 s in PIL and 27 s in TensorFlow) is refused before decoding, by `read_image` and
  by the serving graph, where its neighbours in the request are still decoded.
"""

import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from utils.image_io import MAX_JPEG_SCANS, ImageReadError, read_image


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(size=(23, 17)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _broken_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(exif.tobytes())
    start = data.index(b"II*") if b"II*" in data else data.index(b"MM\0*")
    data[start + 1] = ord("W")  # "IW*": neither byte order
    return bytes(data)


def _dds_unknown_flags():
    data = bytearray(_encode(_photo(), "DDS"))
    data[80:84] = b"\0\0\0\0"  # the pixel format's flags
    return bytes(data)


def _tiff_rational_strip_offsets():
    data = bytearray(_encode(_photo(), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets: LONG -> RATIONAL
            data[entry + 2 : entry + 4] = struct.pack("<H", 5)
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


CRAFTED = {
    "dds unknown pixel format": (_dds_unknown_flags, "x.dds"),
    "tiff rational strip offsets": (_tiff_rational_strip_offsets, "x.tif"),
    "webp broken exif": (lambda: _encode(_photo(), "WEBP", exif=_broken_exif()), "x.webp"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_files_are_image_read_errors(kind, tmp_path):
    make, name = CRAFTED[kind]
    data = make()
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match="image bytes"):
        read_image(data)
    with pytest.raises(ImageReadError, match=str(path)):
        read_image(path)
    try:  # a PIL image the caller opened: its broken EXIF (or data) too
        opened = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 (PIL refuses it itself: nothing to hand to read_image)
        return
    with pytest.raises(ImageReadError):
        read_image(opened)


def _many_scans(size, scans):
    """A progressive greyscale JPEG of ``size`` x ``size`` whose last scan (with its Huffman table) is repeated
    until the file holds ``scans`` scans: decoders read it (warning about the progression), at the cost of one
    pass over the image per scan."""
    data = _encode(Image.new("L", (size, size), 128), "JPEG", progressive=True, quality=90)
    pos, segments = 2, []
    while data[pos + 1] != 0xD9:
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        end = pos + 2 + length
        if marker == 0xDA:  # the entropy-coded data, up to the next marker
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, pos, end))
        pos = end
    (_, _, end), (_, table, _) = segments[-1], segments[-2]
    assert segments[-1][0] == 0xDA and segments[-2][0] == 0xC4
    have = sum(marker == 0xDA for marker, _, _ in segments)
    return data[:pos] + data[table:end] * (scans - have) + b"\xff\xd9"


def test_progressive_jpeg_with_too_many_scans_is_refused(tmp_path):
    ok = _many_scans(64, MAX_JPEG_SCANS)
    assert read_image(ok).size == (64, 64)  # at the limit: read (PIL warns about the progression only)
    bomb = _many_scans(64, MAX_JPEG_SCANS + 1)
    path = tmp_path / "scans.jpg"
    path.write_bytes(bomb)
    for source, name in ((bomb, "image bytes"), (path, str(path))):
        with pytest.raises(ImageReadError, match=f"{name}: .*{MAX_JPEG_SCANS + 1} scans"):
            read_image(source)
    with pytest.raises(ImageReadError, match=f"{MAX_JPEG_SCANS + 1} scans"):
        read_image(Image.open(io.BytesIO(bomb)))  # a PIL image not decoded yet: counted before its load
    assert read_image(_encode(_photo(), "JPEG", progressive=True)).size == (23, 17)


def test_serving_graph_refuses_too_many_scans_alone():
    import tensorflow as tf

    from models.image_captioning import serving_ops
    from models.image_captioning.serving_pixels import decode_images

    good = _encode(_photo((40, 30)), "JPEG", progressive=True)
    at_limit, bomb = _many_scans(64, MAX_JPEG_SCANS), _many_scans(64, MAX_JPEG_SCANS + 1)
    images = tf.constant([good, bomb, at_limit, b"", good])
    headers = serving_ops.read_headers(images)
    assert headers["pixels"].numpy().tolist() == [1200, -1, 4096, -1, 1200]
    rows, pixels = decode_images(images, 32)
    assert rows.numpy().tolist() == [0, 2, 4] and pixels.shape == (3, 32, 32, 3)


def test_web_demo_bad_uploads_fail_alone(tiny_clipcap, tmp_path):
    from models.image_captioning.web_demo import Captioner

    good = tmp_path / "good.jpg"
    _photo((64, 48)).save(good)
    files = [good]
    for kind, (make, name) in CRAFTED.items():
        path = tmp_path / f"{kind.replace(' ', '_')}_{name}"
        path.write_bytes(make())
        files.append(path)
    bomb = tmp_path / "scans.jpg"
    bomb.write_bytes(_many_scans(64, MAX_JPEG_SCANS + 1))
    files += [bomb, good]
    rows = Captioner(tiny_clipcap).caption([str(f) for f in files], max_length=4)
    assert [row["error"] is None for row in rows] == [True] + [False] * (len(files) - 2) + [True]
    for row, path in zip(rows[1:-1], files[1:-1], strict=True):
        assert row["error"].startswith(path.name + ": ") and "thumbnail" not in row
    assert "scans" in rows[-2]["error"]


@pytest.mark.parametrize("save", [False, True], ids=["paths", "bytes"])
def test_caption_folder_names_each_bad_file(tiny_clipcap, tmp_path, save):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _photo((64, 48)).save(folder / "a_good.jpg")
    (folder / "b_dds.jpg").write_bytes(_dds_unknown_flags())
    (folder / "c_tiff.tif").write_bytes(_tiff_rational_strip_offsets())
    (folder / "d_exif.webp").write_bytes(CRAFTED["webp broken exif"][0]())
    _photo((64, 48)).save(folder / "e_good.png")
    results = tiny_clipcap.predict(str(folder), save=save, output_dir=str(tmp_path / "out"), progress=False,
                                   max_length=4)
    assert [r["error"] is None for r in results] == [True, False, False, False, True]
    for r in results[1:4]:
        assert r["error"].startswith(str(r["image"]) + ": "), r["error"]  # an ImageReadError naming the file


_DECODE_RSS = """
import resource, struct, sys, zlib
import tensorflow as tf
from models.image_captioning.serving_pixels import decode_images
side, colour = int(sys.argv[1]), int(sys.argv[2])
row = b"\\0" + b"\\x80" * (side * {2: 3, 6: 4}[colour])
z = zlib.compressobj(9)
body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, colour, 0, 0, 0))
       + chunk(b"IDAT", body) + chunk(b"IEND", b""))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows, _ = decode_images(tf.constant([png]), 32)
assert rows.numpy().tolist() == [0]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_serving_rgba_decoding_memory_is_close_to_rgb_s():
    """The serving graph's premultiplied alpha (`utils.tf_resample.premultiply`) works in blocks of rows: a
    4000 x 4000 RGBA PNG (69 kB) cost 620 to 640 MB of peak memory (an int32 copy of the whole image and its
    temporaries), 390 to 485 MB more than the same RGB PNG (24 to 30 bytes a pixel); now about 100 MB more
    (the fourth channel, the blocks and their concatenation)."""
    import subprocess
    import sys

    def extra_kb(colour):
        out = subprocess.run([sys.executable, "-c", _DECODE_RSS, "4000", str(colour)], capture_output=True,
                             text=True, timeout=300, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
        return int(out.stdout.split()[-1])

    rgb, rgba = extra_kb(2), extra_kb(6)
    assert (rgba - rgb) * 1024 < 12 * 4000 * 4000, (rgb, rgba)  # kB; at most 12 bytes a pixel more


def test_premultiply_blocks_give_pillow_s_integers():
    import tensorflow as tf

    from utils import tf_resample

    rng = np.random.default_rng(1)
    for shape in [(2 * tf_resample.PREMULTIPLY_ROWS + 3, 5, 4), (7, 3, 2), (0, 4, 4)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        got = tf_resample.premultiply(tf.constant(image)).numpy()
        if shape[0]:
            mode = {4: "RGBA", 2: "LA"}[shape[2]]
            expected = np.asarray(Image.fromarray(image, mode).convert(mode[:-1] + "a"))
            np.testing.assert_array_equal(got, expected)
        assert got.shape == shape and got.dtype == np.uint8


def test_web_demo_request_pixels_are_bounded(tmp_path):
    """Every image of a web demo request is held decoded until its captions are made: 16 uploads of 164 kB
    (RGBA PNGs of 40 megapixels) held 2.4 GB. Images are admitted in order while they fit in
    ``max_request_pixels`` (default twice ``max_pixels``); one that does not is its own error row."""
    from models.image_captioning import web_demo
    from models.image_captioning.web_demo import Captioner

    paths = []
    for i, size in enumerate([(100, 100), (100, 100), (100, 100), (50, 50)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGBA", size).save(paths[-1])
    captioner = Captioner(None, max_pixels=10_000, max_request_pixels=25_000)
    rows = captioner._read([str(p) for p in paths], "")
    assert [error is None for _, _, error in rows] == [True, True, False, True]
    name, image, error = rows[2]
    assert name == "2.png" and image is None
    assert error == ("2.png: 100x100 = 10000 pixels do not fit in the 25000 pixels of a request (20000 taken by "
                     "the images before it): send it in another request")
    assert Captioner(None).max_request_pixels == 2 * web_demo.MAX_PIXELS
    assert Captioner(None, max_pixels=1000).max_request_pixels == 2000


def _icon(embedded, directory_side=16):
    """An ICO of one entry that says ``directory_side`` square and holds the image file ``embedded``."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", directory_side, directory_side, 0, 0, 1, 32,
                                                       len(embedded), 22) + embedded


def test_icon_larger_than_its_directory_says_is_refused_before_decoding():
    """PIL decodes an ICO's largest icon inside `Image.open`, at its embedded PNG's size: a 262 kB ICO whose
    directory said 16 x 16 decoded an 8000 x 8000 PNG (256 MB) before ``max_pixels`` (40 M) refused it."""
    png = bytearray(_encode(Image.new("RGBA", (300, 200), (1, 2, 3, 4)), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 4 : idat + 12] = b"\0" * 8  # broken pixel data: only a decode would notice
    with pytest.raises(ImageReadError, match=r"image bytes \(its largest icon\): 300x200 = 60000 pixels exceeds"):
        read_image(_icon(bytes(png)), max_pixels=10_000)
    with pytest.raises(ImageReadError, match="cannot decode"):  # within the limit: decoded, and broken
        read_image(_icon(bytes(png)), max_pixels=100_000)
    for bitmap_format in ("png", "bmp"):
        data = _encode(Image.new("RGBA", (48, 48), (1, 2, 3, 255)), "ICO", sizes=[(48, 48), (16, 16)],
                       bitmap_format=bitmap_format)
        assert read_image(data, max_pixels=48 * 48).size == (48, 48)
        with pytest.raises(ImageReadError, match=r"\(its largest icon\): 48x48"):
            read_image(data, max_pixels=48 * 48 - 1)


def test_serve_passes_the_request_pixel_bound(tiny_model_dir, monkeypatch):
    """``serve --max-request-pixels N`` reaches the demo's `Captioner` (default None: twice --max-pixels)."""
    pytest.importorskip("gradio")
    import main
    from models.image_captioning import web_demo

    seen = []
    monkeypatch.setattr(web_demo, "serve", lambda model, **kwargs: seen.append(kwargs["max_request_pixels"]))
    assert main.main(["serve", "--model", str(tiny_model_dir)]) == 0
    assert main.main(["serve", "--model", str(tiny_model_dir), "--max-request-pixels", "5000000"]) == 0
    assert seen == [None, 5_000_000]
