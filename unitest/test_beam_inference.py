"""Batch captioning on Apache Beam (models/image_captioning/beam_inference.py, ``main.py batch``).

The tiny ClipCap (`testing.tiny_models`) captions the demo photos and every bad-input kind of the pipeline
tests on the DirectRunner, in process and with two worker processes; the records must be those of
``ClipCap.predict`` for the same model, images, settings and batch size (captions, candidates, scores and
error messages), bad inputs must become records (and dead letters), and a rerun must skip what was done.
"""

import csv
import json
import shutil

import pytest
from PIL import Image

from models.image_captioning import beam_inference
from models.image_captioning.prediction import generation_settings
from testing.tiny_models import DEMO_DIR
from unitest.test_prediction import _jpeg_bytes, image_dir  # noqa: F401 - the pipeline tests' bad inputs

SETTINGS = dict(method="beam", beam_size=3, num_captions=2, max_length=8)
BATCH = 4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_clipcap):
    return tiny_model_dir, tiny_clipcap


@pytest.fixture
def inputs(image_dir, tmp_path):  # noqa: F811
    """The demo photos next to every bad file kind, plus a missing path, an empty folder and an unmatched glob."""
    d, good, bad = image_dir
    for photo in sorted(DEMO_DIR.glob("*.jpg")):
        shutil.copy(photo, d / photo.name)
    return [str(d), str(tmp_path / "missing.jpg"), str(tmp_path / "no_images"), str(tmp_path / "*.webp")]


def _by_key(records):
    return {beam_inference.record_key(str(r["image"])): r for r in records}


def _check_against_predict(records, expected, model):
    """Every record equals predict's result for its image: caption, candidates (tokens decode to the text),
    scores, error message; model name and settings as predict stores them in map.json."""
    settings = generation_settings(model, SETTINGS["method"], {k: v for k, v in SETTINGS.items() if k != "method"})
    got = _by_key(records)
    assert len(got) == len(records), "one record per input"
    assert set(got) == set(expected)
    for key, r in got.items():
        e = expected[key]
        assert r["model"] == "tiny" and r["settings"] == settings, r
        assert r["error"] == e["error"], key
        if e["error"] is not None:
            assert r["caption"] is None and r["candidates"] is None
            continue
        assert r["caption"] == e["caption"]
        assert [c["text"] for c in r["candidates"]] == [c["text"] for c in e["candidates"]]
        assert [c["tokens"] for c in r["candidates"]] == [c["tokens"] for c in e["candidates"]]
        assert [c["score"] for c in r["candidates"]] == pytest.approx([c["score"] for c in e["candidates"]],
                                                                      abs=1e-5)
        for c in r["candidates"]:
            assert all(isinstance(t, int) for t in c["tokens"])
            assert model.tokenizer.decode(c["tokens"]).strip() == c["text"]


def _predict(model, inputs):
    results = model.predict(inputs, batch_size=BATCH, save=False, progress=False, return_candidates=True,
                            **SETTINGS)
    return _by_key(results)


def test_batch_on_two_worker_processes_matches_predict(tiny, inputs, tmp_path):
    """DirectRunner in multi-process mode (two SDK worker processes, each loading the model once) over the
    demo photos and every bad input: predict's records, bad inputs as records and dead letters."""
    model_dir, model = tiny
    expected = _predict(model, inputs)
    assert sum(e["error"] is None for e in expected.values()) == 14  # 9 modes + 5 demo photos
    assert sum(e["error"] is not None for e in expected.values()) == 7
    out = str(tmp_path / "out" / "captions")
    files = beam_inference.run_batch(inputs, str(model_dir), out, method=SETTINGS["method"], batch_size=BATCH,
                                     generate_kwargs={k: v for k, v in SETTINGS.items() if k != "method"},
                                     pipeline_args=["--runner=DirectRunner", "--direct_num_workers=2",
                                                    "--direct_running_mode=multi_processing"])
    assert files == sorted(beam_inference.output_files(out) + beam_inference.output_files(out, "errors"))
    records = beam_inference.read_records(out)
    _check_against_predict(records, expected, model)
    # the dead-letter files hold exactly the error records
    dead = beam_inference.read_records(out, "errors")
    assert sorted(json.dumps(r, sort_keys=True) for r in dead) == sorted(
        json.dumps(r, sort_keys=True) for r in records if r["error"] is not None)
    assert not list((tmp_path / "out").glob("beam-temp*"))  # the sink's temporary files are gone


