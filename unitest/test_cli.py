"""main.py: --help, exit codes (0 / 1 / 2 / 3), stdout, stderr and map.json, against the tiny offline model."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("isolated_home")  # conftest: a per-test model store, offline


def _run(capsys, *argv):
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_complete():
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("caption", "convert", "download", "export", "train", "extract", "evaluate", "IMAGE_CAPTIONING_MIRROR",
                 "IMAGE_CAPTIONING_OFFLINE", "exit codes"):
        assert word in result.stdout, word
    parser = main.build_parser()
    caption_help = parser._subparsers._group_actions[0].choices["caption"].format_help()
    for option in ("--model", "--method", "--beam-size", "--batch-size", "--max-length", "--json", "--output-dir",
                   "--overwrite", "--temperature", "--top-k", "--top-p", "--seed", "--num-captions"):
        assert option in caption_help, option
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # every option's default, once
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text, name
        assert not re.search(r"\(default: [^)]*\) \(default:", text), name


@pytest.mark.parametrize("argv", [["caption"], ["caption", "x.jpg", "--method", "best"], ["nothing"],
                                  ["caption", "x.jpg", "--batch-size", "many"], []])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(argv)
    assert info.value.code == 2


def test_unknown_model_exits_2(capsys):
    code, out, err = _run(capsys, "caption", ROOT / "demo", "--model", "no_such_model")
    assert code == 2 and "unknown model 'no_such_model'" in err and out == ""


def test_caption_demo_then_rerun(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "outputs"
    code, out, err = _run(capsys, "caption", ROOT / "demo", "--model", tiny_model_dir, "--output-dir", out_dir,
                          "--max-length", 6, "--batch-size", 2, "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    demo = sorted(str(p) for p in (ROOT / "demo").rglob("*") if p.suffix in (".jpg", ".png"))  # photos, screenshot
    assert [line.split("\t")[0] for line in lines] == demo
    assert all(line.split("\t")[1] for line in lines)
    stored = json.loads((out_dir / "map.json").read_text())
    assert sorted(stored) == [os.path.abspath(p) for p in demo]
    identity = json.loads((Path(tiny_model_dir) / "metadata.json").read_text())["identity"]
    assert stored[os.path.abspath(demo[0])]["settings"] == {"model": "tiny", "model_identity": identity,
                                                          "method": "greedy", "exif_transpose": True, "max_length": 6}
    # a rerun reads map.json: same captions, as JSON
    code, out2, _ = _run(capsys, "caption", ROOT / "demo", "--model", tiny_model_dir, "--output-dir", out_dir,
                         "--max-length", 6, "--json", "--no-progress")
    results = json.loads(out2)
    assert code == 0 and [r["cached"] for r in results] == [True] * len(demo)
    assert [f"{r['image']}\t{r['caption']}" for r in results] == lines
    assert all(r["candidates"][0]["text"] == r["caption"] for r in results)


def test_failed_inputs_exit_1_and_are_listed(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jpg").write_bytes(b"")
    shutil.copy(ROOT / "demo" / "cat.jpg", tmp_path / "cat.jpg")
    code, out, err = _run(capsys, "caption", tmp_path / "cat.jpg", tmp_path / "empty.jpg", tmp_path / "missing.png",
                          "--model", tiny_model_dir, "--method", "beam", "--beam-size", 2, "--max-length", 5,
                          "--no-save", "--no-progress")
    assert code == 1
    assert out.splitlines()[0].startswith(f"{tmp_path / 'cat.jpg'}\t") and len(out.splitlines()) == 1
    assert f"error: {tmp_path / 'empty.jpg'}: " in err and "empty file" in err
    missing = [line for line in err.splitlines() if str(tmp_path / "missing.png") in line]
    assert len(missing) == 1 and missing[0].startswith("error: ") and missing[0].count("missing.png") == 1
    assert "2 of 3 inputs could not be captioned" in err
    assert not (tmp_path / "home").exists()  # --no-save


def test_convert_then_caption(tiny_files, tmp_path, capsys):
    files = tiny_files
    code, out, err = _run(capsys, "convert", files["checkpoint"], "--clip", files["clip"], "--tokenizer",
                          files["tokenizer"], "--name", "converted")
    assert code == 0, err
    saved = tmp_path / "home" / "converted"
    assert out.strip() == str(saved) and (saved / "config.json").is_file()
    code, out, err = _run(capsys, "caption", ROOT / "demo" / "cat.jpg", "--model", "converted", "--max-length", 4,
                          "--no-progress")
    assert code == 0, err
    assert (tmp_path / "home" / ".outputs" / "converted" / "map.json").is_file()  # not inside the model's folder
    config = json.loads((saved / "config.json").read_text())
    assert config["model"]["config"]["normalize_prefix"] is False  # the MLP kind's default (the backbone's)
    code, out, err = _run(capsys, "convert", files["checkpoint"], "--clip", files["clip"], "--tokenizer",
                          files["tokenizer"], "--name", "normalised", "--normalize-prefix")
    assert code == 0, err
    normalised = json.loads((tmp_path / "home" / "normalised" / "config.json").read_text())
    assert normalised["model"]["config"]["normalize_prefix"] is True


def test_convert_bad_checkpoint_exits_3(tiny_files, tmp_path, capsys):
    files = tiny_files
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(files["checkpoint"].read_bytes()[:5000])
    code, out, err = _run(capsys, "convert", truncated, "--clip", files["clip"], "--tokenizer", files["tokenizer"],
                          "--name", "broken")
    assert code == 3 and "truncated.pt" in err and out == ""
    code, out, err = _run(capsys, "convert", files["clip"], "--clip", files["clip"], "--tokenizer",
                          files["tokenizer"], "--name", "wrong_kind")
    assert code == 3 and "ClipCap" in err


def test_download_list_and_offline(tmp_path, capsys):
    code, out, _ = _run(capsys, "download", "--list")
    assert code == 0 and "coco_weights.pt" in out and "ViT-B-32.pt" in out
    code, out, err = _run(capsys, "download", "coco")
    assert code == 3 and str(tmp_path / "home" / "downloads" / "coco_weights.pt") in err
    code, _, err = _run(capsys, "caption", ROOT / "demo", "--model", "coco")
    assert code == 3 and "IMAGE_CAPTIONING_OFFLINE=1" in err
    code, _, err = _run(capsys, "download", "cocoa")
    assert code == 2 and "unknown name" in err


@pytest.mark.parametrize("options", [["--method", "greedy", "--top-k", "5"], ["--method", "beam", "--beam-size", "0"],
                                     ["--temperature", "nan"], ["--seed", str(2**40)], ["--max-length", "0"]])
def test_bad_decoding_options_fail_before_the_model_is_loaded(options, capsys, monkeypatch):
    """A wrong option is a usage error at once, not after loading (and compiling) a model."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(main, "model_or_exit_code", never)
    code, out, err = _run(capsys, "caption", ROOT / "demo", "--model", "coco", *options)
    assert code == 2 and out == "" and err.startswith("error: ")


