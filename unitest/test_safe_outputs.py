"""Issue 10 (data safety) for prediction: concurrent map.json writers, special files, extreme images, bounded reads.

Concurrency and hangs are tested with real processes (a fake numpy model, no TensorFlow, so they start in a
second); the command line with ``python main.py caption`` and the tiny random model. Memory is measured as
the peak RSS (VmHWM) of a subprocess that runs under an address-space limit (the old code needed 10 GB for a
40000x1 image).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.image_captioning import prediction
from models.image_captioning.freshness import file_stamp
from models.image_captioning.prediction import generation_settings, load_map, merge_into_map, predict
from unitest.test_prediction import FakeModel
from utils.clip_preprocessing import MAX_RESIZED_PIXELS, preprocess_image, tf_preprocess
from utils.image_io import ImageReadError, list_images, read_image

ROOT = Path(__file__).resolve().parents[1]

# A captioning process with a fake model (the image's size is its caption); generate is slowed down so that
# concurrent runs interleave. argv: map dir, JSON list of image paths; prints the results as JSON.
FAKE_RUN = textwrap.dedent("""
    import json, sys, time
    from unitest.test_prediction import FakeModel
    from models.image_captioning.prediction import predict

    class Slow(FakeModel):
        def generate(self, embeddings, **kwargs):
            time.sleep(0.02 * len(embeddings))
            return super().generate(embeddings, **kwargs)

    model = Slow()
    results = predict(model, json.loads(sys.argv[2]), batch_size=2, output_dir=sys.argv[1], progress=False)
    print(json.dumps({"results": results, "generated": sum(model.generate_calls)}))
""")


def _images(directory, n, start=0):
    """n PNGs of distinct sizes (caption "<w>x10"); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = directory / f"img_{i:03d}.png"
        Image.new("RGB", (20 + i, 10), (i % 256, 0, 0)).save(path)
        paths.append(str(path))
    return paths


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "-1", **extra}


def _load_no_duplicates(path):
    """map.json parsed, failing on a key that appears twice in the file."""
    def pairs(items):
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys)), f"duplicate keys in {path}"
        return dict(items)
    return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=pairs)


# ------------------------------------------------------------------------------------------ concurrent runs


def test_concurrent_runs_keep_every_result(tmp_path):
    """3 processes write the same map.json at once, A and B on disjoint sets, C overlapping both: the union,
    each image once, none lost. (The old code kept a private copy per process and wrote it whole: the last
    writer erased what the others had written, and every run still succeeded.)"""
    paths = _images(tmp_path / "images", 60)
    sets = [paths[0:25], paths[35:60], paths[15:45]]
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(out), json.dumps(s)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sets]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    stored = _load_no_duplicates(out / "map.json")
    assert set(stored) == {os.path.abspath(p) for p in paths}  # nothing lost
    for path in paths:
        assert stored[os.path.abspath(path)]["caption"] == f"{Image.open(path).width}x10"
    for (stdout, _), images in zip(outputs, sets):
        results = json.loads(stdout)["results"]
        assert [r["image"] for r in results] == images and all(r["error"] is None for r in results)


def test_image_captioned_by_a_concurrent_run_meanwhile_is_not_redone(tmp_path):
    """Another run writes map.json while this one runs: its entries are kept, and the images it captioned
    with the same settings are taken from map.json (not read, not captioned again)."""
    paths = _images(tmp_path / "images", 24)
    out = tmp_path / "out"
    other = FakeModel()
    settings = generation_settings(other, "greedy", {})

    class Racing(FakeModel):
        def generate(self, embeddings, **kwargs):
            if not self.generate_calls:  # at the first batch, a concurrent run stores the last 12 images
                entries = {os.path.abspath(p): {"caption": "by the other run", "candidates": None,
                                                "settings": settings, **file_stamp(p)}
                           for p in paths[12:]}
                entries["/elsewhere/unrelated.jpg"] = {"caption": "kept", "settings": settings}
                merge_into_map(out / "map.json", entries)
            time.sleep(0.05)  # a slow model: reading does not run far ahead
            return super().generate(embeddings, **kwargs)

    model = Racing()
    results = predict(model, paths, batch_size=1, output_dir=out, progress=False)
    stored = load_map(out / "map.json")
    assert stored["/elsewhere/unrelated.jpg"]["caption"] == "kept"  # the other run's entry survives
    assert set(stored) == {os.path.abspath(p) for p in paths} | {"/elsewhere/unrelated.jpg"}
    # read-ahead is bounded by the queues: the last images are not read before the other run's write
    taken = [r for r in results[18:] if r["cached"]]
    assert len(taken) == 6 and all(r["caption"] == "by the other run" for r in taken)
    assert sum(model.generate_calls) <= 18
    assert all(r["error"] is None for r in results)


