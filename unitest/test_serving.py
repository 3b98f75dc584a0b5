"""The serving SavedModel (`models.image_captioning.serving`, ``main.py export --format savedmodel``).

Each mapper kind is exported once (tiny random models: MLP greedy, transformer beam 3) through the CLI, then
loaded in a separate ``python -I`` process whose working directory and ``sys.path`` exclude the repository
(`unitest/savedmodel_client.py`). Its captions must equal `ClipCap`'s: token-exact (same text, same score)
for the ``embeddings`` signature; for image bytes, the demo photos (JPEG) and copies in other formats and modes
(PNG RGB / palette / RGBA, BMP, GIF, a JPEG with an EXIF rotation) give the captions of ``ClipCap.caption`` (the
graph's pixels are `preprocess_image`'s, bit for bit: `unitest/test_serving_pixels.py`); a bad row gives "" and
NaN.

Images are judged by their headers before any decoding (`serving_ops.read_headers` / `admit`): small files
announcing sizes just above and below PIL's pixel cap in each format, truncated and unknown bytes, the request's
pixel budget, GIF frames larger than the screen; and a real 20000 x 20000 PNG bomb beside a photo must cost
less than 300 MB of peak memory more than two photos (`unitest/savedmodel_memory_client.py`).
"""

import base64
import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testing.tiny_models import DEMO_DIR, build_tiny_clipcap, shared_tiny_files

CLIENT = Path(__file__).with_name("savedmodel_client.py")
MEMORY_CLIENT = Path(__file__).with_name("savedmodel_memory_client.py")
KINDS = {"mlp": ["--method", "greedy"], "transformer": ["--method", "beam", "--beam-size", "3"]}
DEMO = sorted(DEMO_DIR.glob("*.jpg"))