# ------------------------------------------------------------------- outputs that cannot be written, odd inputs


def _no_model_load(monkeypatch):
    """Make loading a model fail the test: what is refused must be refused before the (costly) load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(main, "model_or_exit_code", refuse)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                    where):
    (tmp_path / "notes").write_text("mine")
    output = tmp_path / "notes" if where == "file" else tmp_path / "notes" / "out"
    _no_model_load(monkeypatch)
    code, out, err = _run(capsys, "caption", ROOT / "demo" / "cat.jpg", "--model", tiny_model_dir, "--output-dir",
                          output, "--no-progress")
    assert code == 2 and out == "" and f"cannot write into {output}: {tmp_path / 'notes'} is a regular file" in err
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_failed_map_write_prints_every_result_then_the_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The disk is full when map.json is written: the captions are printed all the same, then the error (exit 1)."""
    import errno

    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("map.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    images = [ROOT / "demo" / "cat.jpg", ROOT / "demo" / "coffee.jpg"]
    code, out, err = _run(capsys, *["caption", *images], "--model", tiny_model_dir, "--output-dir", tmp_path / "out",
                          "--max-length", 4, "--no-progress")
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in images]
    assert f"cannot write {tmp_path / 'out' / 'map.json'}: [Errno 28] No space left on device; 2 captions" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no temporary file (nor lock) left


