"""Time to first caption, without timings (those are in benchmarks/bench_cold_start.py): a default run prints
none of TensorFlow's C++ log lines, compiled programs persist in the model store across processes, and the
cache can be shown and cleared (only our files)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main
from testing import tiny_models
from utils import compile_cache
from utils.file_utils import UnsafePathError
from utils.tf_startup import is_log_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(tiny_models.shared_tiny_model(tmp_path_factory))


def _clean_env(home, **extra):
    """The environment of a user's shell: no test-session log level, no inherited XLA flags."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS", "IMAGE_CAPTIONING_XLA_CACHE_DIR")}
    env.update(IMAGE_CAPTIONING_HOME=str(home), IMAGE_CAPTIONING_OFFLINE="1", **extra)
    return env


def _caption(env, model, *global_options, images=("cat.jpg",), options=()):
    """``main.py [global options] caption demo/IMAGES --model MODEL [options]`` in a fresh process."""
    return subprocess.run([sys.executable, "main.py", *global_options, "caption",
                           *(str(ROOT / "demo" / name) for name in images), "--model", model, "--max-length", "5",
                           "--no-save", "--no-progress", *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


#: a run long enough to compile (more than two batches: `predict` compiles at its first batch; a one-image
#: run compiles nothing under jit_compile="auto")
LONG_RUN = dict(images=("cat.jpg", "coffee.jpg", "rocket.jpg"), options=("--batch-size", "1"))


def _entries(folder):
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("xla_compile_cache__*.pb")}


def test_quiet_run_then_warm_cache_in_a_second_process(tiny_model, tmp_path):
    """Process 1 (default; a run long enough to compile): no C++ log line on stderr, and it writes compiled programs to
    <store>/xla_cache/<key>. Process 2 (--verbose: TensorFlow's lines kept): the same call adds no program and
    rewrites none (it loaded them)."""
    home = tmp_path / "home"
    env = _clean_env(home)
    first = _caption(env, tiny_model, **LONG_RUN)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(str(ROOT / "demo" / "cat.jpg") + "\t")
    noise = [line for line in first.stderr.splitlines() if is_log_line(line) or "absl" in line]
    assert noise == [], first.stderr
    folders = list((home / "xla_cache").iterdir())
    assert len(folders) == 1 and compile_cache.is_cache_root(home / "xla_cache")
    key = folders[0].name
    written = _entries(folders[0])
    assert len(written) >= 2, written  # at least the CLIP encoder and the decoder

    second = _caption(env, tiny_model, "--verbose", **LONG_RUN)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert any(is_log_line(line) for line in second.stderr.splitlines())  # --verbose keeps TensorFlow's lines
    assert [p.name for p in (home / "xla_cache").iterdir()] == [key]
    assert _entries(home / "xla_cache" / key) == written  # nothing compiled anew, nothing rewritten


def test_cache_opt_out_and_user_flags(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)  # as in a process that has not imported it yet
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    for name in ("TF_XLA_FLAGS", "IMAGE_CAPTIONING_XLA_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGE_CAPTIONING_XLA_CACHE", "0")
    assert compile_cache.enable() is None and "TF_XLA_FLAGS" not in os.environ
    monkeypatch.delenv("IMAGE_CAPTIONING_XLA_CACHE")
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    directory = compile_cache.enable()
    assert directory == tmp_path / "home" / "xla_cache" / compile_cache.cache_key()
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory={directory}"
    assert not (tmp_path / "home").exists()  # nothing created until TensorFlow writes an entry
    # a child process with another store: our inherited flag is replaced, the user's flags kept
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "other"))
    child = compile_cache.enable()
    assert child == tmp_path / "other" / "xla_cache" / compile_cache.cache_key()
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory={child}"
    # the user's own cache directory is never replaced
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/mine")
    assert compile_cache.enable() == Path("/mine")
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/mine"