def test_merge_into_map_keeps_entries_written_meanwhile(tmp_path):
    path = tmp_path / "map.json"
    merge_into_map(path, {"a": {"caption": "1", "settings": {}}})
    merge_into_map(path, {"b": {"caption": "2", "settings": {}}})
    assert load_map(path) == {"a": {"caption": "1", "settings": {}}, "b": {"caption": "2", "settings": {}}}
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------- special files


def _special_files(d):
    """A FIFO, a socket, a link to /dev/zero, a dangling link and a link loop, all named like images."""
    os.mkfifo(d / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket.png"))
    os.symlink("/dev/zero", d / "zero.jpg")
    os.symlink(d / "absent.png", d / "dangling.png")
    os.symlink(d / "loop_b.jpg", d / "loop_a.jpg")
    os.symlink(d / "loop_a.jpg", d / "loop_b.jpg")
    return sock


def test_special_files_in_a_folder_neither_hang_nor_eat_memory(tmp_path):
    """A FIFO named .jpg hung the old run forever (nothing captioned) and /dev/zero read until MemoryError:
    now each special file gets its own error and every good image is captioned, within seconds."""
    d = tmp_path / "images"
    good = _images(d, 3)
    sock = _special_files(d)
    try:
        proc = subprocess.run([sys.executable, "-c", FAKE_RUN, str(tmp_path / "out"), json.dumps([str(d)])],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("captioning a folder holding a FIFO hung")
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    results = {os.path.basename(r["image"]): r for r in json.loads(proc.stdout)["results"]}
    for path in good:
        assert results[os.path.basename(path)]["caption"] == f"{Image.open(path).width}x10"
    assert "FIFO" in results["fifo.jpg"]["error"]
    assert "socket" in results["socket.png"]["error"]
    assert "character device" in results["zero.jpg"]["error"]
    assert "dangling" in results["dangling.png"]["error"]
    assert "loop" in results["loop_a.jpg"]["error"] and "loop" in results["loop_b.jpg"]["error"]


def test_special_files_given_explicitly_get_accurate_errors(tmp_path):
    sock = _special_files(tmp_path)
    try:
        for name, expected in (("fifo.jpg", "FIFO"), ("socket.png", "socket"), ("zero.jpg", "character device"),
                               ("dangling.png", "dangling symbolic link"), ("loop_a.jpg", "symbolic link loop")):
            with pytest.raises(ImageReadError, match=expected):
                read_image(tmp_path / name)
            assert list_images([tmp_path / name]) == [str(tmp_path / name)]  # kept: read_image judges it
    finally:
        sock.close()
    with pytest.raises(ImageReadError, match="no readable image.*FIFO"):
        list_images([str(tmp_path / "*.jpg")])  # a pattern matching special files only


def test_file_size_cap(tmp_path):
    path = _images(tmp_path, 1)[0]
    size = os.path.getsize(path)
    assert read_image(path, max_bytes=size).size == (20, 10)
    with pytest.raises(ImageReadError, match=f"{size} bytes exceeds the limit of {size - 1}"):
        read_image(path, max_bytes=size - 1)
    results = predict(FakeModel(), [path], max_file_bytes=size - 1, save=False, progress=False)
    assert "exceeds the limit" in results[0]["error"]


def test_animated_gif_reads_its_first_frame_only(tmp_path):
    """PIL reads the open file lazily: decoding frame 0 of a 200-frame GIF reads a small part of the file
    (the old code read the whole file into memory first)."""
    from utils import image_io

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (120, 120), dtype=np.uint8)).convert("P") for _ in range(200)]
    path = tmp_path / "many.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=10)
    image = read_image(path)
    assert image.size == (120, 120)
    np.testing.assert_array_equal(np.asarray(image.convert("L")), np.asarray(frames[0].convert("L")))

    class Counting:  # what read_image hands PIL (a binary file object), counting the bytes read
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def read(self, n=-1):
            data = self.f.read(n)
            self.read_bytes += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    with image_io.open_regular_file(path) as f:
        counting = Counting(f)
        decoded = image_io._open_bytes(counting, str(path), None, exif_transpose=True)
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
    assert counting.read_bytes < os.path.getsize(path) / 20, (counting.read_bytes, os.path.getsize(path))


# ------------------------------------------------------------------------------------------ extreme images


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the old code needed 10 GB: MemoryError
    from PIL import Image
    from utils.clip_preprocessing import preprocess_image
    from utils.image_io import read_image
    image = read_image(sys.argv[1])
    try:
        preprocess_image(image, 224)
        outcome = "ok"
    except ValueError as e:
        outcome = "refused: " + str(e)
    except MemoryError:
        outcome = "MemoryError"
    print(outcome)
    # peak RSS of this program in MiB (VmHWM: ru_maxrss would include the parent's peak before exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