def test_a_non_utf8_file_name_is_captioned_printed_and_found_again(tiny_model_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in (b"a.jpg", b"caf\xe9.jpg", b"z.jpg"):
        shutil.copy(ROOT / "demo" / "cat.jpg", os.path.join(os.fsencode(folder), name))
    common = ("--model", tiny_model_dir, "--output-dir", tmp_path / "out", "--max-length", 4, "--no-progress")
    code, out, err = _run(capsys, "caption", folder, *common)
    assert code == 0, err
    out.encode("utf-8")  # valid UTF-8: the undecodable byte is written as \xe9
    assert [line.split("\t")[0] for line in out.splitlines()] == [f"{folder}/a.jpg", f"{folder}/caf\\xe9.jpg",
                                                                  f"{folder}/z.jpg"]
    _no_model_load(monkeypatch)  # the rerun is answered from map.json alone
    code, out, err = _run(capsys, "caption", folder, *common, "--json")
    assert code == 0, err
    results = json.loads(out.encode("utf-8").decode("utf-8"))
    assert [os.fsencode(r["image"]) for r in results] == [os.path.join(os.fsencode(folder), name)
                                                          for name in (b"a.jpg", b"caf\xe9.jpg", b"z.jpg")]
    assert [r["cached"] for r in results] == [True] * 3
    (tmp_path / "out" / "map.json").read_bytes().decode("utf-8")


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"/x.jpg": "a cat"}', "link"])
def test_a_malformed_map_json_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                content):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if content == "link":
        (tmp_path / "elsewhere.json").write_text("{}")
        (out_dir / "map.json").symlink_to(tmp_path / "elsewhere.json")
    else:
        (out_dir / "map.json").write_text(content)
    _no_model_load(monkeypatch)
    code, out, err = _run(capsys, "caption", ROOT / "demo" / "cat.jpg", "--model", tiny_model_dir, "--output-dir",
                          out_dir, "--no-progress")
    assert code == 2 and out == "" and f"{out_dir / 'map.json'} is not a readable map.json" in err
    assert (out_dir / "map.json").is_symlink() if content == "link" else (out_dir / "map.json").read_text() == content