def _other_formats(directory):
    """Demo photos in the other formats and modes the graph decodes: PNG (RGB, palette, RGBA with varied alpha),
    BMP, GIF (palette), and a JPEG whose EXIF orientation (6) turns it a quarter."""
    paths = []
    for i, (fmt, mode) in enumerate((("png", "RGB"), ("bmp", "RGB"), ("gif", "RGB"), ("png", "P"), ("png", "RGBA"))):
        image = Image.open(DEMO[i % len(DEMO)]).convert("RGB")
        if mode == "P":
            image = image.quantize(64)
        elif mode == "RGBA":
            rgba = np.asarray(image.convert("RGBA")).copy()
            rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)[None]
            image = Image.fromarray(rgba)
        path = directory / f"{DEMO[i % len(DEMO)].stem}_{mode}.{fmt}"
        image.save(path)
        paths.append(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = directory / "rotated.jpg"
    Image.open(DEMO[-1]).save(path, exif=exif.tobytes())
    return paths + [path]


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory):
    """(kind, ClipCap, SavedModel directory, the client's JSON output, image paths)."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model

    kind = request.param
    files = shared_tiny_files(tmp_path_factory)
    directory = tmp_path_factory.mktemp(f"serving_{kind}")
    checkpoint = build_tiny_clipcap(directory / "clipcap.pt", files["tokenizer"], kind=kind, stop_boost=1.5)
    convert_model(ClipCap, checkpoint, files["clip"], files["tokenizer"], directory / "model", name=f"serve_{kind}")
    model = ClipCap.load(str(directory / "model"))
    out = directory / "export"
    assert main(["export", str(directory / "model"), str(out), "--max-batch-size", "4", *KINDS[kind]]) == 0
    images = DEMO + _other_formats(directory)
    instances = [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in images]
    truncated = DEMO[0].read_bytes()[:600]
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    bomb = bytearray(bomb.getvalue())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header announces 100000 x 100000 pixels
    for bad in (b"this is not an image", truncated, bytes(bomb), b""):
        instances.append({"b64": base64.b64encode(bad).decode()})
    embeddings = np.random.default_rng(3).normal(0, 0.5, (6, model.prefix_size)).astype(np.float32)
    embeddings[4] = np.nan
    request_path = directory / "request.json"
    request_path.write_text(json.dumps({"instances": instances, "embeddings": embeddings.tolist()}))
    result = directory / "result.json"
    cwd = directory / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-I", str(CLIENT), str(out), str(request_path), str(result)],
                          cwd=cwd, env=_client_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return kind, model, out, json.loads(result.read_text()), images, embeddings


def _client_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}


def _decoding(kind):
    return {"method": "greedy"} if kind == "mlp" else {"method": "beam", "beam_size": 3}


def test_signatures_and_metadata(exported):
    kind, model, out, result, _, _ = exported
    assert result["signatures"] == ["embeddings", "serving_default"]
    assert result["inputs"] == {"images": ["string", [None]]}
    meta = result["metadata"]
    assert meta["method"] == _decoding(kind)["method"] and meta["max_length"] == 67
    assert meta["beam_size"] == (3 if kind == "transformer" else None)
    assert meta["normalize_prefix"] is (kind == "transformer") and meta["max_batch_size"] == 4
    assert meta["max_pixels"] == 89_478_485 and meta["max_request_pixels"] == 2 * 89_478_485
    assert meta["formats"] == ["jpeg", "png", "gif", "bmp"]
    assert json.loads((out / "assets.extra" / "clipcap_serving.json").read_text()) == meta


def test_embeddings_signature_is_token_exact(exported):
    kind, model, _, result, _, embeddings = exported
    good = [i for i in range(len(embeddings)) if i != 4]
    # the signature runs the XLA-compiled mapper and loop: the same captions as generate's; scores within 1e-5
    # (under "auto" generate's mapper or loop may run uncompiled for a shape it has not seen before: its scores
    # then differ in their last bits)
    expected = model.generate(embeddings[good], compile_now=True, **_decoding(kind))
    got = result["embeddings"]
    assert [got["captions"][i] for i in good] == [c[0]["text"] for c in expected]
    np.testing.assert_allclose([got["scores"][i] for i in good], [c[0]["score"] for c in expected], rtol=0, atol=1e-5)
    assert got["captions"][4] == "" and np.isnan(got["scores"][4])  # a NaN row: no caption, the others kept
    assert any(len(c) > 3 for c in got["captions"])  # real captions, not only the stop token


def test_bytes_signature_matches_caption(exported):
    kind, model, _, result, images, _ = exported
    photos = images[: len(DEMO) + 6]  # the JPEG photos and their copies in other formats, modes, orientation
    expected = model.caption([str(p) for p in photos], **_decoding(kind))
    got = result["images"]
    agreement = sum(a == b for a, b in zip(got["captions"], expected))
    print(f"{kind}: {agreement} of {len(expected)} captions equal ClipCap.caption's")
    assert got["captions"][: len(expected)] == expected
    reference = [c[0]["score"] for c in model.generate(model.encode_images([str(p) for p in photos]),
                                                       **_decoding(kind))]
    np.testing.assert_allclose(got["scores"][: len(expected)], reference, atol=2e-3)
    for i in range(len(expected), len(got["captions"])):  # text, truncated, decompression bomb, empty
        assert got["captions"][i] == "" and np.isnan(got["scores"][i]), i


def test_export_refuses_a_user_folder(tmp_path, exported):
    from main import main

    _, _, out, _, _, _ = exported
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["export", str(out.parent / "model"), str(user)]) == 2
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1
    assert main(["export", str(out.parent / "model"), str(out)]) == 2  # ours, but no --overwrite
    assert main(["export", str(out.parent / "model"), str(tmp_path / "x.pt"), "--method", "beam"]) == 2


def test_tokens_to_text_equals_tokenizer_decode(gpt2_tokenizer_dir):
    import tensorflow as tf

    from models.image_captioning.serving_ops import token_pieces, tokens_to_text
    from testing.tiny_models import SAMPLE_TEXT
    from utils.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer(gpt2_tokenizer_dir)  # trained here, on text with non-ASCII characters
    pieces = tf.constant(token_pieces(tok, len(tok) + 5).tolist(), tf.string)  # 5 ids beyond the tokenizer
    texts = SAMPLE_TEXT + ["  Crème brûlée à la française — naïve café  ", "日本語のテキスト", "\t.\n"]
    rows = [tok.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    rows += [rng.integers(0, len(tok), size=n).tolist() for n in (1, 3, 9, 30) for _ in range(25)]
    rows += [tok.encode("é")[:1], [0, 14, 0]]  # half a UTF-8 character; the special token
    assert any(len(t.encode()) != len(t) for t in texts)  # non-ASCII is covered
    width = max(len(r) for r in rows)
    tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    lengths = np.array([len(r) for r in rows], np.int64)
    got = [t.decode() for t in tokens_to_text(pieces, tf.constant(tokens), tf.constant(lengths)).numpy()]
    assert got == [tok.decode(r).strip() for r in rows]


def test_decode_images_drops_bad_rows():
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images

    good = DEMO[0].read_bytes()
    wide = io.BytesIO()
    Image.new("RGB", (3000, 1)).save(wide, "PNG")  # resized to 672000 x 224 before the crop
    rows, pixels = decode_images(tf.constant([b"x", good, good[:300], wide.getvalue(), good]), 224,
                                 max_pixels=1 << 30)
    assert rows.numpy().tolist() == [1, 4] and pixels.shape == (2, 224, 224, 3)
    rows, _ = decode_images(tf.constant([good]), 224, max_pixels=100)  # the pixel bound
    assert rows.numpy().tolist() == []


# --- headers before decoding: decompression bombs, truncated and unknown bytes (issue 22) -------------------

CAP = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS, the serving graph's default max_pixels
BELOW, ABOVE = (9459, 9459), (9460, 9459)  # 89,472,681 and 89,482,140 pixels


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, idat=b""):
    """A greyscale 8-bit PNG announcing width x height, with the given (compressed) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_bomb(side):
    """A valid single-colour side x side PNG (a few hundred KB for 20000): its rows are compressed 50 at a time,
    the image itself is never built."""
    z = zlib.compressobj(9)
    rows = bytes((side + 1) * 50)  # each row: filter byte 0, then zeros
    data = b"".join([z.compress(rows) for _ in range(side // 50)] + [z.compress(bytes((side + 1) * (side % 50))),
                                                                      z.flush()])
    return _png(side, side, data)


def _jpeg(width, height):
    """A small real JPEG whose SOF0 announces width x height (the scan data stays 16 x 16)."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (90, 30, 200)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif(screen, frame):
    """A GIF with that logical screen and one frame of that size (its data: a few codes, no more)."""
    return (b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
            + b"\x02\x02\x4c\x01\x00;")


def _bmp(width, height):
    """A 24-bit BITMAPINFOHEADER BMP header announcing width x height (negative: top-down rows)."""
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24,
                                                                    0, 0, 0, 0, 0, 0)


HEADERS = {"jpeg": _jpeg, "png": _png, "bmp": _bmp, "gif screen": lambda w, h: _gif((w, h), (16, 16)),
           "gif frame": lambda w, h: _gif((16, 16), (w, h))}


def _headers_and_admission(rows, **kwargs):
    import tensorflow as tf

    from models.image_captioning.serving_ops import admit, read_headers

    headers = read_headers(tf.constant(rows))
    return {k: v.numpy().tolist() for k, v in headers.items()}, admit(headers, 224, **kwargs).numpy().tolist()


def test_default_pixel_cap_is_pils():
    from models.image_captioning.serving_ops import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == CAP and BELOW[0] * BELOW[1] <= CAP < ABOVE[0] * ABOVE[1]


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_header_just_above_the_cap_is_refused(kind):
    """Read from the header alone (the files are small: no decoder could make these pixels from them)."""
    make = HEADERS[kind]
    headers, admitted = _headers_and_admission([make(*BELOW), make(*ABOVE), make(3, 2)])
    assert admitted == [True, False, True]
    if kind != "gif screen":  # a GIF's decoded size is its first frame's (the screen still counts to the cap)
        assert headers["width"] == [BELOW[0], ABOVE[0], 3] and headers["height"] == [BELOW[1], ABOVE[1], 2]
    assert headers["pixels"][:2] == [BELOW[0] * BELOW[1], ABOVE[0] * ABOVE[1]]


def test_bmp_top_down_height_and_tensorflow_reading():
    headers, admitted = _headers_and_admission([_bmp(*BELOW[:1], -BELOW[1]), _bmp(ABOVE[0], -ABOVE[1]),
                                                _bmp(0, 5), _bmp(-5, 5)])
    assert headers["height"][:2] == [BELOW[1], ABOVE[1]] and admitted == [True, False, False, False]


def test_truncated_and_unknown_bytes_never_fail():
    """0, 5 and 20 bytes of every format, garbage, other formats: refused from the header, the rest captioned."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images

    photo = DEMO[0].read_bytes()
    rgb = Image.open(DEMO[0]).convert("RGB")
    files = [photo, _encode(rgb, "PNG"), _encode(rgb, "GIF"), _encode(rgb, "BMP")]
    bad = [f[:n] for f in files for n in (0, 5, 20)]
    bad += [bytes(range(256)) * 3, b"GIF89a" + b"\xff" * 30, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"BM" + b"\xff" * 40,
            _encode(rgb, "WEBP"), _encode(rgb, "TIFF"), b"\xff\xd8\xff" + b"\0" * 10]
    headers, admitted = _headers_and_admission(bad)
    assert not any(admitted) and all(p == -1 for p in headers["pixels"])
    rows, pixels = decode_images(tf.constant([photo, *bad, *files]), 224)
    assert rows.numpy().tolist() == [0] + [1 + len(bad) + i for i in range(len(files))]
    assert np.isfinite(pixels.numpy()).all()


def test_request_pixel_budget():
    """Rows are admitted in order while they fit in what is left of max_request_pixels."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images

    square = _encode(Image.new("RGB", (100, 100), (20, 140, 60)), "PNG")  # 10,000 pixels
    small = _encode(Image.new("RGB", (50, 50), (200, 10, 60)), "PNG")  # 2,500 pixels
    rows, _ = decode_images(tf.constant([square, square, square, small]), 224, max_request_pixels=25_000)
    assert rows.numpy().tolist() == [0, 1, 3]
    rows, _ = decode_images(tf.constant([square, square]), 224, max_request_pixels=20_000)
    assert rows.numpy().tolist() == [0, 1]


def test_gif_frames_larger_than_the_screen_are_counted():
    """giflib decodes each frame at the size its own descriptor gives, whatever the logical screen says."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images

    data = bytearray(_encode(Image.new("L", (300, 300), 90), "GIF"))
    data[6:10] = struct.pack("<HH", 10, 10)  # the screen says 100 pixels, the frame holds 90,000
    small = _encode(Image.new("RGB", (100, 100), (20, 140, 60)), "PNG")
    rows, _ = decode_images(tf.constant([bytes(data), small]), 224, max_pixels=50_000)
    assert rows.numpy().tolist() == [1]
    rows, _ = decode_images(tf.constant([bytes(data), small]), 224, max_pixels=90_000)
    assert rows.numpy().tolist() == [0, 1]


def test_gif_is_decoded_up_to_its_first_frame():
    """The first frame's pixels, as `ClipCap.caption` reads them; later frames are never read (here a second
    frame announcing 60000 x 60000 pixels, whose data is missing)."""
    import tensorflow as tf

    from models.image_captioning.serving_pixels import decode_images
    from utils.clip_preprocessing import preprocess_image
    from utils.image_io import read_image

    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 80), np.uint8)) for i in range(3)]
    animated = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    single = _encode(frames[0], "GIF")
    huge_second = single[:-1] + b"," + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0) + b"\x02\x02\x4c\x01\x00;"
    rows, pixels = decode_images(tf.constant([animated, huge_second]), 224)
    assert rows.numpy().tolist() == [0, 1]
    expected = preprocess_image(read_image(animated), 224)
    np.testing.assert_array_equal(pixels[0].numpy(), expected)
    np.testing.assert_array_equal(pixels[1].numpy(), expected)