""")


@pytest.mark.parametrize("width", [40000, 200000])
def test_extreme_aspect_ratio_memory_is_bounded(tmp_path, width):
    """A 198-byte 40000x1 PNG took 10 GB (resized whole to 8,960,000x224 before the crop); 200000x1 was an
    out-of-memory kill. Now refused with a clear error, peak RSS stays that of the interpreter."""
    path = tmp_path / f"line_{width}.png"
    Image.new("L", (width, 1), 128).save(path)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    outcome, peak_mib = proc.stdout.strip().splitlines()
    assert outcome.startswith(f"refused: a {width}x1 image would be resized to"), outcome
    assert "crop the image first" in outcome
    assert int(peak_mib) < 400, peak_mib


@pytest.mark.parametrize("size", [(4000, 3), (3, 4000), (1000, 999), (1337, 1)])
def test_elongated_images_within_the_bound_are_unchanged(size):
    """Below the bound nothing changes (the OpenAI-identical resize then crop)."""
    from unitest.test_clip_preprocessing import reference

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    np.testing.assert_allclose(preprocess_image(image, 224), reference(image, 224), rtol=0, atol=1e-6)


def test_tf_preprocess_refuses_unbounded_resizes():
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="refused to bound memory"):
        tf_preprocess(np.zeros((1, 40000, 3), np.uint8), 224)
    assert 224 * 224 * 1337 <= MAX_RESIZED_PIXELS < 224 * 224 * 1338


def test_extreme_image_in_a_folder_gets_its_own_error(tmp_path):
    d = tmp_path / "images"
    good = _images(d, 2)
    Image.new("L", (40000, 1)).save(d / "line.png")

    model = FakeModel()
    model.clip.input_resolution = 224  # the real preprocessing at CLIP's size
    results = {os.path.basename(r["image"]): r for r in predict(model, [str(d)], save=False, progress=False)}
    assert "refused to bound memory" in results["line.png"]["error"]
    assert all(results[os.path.basename(p)]["error"] is None for p in good)


# ----------------------------------------------------------------------------------------------- map.json


def test_map_json_that_is_a_fifo_or_too_large_is_refused_not_replaced(tmp_path, monkeypatch):
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "map.json")
    path = _images(tmp_path / "images", 1)[0]
    with pytest.raises(ValueError, match="FIFO"):
        predict(FakeModel(), [path], output_dir=fifo_dir, progress=False)
    assert (fifo_dir / "map.json").is_fifo()  # not replaced by a file
    big = tmp_path / "big"
    merge_into_map(big / "map.json", {"x": {"caption": "y" * 1000}})
    monkeypatch.setattr(prediction, "MAP_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="exceeds the limit of 100 bytes"):
        load_map(big / "map.json", max_bytes=prediction.MAP_MAX_BYTES)


# ------------------------------------------------------------------------------------------- command line


def test_cli_folder_with_special_files_and_explicit_special_paths(tiny_model_dir, tmp_path):
    """``python main.py caption``: a folder holding a FIFO and a /dev/zero link is captioned (exit 1 for the
    special files, each named with its kind), and a FIFO / dangling link / loop named on the command line
    gets its kind, not "no such file"."""
    d = tmp_path / "images"
    good = _images(d, 2)
    os.mkfifo(d / "fifo.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    os.symlink(tmp_path / "absent.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "loop2.jpg", tmp_path / "loop1.jpg")
    os.symlink(tmp_path / "loop1.jpg", tmp_path / "loop2.jpg")
    os.mkfifo(tmp_path / "explicit_fifo.jpg")
    cap = max(os.path.getsize(p) for p in good)  # --max-file-bytes: a larger image is refused alone
    big = tmp_path / "big.png"
    big.write_bytes(open(good[0], "rb").read() + b"\0" * cap)
    argv = [sys.executable, "main.py", "caption", str(d), str(tmp_path / "explicit_fifo.jpg"),
            str(tmp_path / "dangling.jpg"), str(tmp_path / "loop1.jpg"), str(big), "--model", tiny_model_dir,
            "--output-dir", str(tmp_path / "out"), "--no-progress", "--max-file-bytes", str(cap)]
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=_env(IMAGE_CAPTIONING_HOME=str(tmp_path / "home")),
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the command line hung on a FIFO")
    assert proc.returncode == 1, proc.stderr
    captioned = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert captioned == good
    err = proc.stderr
    assert "fifo.jpg is a FIFO" in err and "zero.jpg is a character device" in err
    assert "explicit_fifo.jpg is a FIFO" in err
    assert "dangling.jpg: a dangling symbolic link" in err and "loop1.jpg: a symbolic link loop" in err
    assert f"big.png: {os.path.getsize(big)} bytes exceeds the limit of {cap} bytes" in err
    assert "no such file" not in err
    assert set(load_map(tmp_path / "out" / "map.json")) == {os.path.abspath(p) for p in good}
