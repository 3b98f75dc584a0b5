"""Issue 10, names and outputs: a model name can never reach outside the model store, a folder the library did
not write is never deleted or replaced, saved files follow the umask, and the CLI's smaller cases (damaged
saved configs exit 3 naming the file and key, Ctrl-C while loading exits 130, escaped output lines, the path
once in error lines). The CLI cases run ``main.py`` in a real subprocess with a temporary model store."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from utils.file_utils import UnsafePathError

ROOT = Path(__file__).resolve().parents[1]


def _env(home, **extra):
    env = dict(os.environ, IMAGE_CAPTIONING_HOME=str(home), IMAGE_CAPTIONING_OFFLINE="1", CUDA_VISIBLE_DEVICES="-1",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


def _cli(home, *argv, timeout=240):
    return subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=ROOT, env=_env(home),
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(root):
    """{relative path: bytes or None for folders} of everything under root."""
    root = Path(root)
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _convert_args(files, *extra):
    return ("convert", files["checkpoint"], "--clip", files["clip"], "--tokenizer", files["tokenizer"], *extra)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["", "..", "VICTIM", "../../x", ".", "a/b"])
def test_convert_refuses_names_that_are_not_plain(name, tiny_files, tmp_path):
    """`convert --name` with "", "..", an existing folder's path or "../../x": exit 2 before any work, and
    the store, its parent, the folder and its files are intact (today: deleted or written outside)."""
    parent = tmp_path / "parent"
    home = parent / "store"
    (home / "keepme").mkdir(parents=True)
    (home / "keepme" / "data.txt").write_text("precious")
    (parent / "sibling.txt").write_text("also precious")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    before = _snapshot(tmp_path)
    result = _cli(home, *_convert_args(tiny_files, "--name", str(victim) if name == "VICTIM" else name))
    assert result.returncode == 2, result.stderr
    assert "invalid model name" in result.stderr and "Traceback" not in result.stderr
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/tmp/x", "a b"])
def test_api_names_are_checked_before_any_work(name, tiny_clipcap, tiny_files, tmp_path, monkeypatch):
    from models.image_captioning.clip_cap import ClipCap
    from utils.model_store import model_dir, saved_model_dir

    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(home))
    (home / "keepme").mkdir(parents=True)
    with pytest.raises(ValueError, match="invalid model name"):
        saved_model_dir(name)
    with pytest.raises(ValueError, match="invalid model name"):
        ClipCap.from_pretrained(tiny_files["checkpoint"], tokenizer=str(tiny_files["tokenizer"]), name=name)
    if "/" not in name:  # a string with a separator is a directory, not a name
        with pytest.raises(ValueError, match="invalid model name"):
            model_dir(name)
        with pytest.raises(ValueError, match="invalid model name"):
            tiny_clipcap.save(name)
    assert sorted(p.name for p in home.iterdir()) == ["keepme"]


def test_a_saved_config_name_that_is_not_plain_is_not_used(tiny_model_dir, tmp_path):
    """A config.json whose name is "../x" must not decide where save/predict write."""
    from models.image_captioning.clip_cap import ClipCap

    copy = tmp_path / "copied"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, name="../../escape")))
    assert ClipCap.load(copy).name == "copied"


# ------------------------------------------------------------------------------------- replacing folders


def test_convert_output_without_name_replaces_only_a_saved_model_with_overwrite(tiny_files, tiny_model_dir,
                                                                                  tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "my_model"
    shutil.copytree(tiny_model_dir, out)
    (out / "stale.txt").write_text("a user's file")  # not one the format writes: never deleted, even with --overwrite
    result = _cli(home, *_convert_args(tiny_files, "--output", out, "--overwrite"))
    assert result.returncode == 2 and "stale.txt" in result.stderr, result.stderr
    assert (out / "stale.txt").exists()
    (out / "stale.txt").unlink()
    result = _cli(home, *_convert_args(tiny_files, "--output", out))
    assert result.returncode == 2 and "--overwrite" in result.stderr, result.stderr
    old_umask = os.umask(0o027)
    try:
        result = _cli(home, *_convert_args(tiny_files, "--output", out, "--overwrite"))
    finally:
        os.umask(old_umask)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["name"] == "my_model"  # the folder's name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o750}, modes
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o640}, modes


@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_convert_output_never_replaces_what_is_not_ours(kind, tiny_files, tmp_path):
    home = tmp_path / "home"
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    target = {"folder": user, "file": user / "notes.txt", "symlink": tmp_path / "link"}[kind]
    if kind == "symlink":
        target.symlink_to(user)
    before = _snapshot(tmp_path)
    result = _cli(home, *_convert_args(tiny_files, "--output", target, "--overwrite"))
    assert result.returncode == 2 and "not a folder written by this library" in result.stderr, result.stderr
    assert _snapshot(tmp_path) == before


def test_save_into_a_user_folder_is_refused_and_ours_needs_overwrite(tiny_clipcap, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("1,2,3")
    with pytest.raises(UnsafePathError, match="not a folder written by this library"):
        tiny_clipcap.save(user, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["data.csv"]
    saved = tiny_clipcap.save(tmp_path / "saved")
    with pytest.raises(UnsafePathError, match="overwrite"):
        tiny_clipcap.save(saved)
    tiny_clipcap.save(saved, overwrite=True)
    assert ClipCap.load(saved).name == tiny_clipcap.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "user"]  # no staging or old copy left


def test_clip_save_refuses_a_user_folder(tiny_clipcap, tmp_path):
    from models.siamese.clip import CLIP, is_saved_clip

    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UnsafePathError):
        tiny_clipcap.clip.save(str(user), overwrite=True)
    assert [p.name for p in user.iterdir()] == ["photo.jpg"]
    saved = tiny_clipcap.clip.save(str(tmp_path / "clip"))
    assert is_saved_clip(saved) and CLIP.load(saved).embed_dim == tiny_clipcap.clip.embed_dim
    tiny_clipcap.clip.save(saved, overwrite=True)


def test_convert_model_respects_the_umask(tiny_files, tmp_path):
    """The converted folder was mkdtemp's 0700: it gets the umask's permissions like any folder."""
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model

    old_umask = os.umask(0o022)
    try:
        convert_model(ClipCap, tiny_files["checkpoint"], tiny_files["clip"], tiny_files["tokenizer"], tmp_path / "m")
    finally:
        os.umask(old_umask)
    paths = [tmp_path / "m", *(tmp_path / "m").rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o644}


# ---------------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def tiny_trainer_parts(tmp_path_factory):
    from custom_train_objects.model_factory import build_clipcap_for_training
    from datasets.synthetic_shapes import train_shapes_tokenizer
    from hparams.training import TrainingHParams

    tokenizer = train_shapes_tokenizer(tmp_path_factory.mktemp("tok"))
    hp = TrainingHParams(batch_size=2, epochs=1, prefix_length=2, log_every=1)
    model = build_clipcap_for_training(hp, prefix_size=8, tokenizer=tokenizer, name="t",
                                       gpt2_config=dict(n_positions=16, n_embd=16, n_layer=1, n_head=1))
    return model, hp


def _trainer(parts, output_dir):
    from custom_train_objects.trainer import Trainer
    from loggers.training_loggers import LoggerList

    model, hp = parts
    trainer = Trainer(model, hp, output_dir, loggers=LoggerList([]), progress=False, keep_checkpoints=1)
    trainer._build(steps_per_epoch=1)
    trainer.max_length = 4
    return trainer


def test_trainer_replaces_and_deletes_only_its_own_folders(tiny_trainer_parts, tmp_path):
    from custom_train_objects.trainer import is_checkpoint

    trainer = _trainer(tiny_trainer_parts, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "ckpt-000000000").mkdir(parents=True)  # named like a checkpoint, but a user's folder
    (checkpoints / "ckpt-000000000" / "keep.txt").write_text("mine")
    (checkpoints / ".ckpt-000000001.tmp").mkdir()  # another run's staging folder (today: a fixed name)
    (checkpoints / ".ckpt-000000001.tmp" / "busy").write_text("being written")
    for step in (1, 2, 3):
        trainer._save_checkpoint(1, 0, step)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".ckpt-000000001.tmp", "ckpt-000000000",
                                                             "ckpt-000000003"]
    assert (checkpoints / "ckpt-000000000" / "keep.txt").read_text() == "mine"
    assert (checkpoints / ".ckpt-000000001.tmp" / "busy").exists()
    assert is_checkpoint(checkpoints / "ckpt-000000003") and trainer.latest_checkpoint().name == "ckpt-000000003"

    user_model = tmp_path / "run" / "model"
    user_model.mkdir()
    (user_model / "report.pdf").write_bytes(b"%PDF")
    with pytest.raises(UnsafePathError):
        trainer.finalize()
    assert [p.name for p in user_model.iterdir()] == ["report.pdf"]
    (user_model / "report.pdf").unlink()
    trainer.finalize()  # an empty folder, then the previous run's saved model: replaced
    trainer.finalize()
    assert (user_model / "config.json").is_file()


# ------------------------------------------------------------------------------------------ other outputs


def test_extract_output_never_overwrites_a_user_file(tmp_path):
    from datasets.caption_dataset import CaptionDataset
    from datasets.embeddings import ExtractionResult, check_embedded_output, save_embedded_dataset

    user = tmp_path / "important.npz"
    user.write_bytes(b"not ours")
    dataset = CaptionDataset(images=["a.jpg"], image_ids=["a.jpg"], captions=["a cat."], image_index=np.array([0]),
                             name="d")
    result = ExtractionResult(indices=np.array([0]), embeddings=np.ones((1, 4), np.float32), failed={})
    with pytest.raises(UnsafePathError, match="not an embeddings file"):
        save_embedded_dataset(user, dataset, result)
    assert user.read_bytes() == b"not ours"
    path = save_embedded_dataset(tmp_path / "emb.npz", dataset, result)
    check_embedded_output(path)  # its own output may be replaced
    save_embedded_dataset(path, dataset, result)
    result_cli = _cli(tmp_path / "home", "extract", tmp_path / "captions.csv", "--clip", "ViT-B/32", "--output", user)
    assert result_cli.returncode == 2 and "not an embeddings file" in result_cli.stderr, result_cli.stderr
    assert user.read_bytes() == b"not ours"


def test_private_writes_use_the_umask_and_unique_temporaries(tmp_path):
    """Temporary files of another writer (today's fixed names) are neither clobbered nor renamed away."""
    from datasets.coco import write_coco_results
    from hparams.training import TrainingHParams
    from loggers.training_loggers import CSVLogger

    others = [tmp_path / "hparams.json.tmp", tmp_path / ".results.json.tmp", tmp_path / "logs" / ".steps.csv.tmp"]
    for path in others:
        path.parent.mkdir(exist_ok=True)
        path.write_text("another writer's file")
    old_umask = os.umask(0o027)
    try:
        TrainingHParams().save(tmp_path / "hparams.json")
        write_coco_results([{"image_id": 1, "caption": "a."}], tmp_path / "results.json")
        CSVLogger(tmp_path / "logs").log_step(1, {"loss": 1.0})
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "hparams.json", tmp_path / "results.json", tmp_path / "logs" / "steps.csv"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert all(path.read_text() == "another writer's file" for path in others)
    assert sorted(p.name for p in tmp_path.rglob(".*")) == [".results.json.tmp", ".steps.csv.tmp"]


# ------------------------------------------------------------------------------------------- load errors


def test_saved_config_missing_a_key_exits_3_naming_file_and_key(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["model"]["config"]["mapper"]  # the backbone's mapper
    (broken / "config.json").write_text(json.dumps(config))
    result = _cli(tmp_path / "home", "caption", ROOT / "demo" / "cat.jpg", "--model", broken, "--no-save",
                  "--no-progress")
    assert result.returncode == 3, result.stderr
    assert str(broken / "config.json") in result.stderr and "'mapper'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("filename", ["model.weights.h5", "clip/model.weights.h5"])
def test_damaged_weights_name_the_file(filename, tiny_model_dir, tmp_path):
    from models.image_captioning.clip_cap import ClipCap
    from utils.convert.common import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / filename).read_bytes()
    (broken / filename).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(broken / filename)):
        ClipCap.load(broken)