def test_cache_key_holds_the_compiler_flags_but_not_the_caches_own(monkeypatch):
    """TensorFlow's cache loads an entry compiled under other XLA flags (an uncapped AVX-512 program in a process
    capped at AVX2, seen with TensorFlow 2.21): the flags must change our key folder, the cache's own flags not."""
    for name in ("XLA_FLAGS", "TF_XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    plain = compile_cache.cache_key()
    monkeypatch.setenv("TF_XLA_FLAGS", f"--tf_xla_persistent_cache_directory=/somewhere {compile_cache.READ_ONLY_FLAG}")
    assert compile_cache.cache_key() == plain
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    capped = compile_cache.cache_key()
    assert capped != plain
    monkeypatch.setenv("XLA_FLAGS", " --xla_cpu_max_isa=AVX2  ")  # the same flags, spaced otherwise
    assert compile_cache.cache_key() == capped
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert compile_cache.cache_key() not in (plain, capped)
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    assert compile_cache.cache_key() != plain


def test_cache_command_clears_only_our_files(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(home))
    key_dir = home / "xla_cache" / "0123456789abcdef"
    key_dir.mkdir(parents=True)
    (key_dir / "xla_compile_cache__1__2__XLA_CPU_JIT.pb").write_bytes(b"x" * 1000)
    assert main.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(home / "xla_cache") in out and "0123456789abcdef: 1 programs" in out
    assert main.main(["cache", "--clear"]) == 0
    assert list((home / "xla_cache").iterdir()) == []
    # a file that is not a cache entry: refused, nothing changed
    key_dir.mkdir()
    (key_dir / "xla_compile_cache__1__2__XLA_CPU_JIT.pb").write_bytes(b"x")
    (home / "xla_cache" / "notes.txt").write_text("mine")
    assert main.main(["cache", "--clear"]) == 2
    assert "cannot clear" in capsys.readouterr().err
    assert (home / "xla_cache" / "notes.txt").read_text() == "mine" and key_dir.is_dir()
    with pytest.raises(UnsafePathError):
        compile_cache.clear()
    # a symbolic link in place of the cache is never followed nor replaced
    (home / "xla_cache" / "notes.txt").unlink()
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.rename(home / "xla_cache", tmp_path / "moved")
    os.symlink(target, home / "xla_cache")
    assert main.main(["cache", "--clear"]) == 2 and os.path.islink(home / "xla_cache")


def _break_weights(model_dir):
    """Zero every file of a saved model but config.json and metadata.json (its name and identity, all that an
    answer from map.json reads), keeping each file's size and modification time (the identity's fingerprint:
    a file visibly changed is not trusted, `identity.recorded_identity`): any attempt to load it fails."""
    for path in Path(model_dir).rglob("*"):
        if path.is_file() and path.relative_to(model_dir).as_posix() not in ("config.json", "metadata.json"):
            st = path.stat()
            path.write_bytes(b"\0" * st.st_size)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rerun_answers_from_map_without_loading_the_model(tiny_model, tmp_path, monkeypatch, capsys):
    """Every input in map.json with the same settings: answered from it, the (broken) model never loaded; a
    changed setting or a new image needs the model (which then fails to load: exit 3)."""
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "copy"
    shutil.copytree(tiny_model, model_dir)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("cat.jpg", "rocket.jpg"):
        shutil.copy(ROOT / "demo" / name, images / name)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the demo images\n\n{images / 'cat.jpg'}\n  {images / 'rocket.jpg'}  \n")
    argv = ["caption", "--from-file", str(listing), "--model", str(model_dir), "--output-dir", str(tmp_path / "out"),
            "--method", "beam", "--beam-size", "2", "--max-length", "5", "--no-progress"]
    assert main.main(argv) == 0
    first = capsys.readouterr().out
    assert len(first.splitlines()) == 2
    _break_weights(model_dir)

    assert main.main(argv) == 0  # from map.json: the broken files were never read
    out, err = capsys.readouterr()
    assert out == first and err == ""
    assert main.main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["cached"] for r in results] == [True, True]
    assert all(r["candidates"][0]["tokens"] for r in results)

    for changed in (["--max-length", "4"], ["--beam-size", "3"], ["--no-exif-transpose"],
                    [str(ROOT / "demo" / "cat.jpg")]):
        assert main.main([*argv, *changed]) == 3, changed  # needs the model, which cannot load
        assert "cannot load model" in capsys.readouterr().err
    os.utime(images / "cat.jpg", ns=(1, 1))  # touched, same bytes: still answered (freshness is by content)
    assert main.main(argv) == 0
    capsys.readouterr()
    shutil.copy(ROOT / "demo" / "coffee.jpg", images / "cat.jpg")  # other bytes since: captioned again
    assert main.main(argv) == 3
    capsys.readouterr()