def test_gif_walk_is_bounded():
    """Finding the end of a GIF's first frame takes at most MAX_GIF_BLOCKS steps: a frame cut in more sub-blocks
    is refused (bounded time), one cut in fewer is read."""
    from models.image_captioning.serving_ops import MAX_GIF_BLOCKS

    def gif(blocks):  # a 4 x 4 frame whose LZW data is cut in 1-byte sub-blocks
        return (b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 4, 4, 0)
                + b"\x02" + b"\x01\x4c" * blocks + b"\x00;")

    headers, admitted = _headers_and_admission([gif(1000), gif(MAX_GIF_BLOCKS)])
    assert admitted == [True, False] and headers["pixels"] == [16, -1]


def _memory_run(out, batches, directory, limit_mb):
    request = directory / "memory_request.json"
    request.write_text(json.dumps([[str(p) for p in batch] for batch in batches]))
    result = directory / "memory_result.json"
    cwd = directory / "memory_cwd"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-I", str(MEMORY_CLIENT), str(out), str(request), str(result),
                           str(limit_mb)], cwd=cwd, env=_client_env(), capture_output=True, text=True, timeout=600)
    report = json.loads(result.read_text()) if result.exists() else {}
    assert proc.returncode == 0, report.get("stopped") or proc.stderr[-3000:]
    return report["calls"]


def test_decompression_bomb_costs_no_memory(exported, tmp_path):
    """A single-colour 20000 x 20000 PNG (~390 KB) beside a photo: less than 300 MB more peak memory than two
    photos, the photo captioned as alone, the bomb "" and NaN."""
    kind, _, out, _, _, _ = exported
    if kind != "mlp":
        pytest.skip("one export is enough: decoding does not depend on the mapper")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(20_000))
    photo = DEMO[0]
    (two,) = _memory_run(out, [[photo, photo]], tmp_path, limit_mb=6_000)
    mixed, alone = _memory_run(out, [[bomb, photo], [photo]], tmp_path, limit_mb=two["peak_mb"] + 1_000)
    print(f"peak RSS: two photos {two['peak_mb']:.0f} MB, bomb + photo {mixed['peak_mb']:.0f} MB "
          f"({bomb.stat().st_size} bytes bomb; {mixed['seconds']:.2f} s vs {two['seconds']:.2f} s)")
    assert mixed["peak_mb"] - two["peak_mb"] < 300
    assert mixed["captions"][0] == "" and math.isnan(mixed["scores"][0])
    assert mixed["captions"][1] == alone["captions"][0] == two["captions"][0] and mixed["captions"][1]
