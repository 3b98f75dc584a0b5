"""models/image_captioning/prediction.py: order, completeness, bad inputs, image modes, map.json, resume.

Most tests use a fake model (plain numpy, no TensorFlow) whose "caption" is the size of the image it was
given (``"<width>x<height>"``), so the results show which image went where and whether EXIF orientation was
applied; the real ClipCap runs in `test_tiny_clipcap_predict` (shared tiny model).
"""

import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.image_captioning import prediction
from models.image_captioning.prediction import expand_inputs, load_map, predict
from models.siamese import image_embedding
from models.siamese.image_embedding import ImageEmbedder


class FakeEmbedder(ImageEmbedder):
    """The real reading and preprocessing, then the image's size as its "pixels" (so captions identify it)."""

    def __init__(self, clip, **kwargs):
        super().__init__(clip.encode_pixels, clip.input_resolution, **kwargs)
        self.clip = clip

    def preprocess(self, image):
        self.clip.modes.append(image.mode)
        pixels = super().preprocess(image)  # the real preprocessing must accept every mode
        n = self.input_resolution
        assert pixels.shape == (n, n, 3) and np.isfinite(pixels).all()
        return np.array([image.width, image.height], np.float32)


class FakeClip:
    input_resolution = 8

    def __init__(self):
        self.modes = []

    def image_embedder(self, **kwargs):
        return FakeEmbedder(self, **kwargs)

    def encode_pixels(self, pixels, compile_now=None):  # a long run asks for compilation: nothing to compile
        return np.asarray(pixels) * 1.0  # (B, 2)

    def will_compile(self, count, compile_now=None):
        return False  # plain numpy: nothing is ever compiled


class FakeModel:
    name = "fake"
    identity = "sha256:fake"  # what map.json entries are keyed by (a ClipCap's digest of its weights)

    def __init__(self, interrupt_at_call=None):
        self.clip = FakeClip()
        self.generate_calls = []
        self.interrupt_at_call = interrupt_at_call

    def decoder_will_compile(self, batch_size, sampler, max_length, compile_now=None):
        return False  # plain numpy: nothing is ever compiled

    def generate(self, embeddings, method="greedy", num_captions=1, **kwargs):
        num_captions = getattr(method, "num_captions", num_captions)  # predict hands over its checked Decoding
        self.generate_calls.append(len(embeddings))
        if self.interrupt_at_call == len(self.generate_calls):
            raise KeyboardInterrupt
        return [[{"text": f"{int(w)}x{int(h)}", "score": -float(k), "tokens": [1, 2]} for k in range(num_captions)]
                for w, h in embeddings]