def test_cli_input_list_skip_existing_and_pipeline_options(tiny, inputs, tmp_path, capsys):
    from main import main

    model_dir, model = tiny
    d = inputs[0]
    listed = sorted(str(p) for p in DEMO_DIR.glob("*.jpg"))[:3]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "image"])
        writer.writerows([[f"photo {i}", p] for i, p in enumerate(listed)] + [["gone", str(tmp_path / "gone.png")]])
    args = ["batch", d, "--input-list", str(tmp_path / "list.csv"), "--model", str(model_dir), "--method", "beam",
            "--beam-size", "3", "--num-captions", "2", "--max-length", "8", "--batch-size", str(BATCH),
            "--no-exif-transpose"]
    first = str(tmp_path / "run1" / "captions")
    # a Beam option this command does not know goes to the pipeline
    assert main(args + ["--output", first, "--num-shards", "2", "--direct_num_workers=1"]) == 1  # bad inputs
    assert len(beam_inference.output_files(first)) == 2
    records = beam_inference.read_records(first)
    expected = model.predict([d, *listed, str(tmp_path / "gone.png")], batch_size=BATCH, save=False,
                             progress=False, return_candidates=True, exif_transpose=False, **SETTINGS)
    by_key = _by_key(records)
    assert len(records) == len(expected)  # the listed photos are not in d: no duplicates
    assert "no such image file" in by_key[str(tmp_path / "gone.png")]["error"]
    rotated = by_key[beam_inference.record_key(f"{d}/rotated.jpg")]
    assert rotated["settings"]["method"] == "beam" and rotated["error"] is None
    assert rotated["caption"] == [r for r in expected if str(r["image"]).endswith("rotated.jpg")][0]["caption"]
    assert "captioned" in capsys.readouterr().err

    # resume: a new photo is captioned, failures are tried again, everything else is skipped
    Image.new("RGB", (51, 52), "orange").save(f"{d}/new.png")
    second = str(tmp_path / "run2" / "captions")
    assert main(args + ["--output", second, "--skip-existing", first]) == 1
    again = _by_key(beam_inference.read_records(second))
    failed = {k for k, r in by_key.items() if r["error"] is not None}
    assert set(again) == failed | {beam_inference.record_key(f"{d}/new.png")}
    assert again[beam_inference.record_key(f"{d}/new.png")]["error"] is None
    # an earlier record counts only when made with the same settings and without error
    settings = by_key[beam_inference.record_key(f"{d}/rotated.jpg")]["settings"]
    line = json.dumps(rotated)
    assert list(beam_inference._done_keys(line, settings)) == [(beam_inference.record_key(f"{d}/rotated.jpg"),
                                                                {"settings": settings, "size": rotated["size"],
                                                                 "sha256": rotated["sha256"]})]
    assert list(beam_inference._done_keys(line, dict(settings, max_length=6))) == []
    assert list(beam_inference._done_keys(json.dumps(dict(rotated, error="x", caption=None)), settings)) == []
    # usage errors
    capsys.readouterr()
    assert main(args + ["--output", first, "--skip-existing", first]) == 2
    assert "output prefix itself" in capsys.readouterr().err
    shards = {p: open(p, "rb").read() for p in beam_inference.output_files(first)}
    assert main(args + ["--output", first]) == 2  # an earlier run's output is not replaced without --overwrite
    assert "already holds the output of an earlier run" in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in beam_inference.output_files(first)} == shards
    assert main(args + ["--output", str(tmp_path / "run3"), "--skip-existing", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit) as exit_info:  # other commands still refuse unknown options
        main(["download", "--direct_num_workers=1"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_handler_refuses_bad_settings_at_construction(tiny):
    model_dir, _ = tiny
    with pytest.raises(TypeError, match="bem_size"):
        beam_inference.ClipCapModelHandler(str(model_dir), method="beam", bem_size=3)
    with pytest.raises(ValueError, match="power of two"):
        beam_inference.ClipCapModelHandler(str(model_dir), batch_size=12)
    with pytest.raises(ValueError, match="method"):
        beam_inference.ClipCapModelHandler(str(model_dir), method="greedy_search")
    handler = beam_inference.ClipCapModelHandler(str(model_dir), batch_size=8)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}


def test_bytes_from_other_file_systems_decode_with_the_path_in_errors(tmp_path):
    """Non-local files are read through Beam and decoded from bytes: same checks, errors name the file."""
    from models.siamese.image_embedding import ImageEmbedder
    from utils.image_io import ImageReadError

    decode_image_bytes = ImageEmbedder(None, 16).read_bytes
    image = decode_image_bytes(_jpeg_bytes((40, 30)), "gs://b/a.jpg")
    assert image.size == (40, 30)
    with pytest.raises(ImageReadError, match=r"^gs://b/e.jpg: empty file"):
        decode_image_bytes(b"", "gs://b/e.jpg")
    with pytest.raises(ImageReadError, match=r"^gs://b/t.jpg: not an image file"):
        decode_image_bytes(b"hello", "gs://b/t.jpg")
    jpeg = _jpeg_bytes((40, 30))
    with pytest.raises(ImageReadError, match=r"^gs://b/h.jpg: cannot decode image \(truncated"):
        decode_image_bytes(jpeg[: len(jpeg) // 2], "gs://b/h.jpg")


def test_reads_from_other_file_systems_are_bounded(tmp_path):
    """A non-local file larger than the cap is refused from its metadata or while reading, never read whole."""
    from types import SimpleNamespace

    from models.siamese.image_embedding import ImageEmbedder
    from utils.image_io import ImageReadError

    data = _jpeg_bytes((40, 30))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)

    def readable(size):
        return SimpleNamespace(metadata=SimpleNamespace(path="gs://b/a.jpg", size_in_bytes=size),
                               open=lambda: open(path, "rb"))

    whole, capped = ImageEmbedder(None, 16, max_bytes=len(data)), ImageEmbedder(None, 16, max_bytes=len(data) - 1)
    assert beam_inference.load_pixels(readable(len(data)), whole).shape == (16, 16, 3)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        beam_inference.load_pixels(readable(len(data)), capped)
    with pytest.raises(ImageReadError, match="more than"):  # a size the metadata does not tell
        beam_inference.load_pixels(readable(None), capped)


class _Stop(Exception):
    pass


def test_a_killed_jobs_sink_folders_are_removed_by_the_next_job_and_a_live_job_is_not_disturbed(tmp_path,
                                                                                              monkeypatch):
    """A batch killed with SIGKILL leaves Beam's ``beam-temp-<prefix>-<uuid>`` folders; the next job on that prefix
    removes them (only those: another prefix's, or a folder of another shape, stay); a second job on a prefix
    that a live job holds is refused."""
    import uuid

    from utils.file_utils import UnsafePathError, file_lock

    out = tmp_path / "out" / "captions"
    out.parent.mkdir()
    stale = out.parent / f"beam-temp-captions-{uuid.uuid1().hex}"  # what the sink of a killed job left
    stale.mkdir()
    (stale / f"{uuid.uuid4()}.jsonl").write_text('{"image": "a.jpg"}\n')
    keep = [out.parent / f"beam-temp-other-{uuid.uuid1().hex}", out.parent / "beam-temp-captions-notes",
            out.parent / f"beam-temp-captions-{uuid.uuid1().hex}"]
    for k in keep:
        k.mkdir()
    (keep[2] / "sub").mkdir()  # not the sink's flat layout
    seen = {}

    def pipeline_stub(*args, **kwargs):
        seen["stale"] = stale.exists()
        raise _Stop

    monkeypatch.setattr(beam_inference, "caption_pipeline", pipeline_stub)
    with file_lock(out):  # a live job on this prefix, named as a path or as a file:// URL
        for prefix in (str(out), f"file://{out}"):
            with pytest.raises(UnsafePathError, match="another batch job"):
                beam_inference.run_batch(["x.jpg"], "model", prefix)
    assert stale.exists()
    with pytest.raises(_Stop):
        beam_inference.run_batch(["x.jpg"], "model", str(out))
    assert seen == {"stale": False}
    assert all(k.exists() for k in keep)
    assert not (out.parent / "captions.lock").exists()


def test_an_output_prefix_whose_folder_cannot_be_written_is_refused_before_the_job(tmp_path, monkeypatch):
    """A local prefix under a regular file, or on a file system that takes no files: `UnsafePathError` (a
    ValueError: exit 2 in ``batch``) naming the prefix, before the lock or the pipeline (before: the lock
    file's FileExistsError / FileNotFoundError). A remote prefix is left to its file system."""
    from utils.file_utils import UnsafePathError

    def pipeline_stub(*args, **kwargs):
        raise AssertionError("the pipeline was built")

    monkeypatch.setattr(beam_inference, "caption_pipeline", pipeline_stub)
    (tmp_path / "afile").write_text("x")
    for output in (tmp_path / "afile" / "captions", "/proc/captions", f"file://{tmp_path}/afile/captions"):
        with pytest.raises(UnsafePathError, match=f"output prefix {output}: cannot write into"):
            beam_inference.run_batch(["x.jpg"], "model", str(output))
    assert (tmp_path / "afile").read_text() == "x"
    assert beam_inference.check_output_prefix("gs://bucket/out/captions") is None
    assert beam_inference.check_output_prefix(str(tmp_path / "new" / "captions")) is None  # made by the job


def test_one_reading_stage_serves_batch_captioning_and_extraction(tmp_path):
    """Beam captioning and Beam extraction read and preprocess through one DoFn: a good image -> its
    ``(path, size, sha256)`` key and pixels, a bad one -> ``(path, message)`` on the errors output."""
    import hashlib
    from types import SimpleNamespace

    from datasets import beam_extraction

    assert beam_extraction.ReadAndPreprocess is beam_inference.ReadAndPreprocess
    data = _jpeg_bytes((40, 30))
    good, bad = tmp_path / "a.jpg", tmp_path / "b.jpg"
    good.write_bytes(data)
    bad.write_bytes(b"not an image")

    def readable(path):
        return SimpleNamespace(metadata=SimpleNamespace(path=str(path), size_in_bytes=path.stat().st_size),
                               open=lambda: open(path, "rb"))

    stage = beam_inference.ReadAndPreprocess(16)
    ((key, pixels),) = stage.process(readable(good))
    assert key == (str(good), len(data), hashlib.sha256(data).hexdigest()) and pixels.shape == (16, 16, 3)
    (error,) = stage.process(readable(bad))
    assert error.tag == beam_inference.ERRORS and error.value[0] == str(bad) and error.value[1]


def test_an_input_list_that_cannot_be_read_is_named_before_the_job(tmp_path):
    """A missing ``--input-list`` was an OSError traceback from Beam's reader (exit 1), a CSV list whose header is
    not UTF-8 a bare UnicodeDecodeError; both are ValueErrors naming the list (``batch``: exit 2)."""
    from models.image_captioning.beam_inference import list_file_column

    for missing in (tmp_path / "missing.txt", tmp_path / "missing.csv"):
        with pytest.raises(ValueError, match=f"--input-list {missing}: no such file"):
            list_file_column(str(missing))
    binary = tmp_path / "photos.csv"
    binary.write_bytes(b"\xff\xfe\x00image\n")
    with pytest.raises(ValueError, match=f"--input-list {binary}: cannot read its CSV header .UnicodeDecodeError"):
        list_file_column(str(binary))
    good = tmp_path / "good.csv"
    good.write_text("id,path\n1,a.jpg\n")
    assert list_file_column(str(good)) == (1, True)
    (tmp_path / "plain.txt").write_text("a.jpg\n")
    assert list_file_column(str(tmp_path / "plain.txt")) == (None, False)