def test_max_file_bytes_holds_when_every_input_is_answered_from_map(tiny_model, tmp_path, monkeypatch, capsys):
    """--max-file-bytes refuses a larger file whether or not its neighbours need the model: map.json does not
    answer for it (before: answered when every input was in map.json, refused when one was not)."""
    from models.image_captioning.cached_answers import answers_from_map

    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    image, out = tmp_path / "cat.jpg", tmp_path / "out"
    shutil.copy(ROOT / "demo" / "cat.jpg", image)
    argv = ["caption", str(image), "--model", tiny_model, "--output-dir", str(out), "--max-length", "5",
            "--no-progress"]
    assert main.main(argv) == 0
    capsys.readouterr()
    size = image.stat().st_size
    for limit in (size, None):  # within the limit, or none: answered from map.json
        assert answers_from_map(tiny_model, [str(image)], output_dir=out, max_length=5, max_file_bytes=limit)
    assert answers_from_map(tiny_model, [str(image)], output_dir=out, max_length=5, max_file_bytes=size - 1) is None
    assert main.main([*argv, "--max-file-bytes", str(size - 1)]) == 1  # predict refuses it, as for a new image
    assert f"{size} bytes exceeds the limit of {size - 1} bytes" in capsys.readouterr().err


def test_status_lines_on_stderr_only(tiny_model, tmp_path, monkeypatch, capsys):
    """A default caption run says what it waits for (loading, each compilation) on stderr; stdout keeps only the
    results (also with --json); --no-progress silences the status lines. One image compiles nothing (the
    stages run uncompiled: `custom_architectures.compile_policy`), so it says "compiling" nowhere; a run of
    more than two batches compiles at its first batch and says so."""
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    argv = ["caption", str(ROOT / "demo" / "cat.jpg"), "--model", tiny_model, "--max-length", "3", "--no-save"]
    assert main.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["caption"] is not None  # stdout: the JSON alone
    lines = err.splitlines()
    assert f"loading {tiny_model} ..." in lines, err
    assert not any("compiling" in line or " ready in " in line for line in lines), err
    images = [str(ROOT / "demo" / name) for name in ("cat.jpg", "rocket.jpg", "coffee.jpg")]
    long_run = ["caption", *images, "--model", tiny_model, "--max-length", "3", "--no-save", "--batch-size", "1"]
    assert main.main([*long_run, "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 3
    lines = err.splitlines()
    for expected in ("compiling the CLIP encoder for batch 1 ...",
                     "compiling the decoder for batch 1 (greedy, max_length=3) ..."):
        assert expected in lines, err
    assert any(line.startswith("the decoder for batch 1 (greedy, max_length=3) ready in ") for line in lines), err
    assert main.main([*argv, "--no-progress"]) == 0
    assert main.main([*long_run, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# -------------------------------------------------- lean import: Keras without its optional pandas / pyplot

_OPTIONAL = ("pandas", "matplotlib", "matplotlib.pyplot", "IPython")


def _run_python(code, env=None):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lean_import_keeps_keras_optional_libraries_out_and_they_stay_importable():
    """A plain TensorFlow import pulls in pandas and pyplot through Keras (the control: the libraries are
    installed, so the lean import has something to keep out); the lean one imports none of them, Keras's
    DataFrame support is off for that process, and each library still imports afterwards."""
    probe = ("import sys, json; from utils.tf_startup import import_tensorflow; import_tensorflow(lean={lean}); "
             "from keras.src.trainers.data_adapters import array_slicing; "
             f"seen = sorted(m for m in {_OPTIONAL!r} if m in sys.modules); "
             "keras_pandas = array_slicing.pandas is not None; "
             "import pandas, matplotlib.pyplot, IPython; "
             "print(json.dumps([seen, keras_pandas, pandas.__name__, matplotlib.pyplot.__name__]))")
    plain = _run_python(probe.format(lean=False))
    assert {"pandas", "matplotlib.pyplot"} <= set(plain[0]) and plain[1] is True
    lean = _run_python(probe.format(lean=True))
    assert lean == [[], False, "pandas", "matplotlib.pyplot"]


def test_modules_absent_marks_only_what_is_not_imported_and_unmarks_it():
    from utils.tf_startup import modules_absent

    json_module = sys.modules["json"]
    with modules_absent(["json", "image_captioning_not_a_module"]) as marked:
        assert marked == ["image_captioning_not_a_module"]
        with pytest.raises(ImportError):
            import image_captioning_not_a_module  # noqa: F401
        import json as again  # already imported: untouched
        assert again is json_module
    assert "image_captioning_not_a_module" not in sys.modules  # importable (or not) as before
    with pytest.raises(ModuleNotFoundError, match="No module named"):
        import image_captioning_not_a_module  # noqa: F401,F811


def test_caption_command_imports_neither_pandas_nor_pyplot(tiny_model, tmp_path):
    """`main.py caption` from start to captions: none of Keras' optional libraries loaded."""
    args = ["caption", str(ROOT / "demo" / "cat.jpg"), "--model", tiny_model, "--max-length", "3", "--no-save",
            "--no-progress"]
    code = ("import sys, json, contextlib, io; import main; "
            f"out = io.StringIO(); rc = None\n"
            f"with contextlib.redirect_stdout(out): rc = main.main({args!r})\n"
            f"print(json.dumps([rc, sorted(m for m in {_OPTIONAL!r} if m in sys.modules), out.getvalue()]))")
    rc, seen, printed = _run_python(code, env=_clean_env(tmp_path / "home"))
    assert rc == 0 and printed.strip(), printed
    assert seen == []


def test_torchvision_and_transformers_torch_models_after_the_library_do_not_crash():
    """triton (pulled in by torchvision and transformers' PyTorch models) loaded after TensorFlow segfaults
    the process (exit -11 without `keep_triton_out`); after `models` it is marked absent: torch runs without
    it. Already imported triton is left alone."""
    code = ("import json, sys, warnings; from models.image_captioning import ClipCap; import tensorflow; "
            "import torch, torchvision, transformers; "
            "m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)); "
            "out = m(torch.tensor([[1, 2]])).logits.shape; "
            "r = torchvision.models.resnet18().eval()(torch.zeros(1, 3, 32, 32)).shape; "
            "print(json.dumps([list(out), list(r), sys.modules['triton'] is None]))")
    assert _run_python(code) == [[1, 2, 50257], [1, 1000], True]
    from utils.tf_startup import keep_triton_out

    assert "triton" in sys.modules  # conftest imported torchvision (and triton) first
    kept = sys.modules["triton"]
    assert keep_triton_out() is False and sys.modules["triton"] is kept


def test_a_cache_that_cannot_be_written_is_read_only_with_a_warning(tmp_path, monkeypatch, caplog):
    """A full store (statvfs: no space) or one that is no folder: TensorFlow is told to only read the cache,
    with a warning, instead of failing the first compiled call (ResourceExhaustedError, a .tmp left)."""
    import collections

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)  # as in a process that has not imported it yet
    for name in ("TF_XLA_FLAGS", "IMAGE_CAPTIONING_XLA_CACHE_DIR", "IMAGE_CAPTIONING_XLA_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    Stat = collections.namedtuple("Stat", "f_bavail f_frsize")
    monkeypatch.setattr(os, "statvfs", lambda path: Stat(0, 4096))
    with caplog.at_level("WARNING", logger="utils.compile_cache"):
        directory = compile_cache.enable()
    assert os.environ["TF_XLA_FLAGS"].split() == [f"--tf_xla_persistent_cache_directory={directory}",
                                                  compile_cache.READ_ONLY_FLAG]
    assert "cannot be written" in caplog.text and "no space left" in caplog.text
    assert not (tmp_path / "home").exists()


def test_captions_with_a_store_that_cannot_be_written(tiny_model, tmp_path):
    """The model store is a file (so is a full disk, `test_a_cache_that_cannot_be_written_is_read_only...`): a
    run that compiles captions all the same, with one warning, and writes nothing there."""
    (tmp_path / "store").write_text("not a folder")
    result = _caption(_clean_env(tmp_path / "store"), tiny_model, **LONG_RUN)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr.count("the compile cache cannot be written") == 1, result.stderr
    assert (tmp_path / "store").read_text() == "not a folder"


def test_tensorflows_cache_temporaries_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """A process killed while TensorFlow wrote a cache entry (or whose write failed on a full disk) leaves
    ``<entry>.pb<host>-<thread>-<pid>-<time>.tmp`` in our key folder; the next process's `enable` removes it.
    A live process's, another machine's, and anything that is not such a temporary stay."""
    import socket
    import subprocess

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    for name in ("TF_XLA_FLAGS", "IMAGE_CAPTIONING_XLA_CACHE_DIR", "IMAGE_CAPTIONING_XLA_CACHE"):
        monkeypatch.delenv(name, raising=False)
    key_dir = tmp_path / "home" / "xla_cache" / compile_cache.cache_key()
    key_dir.mkdir(parents=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    host, entry = socket.gethostname(), "xla_compile_cache__57423201__28653714__XLA_CPU_JIT"
    stale = key_dir / f"{entry}.pb{host}-e9ef46e003d73e2b-{dead}-661daae5ac8d5.tmp"
    kept = [key_dir / f"{entry}.pb{host}-e9ef46e003d73e2b-{os.getppid()}-661daae5ac8d5.tmp",  # alive
            key_dir / f"{entry}.pbelsewhere-e9ef46e003d73e2b-{dead}-661daae5ac8d5.tmp",  # another machine's
            key_dir / f"{entry}.pb"]
    for path in [stale, *kept]:
        path.write_bytes(b"")
    assert compile_cache.enable() == key_dir
    assert not stale.exists() and all(p.exists() for p in kept)