def test_ctrl_c_while_loading_the_model_exits_130_without_traceback(tiny_model_dir, tmp_path):
    """SIGINT once main.py logs "loading model" (today: a KeyboardInterrupt traceback, exit -2). Many images,
    so that the run is still going if loading ends before the signal lands (then captioning is interrupted:
    exit 130 as well)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        shutil.copy(ROOT / "demo" / "cat.jpg", images / f"{i}.jpg")
    process = subprocess.Popen([sys.executable, "main.py", "-v", "caption", str(images), "--model",
                                str(tiny_model_dir), "--no-save", "--no-progress", "--batch-size", "1"], cwd=ROOT,
                               env=_env(tmp_path / "home"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True,  # a default SIGINT disposition even if ours is ignored (nohup, &)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.monotonic() + 180
    for line in process.stderr:  # the model is being loaded once this line is logged
        seen.append(line)
        if "loading model" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = "".join(seen) + err
    assert process.returncode == 130, err
    assert "error: interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err


# ------------------------------------------------------------------------------------------ output lines


def test_paths_with_newline_and_tab_are_escaped_and_errors_name_the_path_once(tiny_model_dir, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    odd = images / "a\nb\tc\\d.jpg"
    shutil.copy(ROOT / "demo" / "cat.jpg", odd)
    empty = images / "empty\n.jpg"
    empty.write_bytes(b"")
    result = _cli(tmp_path / "home", "caption", odd, empty, "--model", tiny_model_dir, "--max-length", 4,
                  "--no-save", "--no-progress")
    assert result.returncode == 1, result.stderr
    escaped = str(images) + "/a\\nb\\tc\\\\d.jpg"
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0] == escaped and len(lines[0].split("\t")) == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    escaped_empty = str(images) + "/empty\\n.jpg"
    assert len(errors) == 1 and errors[0].count(escaped_empty) == 1, result.stderr
    assert not errors[0].startswith(f"error: {escaped_empty}: {escaped_empty}")


def test_escape_field_is_reversible():
    import re

    from main import escape_field

    text = "a\\nb\n\t\r\\"
    escaped = escape_field(text)
    assert "\n" not in escaped and "\t" not in escaped
    undo = {"\\\\": "\\", "\\n": "\n", "\\t": "\t", "\\r": "\r"}
    assert re.sub(r"\\[\\ntr]", lambda m: undo[m.group()], escaped) == text


def test_train_name_must_be_plain(tmp_path):
    result = _cli(tmp_path / "home", "train", tmp_path / "train.npz", "--output", tmp_path / "run", "--name", "..",
                  "--gpt2-config", "{}")
    assert result.returncode == 2 and "invalid model name '..'" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
