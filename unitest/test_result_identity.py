"""Issue 22, items 4-6: cached captions bound to what made them.

- keyed by the model's identity (`models.image_captioning.identity`), not its name: two models saved in
  folders of the same name (``a/model``, ``b/model``) never answer for each other, in ``caption`` (map.json,
  `cached_answers`) nor in ``batch --skip-existing``;
- one freshness rule (`models.image_captioning.freshness`: same size and SHA-256) for map.json and batch: an
  image rewritten with its size and modification time kept is captioned again by both;
- results live outside the model's folder (``<store>/.outputs/<name>``): ``convert --overwrite`` keeps them,
  and those an earlier version left in ``<store>/<name>/outputs`` are moved out, never lost.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import main
from models.image_captioning import beam_inference
from models.image_captioning.cached_answers import answers_from_map
from models.image_captioning.clip_cap import ClipCap
from models.image_captioning.identity import compute_identity, recorded_identity
from testing.tiny_models import shared_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = sorted(str(p) for p in (ROOT / "demo").glob("*.jpg"))[:2]
DECODING = ["--max-length", "5", "--batch-size", "2"]


pytestmark = pytest.mark.usefixtures("isolated_home")  # conftest: a per-test model store, offline


@pytest.fixture(scope="module")
def same_name_models(tmp_path_factory):
    """Two different tiny models (ClipCap seeds 0 and 1) saved as ``a/model`` and ``b/model``, both named
    "model" (as the trainer's ``runs/a/model`` and ``runs/b/model`` are)."""
    root = tmp_path_factory.mktemp("runs")
    folders = []
    for seed, run in ((0, "a"), (1, "b")):
        model = ClipCap.load(str(shared_tiny_model(tmp_path_factory, seed=seed)))
        model.name = None  # named after its folder when loaded: "model"
        folders.append(Path(model.save(root / run / "model")))
    return folders


def _caption(capsys, model_dir, images, *options):
    code = main.main(["caption", *map(str, images), "--model", str(model_dir), "--json", "--no-progress", *DECODING,
                      *[str(o) for o in options]])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_identity_recorded_at_save_is_the_loaded_models(same_name_models, tiny_model_dir):
    a, b = same_name_models
    loaded = ClipCap.load(str(a))
    assert loaded.name == "model" and ClipCap.load(str(b)).name == "model"
    assert recorded_identity(a) == loaded.identity == compute_identity(loaded)  # read, and recomputed alike
    assert recorded_identity(a) != recorded_identity(b)
    assert recorded_identity(a) == recorded_identity(tiny_model_dir)  # the same weights saved again

    # parts that change captions change it: another CLIP, normalize_prefix, weights changed in memory
    assert ClipCap.load(str(a), clip=ClipCap.load(str(b)).clip).identity == recorded_identity(a)  # same CLIP
    loaded.clip = None
    assert loaded.identity != recorded_identity(a)
    loaded = ClipCap.load(str(a))
    loaded.normalize_prefix = True
    assert loaded.identity != recorded_identity(a)
    loaded.normalize_prefix = False
    assert loaded.identity == recorded_identity(a)
    bias = loaded.mapper.weights[-1]
    bias.assign(bias + 1.0)
    loaded.forget_identity()  # what the trainer does when it writes trained values into the model
    assert loaded.identity != recorded_identity(a)


def test_model_built_in_memory_gets_its_identity_from_its_weights(tiny_files):
    """Never saved (from_pretrained without a name): computed from the weights, each time it is asked."""
    from models.siamese.clip import CLIP

    clip = CLIP.from_pretrained(str(tiny_files["clip"]), visual_only=True)
    model = ClipCap.from_pretrained(str(tiny_files["checkpoint"]), clip=clip, tokenizer=str(tiny_files["tokenizer"]))
    before = model.identity
    assert before.startswith("sha256:") and before == compute_identity(model)
    bias = model.mapper.weights[-1]
    bias.assign(bias * 2.0 + 1.0)
    assert model.identity != before  # no recorded identity: the change is seen


def test_models_sharing_a_folder_name_do_not_answer_for_each_other(same_name_models, tmp_path, capsys):
    a, b = same_name_models
    out = tmp_path / "out"
    first = _caption(capsys, a, DEMO, "--output-dir", out)
    assert not any(r["cached"] for r in first)
    own = _caption(capsys, b, DEMO, "--no-save")  # what b says
    second = _caption(capsys, b, DEMO, "--output-dir", out)
    assert not any(r["cached"] for r in second)  # before: a's captions, marked cached
    assert [r["caption"] for r in second] == [r["caption"] for r in own]
    assert answers_from_map(b, DEMO, output_dir=out, max_length=5) is not None  # b's own entries now answer
    assert answers_from_map(a, DEMO, output_dir=out, max_length=5) is None  # a's were replaced
    stored = json.loads((out / "map.json").read_text())
    assert {e["settings"]["model"] for e in stored.values()} == {"model"}  # the name kept for display
    assert {e["settings"]["model_identity"] for e in stored.values()} == {recorded_identity(b)}


def test_folder_without_a_recorded_identity_gets_one_computed(same_name_models, tmp_path, capsys):
    """A folder saved before identities were recorded: no answer without the model; loading computes it."""
    old = tmp_path / "old" / "model"
    shutil.copytree(same_name_models[0], old)
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["identity"]
    (old / "metadata.json").write_text(json.dumps(metadata))
    assert recorded_identity(old) is None
    assert ClipCap.load(str(old)).identity == recorded_identity(same_name_models[0])
    out = tmp_path / "out"
    _caption(capsys, old, DEMO[:1], "--output-dir", out)
    assert answers_from_map(old, DEMO[:1], output_dir=out, max_length=5) is None  # needs the model
    assert _caption(capsys, old, DEMO[:1], "--output-dir", out)[0]["cached"]  # which finds its entries
    settings = beam_inference.batch_settings(old, "greedy", {"max_length": 5})
    assert settings["model_identity"] == recorded_identity(same_name_models[0])


def _batch(model_dir, images, output, skip=()):
    beam_inference.run_batch(images, str(model_dir), str(output), generate_kwargs={"max_length": 5}, batch_size=2,
                             skip_existing=[str(s) for s in skip], pipeline_args=["--runner=DirectRunner"])
    return {beam_inference.record_key(r["image"]): r for r in beam_inference.read_records(str(output))}


def test_batch_skip_existing_with_another_model_of_the_same_name_captions_everything(same_name_models, tmp_path):
    a, b = same_name_models
    first = _batch(a, DEMO, tmp_path / "run1" / "captions")
    assert len(first) == 2 and all(r["error"] is None for r in first.values())
    second = _batch(b, DEMO, tmp_path / "run2" / "captions", skip=[tmp_path / "run1" / "captions"])
    assert set(second) == set(first)  # before: nothing captioned (same name, same settings)
    assert {r["settings"]["model_identity"] for r in second.values()} == {recorded_identity(b)}
    third = _batch(b, DEMO, tmp_path / "run3" / "captions", skip=[tmp_path / "run2" / "captions"])
    assert third == {}  # b's own records, same bytes: skipped


def _rewrite_keeping_size_and_mtime(path, colour):
    st = os.stat(path)
    Image.new("RGB", (40, 30), colour).save(path, "BMP")  # BMP: same dimensions, same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_changed_bytes_with_size_and_mtime_kept_are_captioned_again_by_both_paths(tiny_model_dir, tmp_path,
                                                                                    capsys):
    images = tmp_path / "images"
    images.mkdir()
    photo = images / "photo.bmp"
    Image.new("RGB", (40, 30), "red").save(photo, "BMP")
    out = tmp_path / "out"
    _caption(capsys, tiny_model_dir, [photo], "--output-dir", out)
    assert _caption(capsys, tiny_model_dir, [photo], "--output-dir", out)[0]["cached"]
    records = _batch(tiny_model_dir, [str(photo)], tmp_path / "run1" / "captions")
    assert _batch(tiny_model_dir, [str(photo)], tmp_path / "run2" / "captions",
                  skip=[tmp_path / "run1" / "captions"]) == {}  # unchanged: skipped

    _rewrite_keeping_size_and_mtime(photo, "blue")
    assert answers_from_map(tiny_model_dir, [str(photo)], output_dir=out, max_length=5) is None
    assert not _caption(capsys, tiny_model_dir, [photo], "--output-dir", out)[0]["cached"]  # map.json: again
    again = _batch(tiny_model_dir, [str(photo)], tmp_path / "run3" / "captions", skip=[tmp_path / "run1" / "captions"])
    assert set(again) == set(records)  # batch: again too (before: skipped)
    assert again[str(photo)]["sha256"] != records[str(photo)]["sha256"]
    assert json.loads((out / "map.json").read_text())[str(photo)]["sha256"] == again[str(photo)]["sha256"]