def _jpeg_bytes(size=(40, 30), mode="RGB", exif_orientation=None):
    image = Image.new(mode, size, "red" if mode == "RGB" else 100)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _png_bomb():
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP > twice PIL's limit): refused at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def image_dir(tmp_path):
    """Good images in every mode (sizes are unique so captions identify them) and every kind of bad file."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    good = {}

    def save(name, image, **kw):
        image.save(d / name, **kw)
        good[name] = f"{image.width}x{image.height}"

    save("rgb.jpg", Image.new("RGB", (41, 31), "blue"))
    save("gray.png", Image.new("L", (42, 32), 128))
    save("gray_alpha.png", Image.new("LA", (43, 33), (10, 200)))
    save("palette.png", Image.new("RGB", (44, 34), "green").convert("P", palette=Image.ADAPTIVE))
    save("rgba.png", Image.new("RGBA", (45, 35), (1, 2, 3, 128)))
    save("cmyk.jpg", Image.new("CMYK", (46, 36), (10, 20, 30, 40)))
    save("bilevel.png", Image.new("1", (47, 37), 1))
    save("sub/sixteen.png", Image.fromarray(np.full((38, 48), 40000, np.uint16)))
    assert Image.open(d / "sub/sixteen.png").mode.startswith("I")
    (d / "rotated.jpg").write_bytes(_jpeg_bytes((50, 20), exif_orientation=6))  # 90° rotation: shown 20x50
    good["rotated.jpg"] = "20x50"
    jpeg = _jpeg_bytes((49, 39))
    bad = {"empty.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"just some text\n",
           "bomb.png": _png_bomb()}
    for name, data in bad.items():
        (d / name).write_bytes(data)
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("nothing to see")
    return d, good, bad


def test_order_completeness_bad_inputs_and_modes(image_dir, tmp_path, caplog):
    d, good, bad = image_dir
    inputs = [str(d / "rgb.jpg"), str(tmp_path / "missing.jpg"), str(d), str(tmp_path / "no_images"),
              str(d / "*.png"), np.zeros((12, 13, 3), np.uint8), Image.new("RGB", (14, 15))]
    model = FakeModel()
    lines = []
    results = predict(model, inputs, batch_size=3, output_dir=tmp_path / "out", progress=False, status=lines.append)

    files = sorted(str(p) for p in d.rglob("*") if p.is_file())
    # each file once, and the two images in memory; nothing was in map.json
    assert lines[0].startswith(f"captioning {len(files) + 2} image(s),") and "answered" not in lines[0], lines[0]
    pngs = sorted(str(p) for p in d.glob("*.png"))
    expected_labels = ([str(d / "rgb.jpg"), str(tmp_path / "missing.jpg")] + files + [str(tmp_path / "no_images")]
                       + pngs + [len(files) + len(pngs) + 3, len(files) + len(pngs) + 4])
    assert [r["image"] for r in results] == expected_labels
    by_label = {}
    for r in results:
        by_label.setdefault(r["image"], []).append(r)
    for name, size in good.items():
        first, *repeats = by_label[str(d / name)]
        assert first["error"] is None and first["caption"] == size and not first["cached"], (name, first)
        assert set(first["timings"]) == {"read", "preprocess", "encode", "generate"}
        # rgb.jpg and the top folder's PNGs are given twice: read and captioned once, the copy answered by the first
        for r in repeats:
            assert r["caption"] == size and r["cached"] and r["timings"] == {}, (name, r)
    assert len(model.clip.modes) == len(good) + 2  # each good file preprocessed once, and the two in memory
    assert sum(r["cached"] for r in results) == 1 + sum(str(d / n) in pngs for n in good)
    expected_errors = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "text.jpg": "not an image",
                       "bomb.png": "decompression bomb"}
    for name, words in expected_errors.items():
        for r in by_label[str(d / name)]:
            assert r["caption"] is None and words in r["error"], (name, r)
    assert "no such file" in by_label[str(tmp_path / "missing.jpg")][0]["error"]
    assert "no images" in by_label[str(tmp_path / "no_images")][0]["error"]
    assert results[-2]["caption"] == "13x12" and results[-1]["caption"] == "14x15"
    assert {"L", "LA", "P", "RGBA", "CMYK", "1", "RGB"} <= set(model.clip.modes)
    assert any(m.startswith("I") for m in model.clip.modes)
    assert "candidates" not in results[0]
    # every failure is in the log too
    for name in expected_errors:
        assert str(d / name) in caplog.text

    stored = load_map(tmp_path / "out" / "map.json")
    captioned = {str((d / n).resolve()) for n in good}
    assert set(stored) == captioned  # file images only, failures not stored
    entry = stored[str((d / "rotated.jpg").resolve())]
    assert entry["caption"] == "20x50" and entry["settings"] == {"model": "fake", "model_identity": "sha256:fake", "method": "greedy",
                                                      "exif_transpose": True}
    assert entry["candidates"] == [{"text": "20x50", "score": 0.0, "tokens": [1, 2]}]

    # again: the good files are answered by map.json (counted once each), the bad ones and those in memory are not
    lines = []
    again = predict(FakeModel(), inputs, batch_size=3, output_dir=tmp_path / "out", progress=False, status=lines.append)
    assert [r["caption"] for r in again] == [r["caption"] for r in results]
    assert lines[0].startswith(f"captioning {len(bad) + 2} image(s),"), lines[0]
    assert f"({len(good)} more answered from " in lines[0], lines[0]


def test_exif_orientation_can_be_ignored(image_dir):
    d, _, _ = image_dir
    r = predict(FakeModel(), [d / "rotated.jpg"], save=False, progress=False, exif_transpose=False)
    assert r[0]["caption"] == "50x20"  # as stored, as OpenAI's and the official code read it


def test_single_inputs_and_array_batches():
    model = FakeModel()
    assert [r["caption"] for r in predict(model, np.zeros((5, 6, 3), np.uint8), save=False, progress=False)] == ["6x5"]
    batch = np.zeros((3, 7, 9, 3), np.uint8)  # (N, H, W, C): three images
    results = predict(model, batch, save=False, progress=False)
    assert [(r["image"], r["caption"]) for r in results] == [(0, "9x7"), (1, "9x7"), (2, "9x7")]
    assert predict(model, [], save=False, progress=False) == []
    assert expand_inputs(Image.new("L", (2, 2)))[0].label == 0


def test_rerun_skips_unless_settings_change_or_overwrite(image_dir, tmp_path):
    d, good, _ = image_dir
    out = tmp_path / "out"
    model = FakeModel()
    first = predict(model, d, batch_size=4, output_dir=out, progress=False)
    n_good = len(good)
    assert sum(model.generate_calls) == n_good

    model = FakeModel()
    again = predict(model, d, batch_size=4, output_dir=out, progress=False, return_candidates=True)
    assert model.generate_calls == []
    assert [r["caption"] for r in again] == [r["caption"] for r in first]
    assert all(r["cached"] for r in again if r["error"] is None)
    assert all(r["candidates"][0]["text"] == r["caption"] for r in again if r["error"] is None)

    model = FakeModel()  # other settings: captioned again, entries replaced
    predict(model, d, batch_size=4, output_dir=out, progress=False, method="beam", beam_size=3, num_captions=2)
    assert sum(model.generate_calls) == n_good
    entry = load_map(out / "map.json")[str((d / "rgb.jpg").resolve())]
    assert entry["settings"] == {"model": "fake", "model_identity": "sha256:fake", "method": "beam",
                                 "exif_transpose": True, "beam_size": 3, "num_captions": 2}
    assert len(entry["candidates"]) == 2

    model = FakeModel()
    predict(model, d, batch_size=4, output_dir=out, progress=False, method="beam", beam_size=3, num_captions=2,
            overwrite=True)
    assert sum(model.generate_calls) == n_good

    (d / "rgb.jpg").write_bytes(_jpeg_bytes((60, 61)))  # a changed file is captioned again
    model = FakeModel()
    r = predict(model, d / "rgb.jpg", output_dir=out, progress=False, method="beam", beam_size=3, num_captions=2)
    assert model.generate_calls == [1] and r[0]["caption"] == "60x61"


def test_resume_after_interrupted_run(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(7):
        Image.new("RGB", (20 + i, 10)).save(d / f"{i}.png")
    out = tmp_path / "out"
    model = FakeModel(interrupt_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        predict(model, d, batch_size=2, output_dir=out, progress=False)
    stored = load_map(out / "map.json")
    # the two batches decoded before the interruption are saved (reading in 2 threads may reorder them)
    assert len(stored) == 4 and {v["caption"] for v in stored.values()} <= {f"{20 + i}x10" for i in range(7)}
    # no temporary file left behind (nor the lock file: file_lock removes it on release)
    assert [p.name for p in out.iterdir()] == ["map.json"]
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-")]

    model = FakeModel()
    results = predict(model, d, batch_size=2, output_dir=out, progress=False)
    assert sum(model.generate_calls) == 3
    assert [r["caption"] for r in results] == [f"{20 + i}x10" for i in range(7)]
    assert sum(r["cached"] for r in results) == 4


def test_model_failure_raises_and_keeps_what_was_written(tmp_path):
    class Broken(FakeModel):
        def generate(self, embeddings, **kwargs):
            raise TypeError("generate() got an unexpected keyword argument 'bem_size'")

    with pytest.raises(TypeError, match="bem_size"):
        predict(Broken(), [np.zeros((4, 4), np.uint8)] * 3, output_dir=tmp_path, progress=False)


def test_corrupt_map_is_an_error_not_erased(tmp_path):
    (tmp_path / "map.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable map.json"):
        predict(FakeModel(), np.zeros((4, 4), np.uint8), output_dir=tmp_path, progress=False)
    assert (tmp_path / "map.json").read_text() == "{not json"


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        predict(FakeModel(), [], method="greedy_search")
    model = FakeModel()
    model.clip = None
    with pytest.raises(ValueError, match="no CLIP"):
        predict(model, [])


def test_display_draws_a_grid(image_dir, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(plt.gcf()))
    d, good, _ = image_dir
    predict(FakeModel(), [d / "rgb.jpg", d / "empty.jpg", d / "rotated.jpg"], display=True, save=False,
            progress=False)
    (figure,) = shown
    axes = figure.get_axes()
    assert [ax.get_xlabel() for ax in axes] == ["41x31", "20x50"]
    assert axes[1].get_images()[0].get_array().shape[:2] == (50, 20)  # shown upright (EXIF applied)
    plt.close("all")


def test_map_json_is_valid_json_with_paths(image_dir, tmp_path):
    d, good, _ = image_dir
    predict(FakeModel(), d / "gray.png", output_dir=tmp_path, progress=False)
    data = json.loads((tmp_path / "map.json").read_text())
    assert list(data) == [str((d / "gray.png").resolve())]


# ------------------------------------------------------------------------------------- the real (tiny) model


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def tiny_clipcap(request, tmp_path_factory):
    """Both mapper kinds of the factory's tiny model (conftest's ``tiny_clipcap`` is the MLP alone)."""
    from testing import tiny_models

    return tiny_models.tiny_clipcap(tmp_path_factory, kind=request.param)


def test_tiny_clipcap_predict_matches_generate(tiny_clipcap, tmp_path):
    """The pipeline gives the captions of ``generate(encode_images(...))``: same embeddings (the transformer
    weights expect a normalised one), same decoding, whatever the batching."""
    from testing.tiny_models import DEMO_DIR

    demo = [str(p) for p in sorted(DEMO_DIR.glob("*.jpg"))]
    kwargs = dict(method="beam", beam_size=3, num_captions=2, max_length=8)
    results = tiny_clipcap.predict(demo + [str(tmp_path / "missing.jpg")], batch_size=2, output_dir=tmp_path,
                                   progress=False, return_candidates=True, **kwargs)
    assert [r["image"] for r in results] == demo + [str(tmp_path / "missing.jpg")]
    assert results[-1]["caption"] is None and "no such file" in results[-1]["error"]
    # the pipeline (batches of 2) gives what encode_images + generate give on the whole list at once
    expected = tiny_clipcap.generate(tiny_clipcap.encode_images(demo), **kwargs)
    for r, candidates in zip(results, expected):
        assert r["error"] is None and r["caption"] == candidates[0]["text"]
        assert [c["text"] for c in r["candidates"]] == [c["text"] for c in candidates]
        assert [c["tokens"] for c in r["candidates"]] == [list(c["tokens"]) for c in candidates]
        assert [c["score"] for c in r["candidates"]] == pytest.approx([c["score"] for c in candidates], abs=1e-4)
    assert len(load_map(tmp_path / "map.json")) == len(demo)


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(method="greedy", top_k=5),
                                    dict(method="beam", beam_size=0), dict(max_length=2.5), dict(seed=2**40),
                                    dict(stop_token="not one token")])
def test_bad_decoding_arguments_fail_before_any_image_is_read(tiny_clipcap, tmp_path, monkeypatch, kwargs):
    """A long run with a bad decoding argument fails at once, not after reading and encoding a batch."""
    def never(*args, **kw):
        raise AssertionError("an image was read before the arguments were checked")

    monkeypatch.setattr(image_embedding, "read_image", never)
    with pytest.raises(ValueError):
        tiny_clipcap.predict([str(tmp_path / "a.jpg")], output_dir=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "map.json").exists()


def test_map_json_damaged_during_a_run_keeps_the_batch_in_a_sidecar(tmp_path, monkeypatch):
    """Another program breaks map.json between two batches: it is not overwritten, and the captions of the
    batch that could not be merged are kept beside it in a file the error names."""
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.new("RGB", (20 + i, 10)).save(paths[-1])
    out = tmp_path / "out"
    merge, merged = prediction.merge_into_map, []

    def breaking_merge(path, entries):
        if merged:  # the first batch is in map.json: now someone else damages it
            Path(path).write_text("{broken")
        merged.append(sorted(entries))
        return merge(path, entries)

    monkeypatch.setattr(prediction, "merge_into_map", breaking_merge)
    with pytest.raises(ValueError, match="not a readable map.json.*saved to .*unsaved") as info:
        predict(FakeModel(), paths, batch_size=2, output_dir=out, progress=False)
    assert (out / "map.json").read_text() == "{broken"
    sidecar = str(info.value).rsplit("saved to ", 1)[1]
    assert sorted(json.loads(open(sidecar).read())) == merged[1] == sorted(os.path.abspath(p) for p in paths[2:])


def test_a_partial_last_batch_compiles_no_new_shape(tmp_path_factory):
    """5 images in batches of 2 (2, 2, 1): the last batch is padded to 2, so one decoder program serves the run
    (was two: batch 2 and batch 1), and the padding changes no caption."""
    from testing.tiny_models import tiny_clipcap

    model = tiny_clipcap(tmp_path_factory)  # a fresh copy: its compiled functions are counted
    images = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "demo").glob("*.jpg"))
    results = list(predict(model, images, batch_size=2, save=False, progress=False, max_length=5))
    assert sorted({key[0] for key in model.decoder._compiled}) == [2]  # (batch, K, max_length, sampler)
    alone = model.generate(model.encode_images(images), max_length=5)  # all 5 at once, padded to 8 inside
    assert [r["caption"] for r in results] == [candidates[0]["text"] for candidates in alone]


# ------------------------------------------------------------------------------- writes that fail, odd names


def _four_images(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.new("RGB", (20 + i, 10)).save(paths[-1])
    return paths


def test_a_failed_map_write_keeps_every_result(tmp_path, monkeypatch):
    """The disk fills after the first batch: the run goes on, and the error carries every result (the
    caller prints them) and the count of captions left unsaved; the first batch stays in map.json."""
    import errno

    paths, out = _four_images(tmp_path), tmp_path / "out"
    replace, calls = os.replace, []

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("map.json"):
            calls.append(dst)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(prediction.MapWriteError, match="No space left.*2 captions of this run are not saved") as info:
        predict(FakeModel(), paths, batch_size=2, output_dir=out, progress=False)
    assert [r["caption"] for r in info.value.results] == [f"{20 + i}x10" for i in range(4)]
    assert info.value.unsaved == 2 and len(calls) == 2  # no further write attempted after the failure
    assert len(load_map(out / "map.json")) == 2
    assert sorted(p.name for p in out.iterdir()) == ["map.json"]  # no temporary file (nor lock) left


def test_an_unwritable_output_dir_is_refused_before_any_image_is_read(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    model = FakeModel()
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "under"):
        with pytest.raises(prediction.MapWriteError, match="a_file is a regular file, not a folder") as info:
            predict(model, _four_images(tmp_path), output_dir=output_dir, progress=False)
        assert info.value.results is None
    assert model.generate_calls == [] and (tmp_path / "a_file").read_text() == "mine"


def test_a_symlinked_map_json_is_refused_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "shared.json"
    target.write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "map.json").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        predict(FakeModel(), _four_images(tmp_path), output_dir=tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "map.json").is_symlink() and target.read_text() == "{}"
    # made a link between the read and the write: not replaced either
    os.remove(tmp_path / "out" / "map.json")
    load = prediction.load_map

    def read_then_link(path, *args):
        data = load(path, *args)
        os.symlink(target, path)
        return data

    monkeypatch.setattr(prediction, "load_map", read_then_link)
    with pytest.raises(ValueError, match="symbolic link"):
        prediction.merge_into_map(tmp_path / "out" / "map.json", {"k": {"caption": "c", "settings": {}}})
    assert (tmp_path / "out" / "map.json").is_symlink() and target.read_text() == "{}"


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"/x.jpg": "a cat"}',
                                     '{"/x.jpg": {"caption": 3, "settings": {}}}', '{"/x.jpg": {"caption": "a cat"}}',
                                     '{"/x.jpg": {"caption": "a", "settings": {}, "candidates": "b"}}',
                                     '{"a": ' * 100 + "1" + "}" * 100])
def test_a_malformed_map_json_is_refused_naming_it(tmp_path, content):
    (tmp_path / "map.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'map.json'} is not a readable map.json"):
        load_map(tmp_path / "map.json")
    model = FakeModel()
    with pytest.raises(ValueError, match="not a readable map.json"):
        predict(model, _four_images(tmp_path), output_dir=tmp_path, progress=False)
    assert model.generate_calls == [] and (tmp_path / "map.json").read_text() == content  # never erased


def test_a_non_utf8_file_name_is_captioned_and_stored_losslessly(tmp_path):
    """``caf\\xe9.jpg`` (Latin-1 bytes) between two others: all three captioned, map.json valid UTF-8 whose
    key reads back to the same name (so a rerun finds it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate((b"a.jpg", b"caf\xe9.jpg", b"z.jpg")):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(_jpeg_bytes((30 + i, 10)))
    out = tmp_path / "out"
    results = predict(FakeModel(), str(folder), batch_size=1, output_dir=out, progress=False)
    assert [r["caption"] for r in results] == ["30x10", "31x10", "32x10"] and all(r["error"] is None for r in results)
    assert os.fsencode(results[1]["image"]) == os.fsencode(folder) + b"/caf\xe9.jpg"
    stored = json.loads((out / "map.json").read_bytes().decode("utf-8"))  # valid UTF-8
    assert results[1]["image"] in stored
    model = FakeModel()
    again = predict(model, str(folder), output_dir=out, progress=False)
    assert [r["cached"] for r in again] == [True] * 3 and model.generate_calls == []


def test_sampled_captions_are_keyed_by_the_image_not_its_batch(tiny_model_dir):
    """predict's read stage delivers images in any order, so an image's row in a batch is chance: its draws are
    keyed by its path (`samplers.draw_id`). The same seed gives an image the same caption whatever its place in
    the input, its batch or the call (`caption` and one image at a time agree)."""
    from models.image_captioning.clip_cap import ClipCap

    model = ClipCap.load(str(tiny_model_dir))
    photos = [str(p) for p in sorted((Path(__file__).resolve().parents[1] / "demo").glob("*.jpg"))][:4]
    kwargs = dict(method="sample", seed=0, max_length=8, save=False, return_candidates=True)

    def texts(images, num_captions=2, **more):
        return [[c["text"] for c in r["candidates"]] for r in model.predict(images, num_captions=num_captions,
                                                                             **kwargs, **more)]

    reference = texts(photos)
    assert texts(photos[::-1])[::-1] == reference
    assert [texts([p], batch_size=1)[0] for p in photos] == reference
    assert model.caption(photos, method="sample", seed=0, max_length=8) == [r[0] for r in texts(photos, num_captions=1)]