@pytest.mark.parametrize("case", ["deep", "dtype_function", "dtype_name", "foreign_class"])
def test_a_malformed_config_is_refused_with_exit_3_naming_it(tiny_model_dir, tmp_path, capsys, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    if case == "deep":
        text = json.dumps(config)[:-1] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        inner = config["model"]["config"]
        if case == "dtype_function":
            inner["dtype"] = {"class_name": "function", "module": "os", "config": "getcwd", "registered_name": None}
        elif case == "dtype_name":
            inner["dtype"] = "int8"
        else:
            inner["mapper"]["module"] = "os"
        text = json.dumps(config)
    (model / "config.json").write_text(text)
    code, out, err = _run(capsys, "caption", ROOT / "demo" / "cat.jpg", "--model", model, "--no-save", "--no-progress",
                          "--max-length", 3)
    assert code == 3 and out == "" and str(model / "config.json") in err, err
    assert {"deep": "nested more than 64 levels", "dtype_function": "model.config.dtype is",
            "dtype_name": "model.config.dtype is", "foreign_class": "names 'os'"}[case] in err


@pytest.mark.parametrize("module, argv, requirements", [
    ("gradio", ["serve", "--model", "coco"], "requirements-serve.txt"),
    ("apache_beam", ["batch", "x.jpg", "--model", "coco", "--output", "out/captions"], "requirements-beam.txt"),
    ("apache_beam", ["extract", "captions.csv", "--clip", "ViT-B/32", "--output", "emb.npz", "--runner",
                     "DirectRunner"],
     "requirements-beam.txt"),
    ("torch", ["export", "coco", "my.pt"], None),
])
def test_missing_optional_dependency_names_its_requirements_file(module, argv, requirements, capsys, monkeypatch):
    """serve / batch / extract --runner without their optional dependency: exit 2 naming the file to install,
    before any model or data is looked at."""
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    code, out, err = _run(capsys, *argv)
    assert code == 2, err
    if requirements is None:  # a package, not a requirements file
        assert f"needs {module}, which is not installed: pip install" in err and out == ""
        return
    assert f"pip install -r {requirements}" in err and out == ""
    assert (ROOT / requirements).is_file()


def test_requirements_split():
    """A user's install (requirements.txt) has no torch, torchvision, OpenAI's clip or transformers (the tests'
    references), nor the optional extras; the test install includes every extra."""
    def names(filename):
        lines = (ROOT / filename).read_text().splitlines()
        return {re.split(r"[<>=\[ ;#]", line.strip())[0].lower() for line in lines if line.strip()
                and not line.lstrip().startswith("#")}

    user = names("requirements.txt")
    assert not user & {"torch", "torchvision", "clip-anytorch", "transformers", "gradio", "apache-beam", "jupyter"}
    assert {"torch", "transformers", "clip-anytorch"} <= names("requirements-test.txt")
    text = (ROOT / "requirements-test.txt").read_text()
    for extra in ("requirements-serve.txt", "requirements-beam.txt", "requirements-notebook.txt"):
        assert f"-r {extra}" in text


@pytest.mark.parametrize("options, message", [(["--rerank", "clip"], "rerank"), (["--method", "beam", "--beam-size", "0"], "beam_size"),
                                              (["--magic-k", "3"], "magic_k")])
def test_batch_refuses_bad_decoding_options_before_the_job(options, message, capsys):
    """Checked in the launching process (the model is not even looked up), not on the job's workers."""
    code, out, err = _run(capsys, "batch", "x.jpg", "--model", "no_such_model", "--output", "out/captions",
                          "--method", "greedy", *options)
    assert code == 2 and message in err and "unknown model" not in err


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_batch_refuses_an_output_prefix_it_cannot_write_before_the_job(where, tiny_model_dir, tmp_path, capsys):
    """A local --output whose folder cannot be written (a regular file on the way, a special file system): an
    error line and exit 2 before the model is looked at or an input read, as caption --output-dir (before: a
    traceback from the prefix's lock file, exit 1)."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    output = blocker / "captions" if where == "under a file" else Path("/proc/captions")
    code, out, err = _run(capsys, "batch", ROOT / "demo" / "cat.jpg", "--model", tiny_model_dir, "--output", output)
    assert code == 2 and out == "", err
    assert err.startswith(f"error: output prefix {output}: cannot write into") and len(err.splitlines()) == 1, err
    code, _, err = _run(capsys, "batch", "x.jpg", "--model", "no_such_model", "--output", output)
    assert code == 2 and "unknown model" not in err  # checked before the model is looked up
    assert blocker.read_text() == "not a folder" and not Path(f"{output}.lock").exists()


def test_batch_model_that_cannot_be_loaded_is_exit_3(tiny_model_dir, tmp_path, capsys):
    """A --model folder that is no saved model, or a saved model whose CLIP is damaged: what the launching
    process reads of it fails as caption's load does, 'error: cannot load model ...' and exit 3 (before: a
    traceback and exit 1, or exit 2)."""
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    damaged = tmp_path / "damaged"  # its name and identity readable, its CLIP's config gone
    (damaged / "clip").mkdir(parents=True)
    for name in ("config.json", "metadata.json"):
        shutil.copy(Path(tiny_model_dir) / name, damaged / name)
    for model in (empty, damaged):
        code, out, err = _run(capsys, "batch", ROOT / "demo" / "cat.jpg", "--model", model,
                              "--output", tmp_path / "out" / "captions")
        assert code == 3 and out == "", err
        assert err.startswith(f"error: cannot load model {str(model)!r}: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before the job: nothing written