def _convert(capsys, files, name, *options):
    code = main.main(["convert", str(files["checkpoint"]), "--clip", str(files["clip"]), "--tokenizer",
                      str(files["tokenizer"]), "--name", name, *options])
    out, err = capsys.readouterr()
    assert code == 0, err


def test_convert_overwrite_keeps_the_captions_made_with_the_model(tiny_files, tmp_path, capsys):
    home = tmp_path / "home"
    _convert(capsys, tiny_files, "x")
    first = _caption(capsys, "x", DEMO)
    [results] = home.rglob("map.json")  # wherever the default puts it (before: <store>/x/outputs/map.json)
    assert results == home / ".outputs" / "x" / "map.json" and not (home / "x" / "outputs").exists()
    _convert(capsys, tiny_files, "x", "--overwrite")
    assert sorted(json.loads(results.read_text())) == sorted(os.path.abspath(p) for p in DEMO)  # before: deleted
    again = _caption(capsys, "x", DEMO)  # the same checkpoint converted again: the same identity
    assert all(r["cached"] for r in again) and [r["caption"] for r in again] == [r["caption"] for r in first]
    # the store's listing is unchanged: .outputs is no model (a name cannot start with ".")
    assert main.main(["caption", DEMO[0], "--model", ".outputs", "--no-save"]) == 2
    capsys.readouterr()


def test_results_left_inside_a_model_folder_are_moved_out_never_lost(tiny_files, tmp_path, capsys):
    home = tmp_path / "home"
    _convert(capsys, tiny_files, "x")
    legacy = home / "x" / "outputs"
    legacy.mkdir()
    old_entries = {"/photos/old.jpg": {"caption": "an old caption", "settings": {"model": "x"}}}
    (legacy / "map.json").write_text(json.dumps(old_entries))
    (legacy / "map.json.unsaved-7-0.json").write_text(json.dumps({"/photos/lost.jpg": {"caption": "kept"}}))
    _convert(capsys, tiny_files, "x", "--overwrite")  # moved before the folder is replaced
    moved = home / ".outputs" / "x"
    assert json.loads((moved / "map.json").read_text()) == old_entries
    assert (moved / "map.json.unsaved-7-0.json").is_file()

    # a run that finds an old map.json next to a new one merges them (the new one's entries win)
    legacy.mkdir()
    (legacy / "map.json").write_text(json.dumps({"/photos/older.jpg": {"caption": "older", "settings": {}},
                                                 "/photos/old.jpg": {"caption": "superseded", "settings": {}}}))
    _caption(capsys, "x", DEMO[:1])
    merged = json.loads((moved / "map.json").read_text())
    assert merged["/photos/older.jpg"]["caption"] == "older" and merged["/photos/old.jpg"] == old_entries[
        "/photos/old.jpg"]
    assert os.path.abspath(DEMO[0]) in merged and not (legacy / "map.json").exists()
