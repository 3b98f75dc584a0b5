"""A script or notebook that uses the library sees nothing but its own output: no absl banner, oneDNN,
cudart_stub or cuInit line at import, and no E-level line when a compiled program is reloaded from the
persistent XLA cache (`utils.compile_cache`; what those lines mean: `utils.tf_startup`). A level the user set
is kept, and the cache is never shared between kinds of CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing import tiny_models
from utils import compile_cache
from utils.tf_startup import filtered_stderr, is_hidden_at, quiet_environment

ROOT = Path(__file__).resolve().parents[1]

#: a user's script: import (both models), load, caption enough images one at a time to compile (jit_compile="auto" compiles
#: a shape at its second call), print the captions
SCRIPT = """
from models.image_captioning import ClipCap
from models.siamese import CLIP
model = ClipCap.load({model!r})
images = [{demo!r} + "/" + name for name in ("cat.jpg", "coffee.jpg", "rocket.jpg")]
results = model.predict(images, batch_size=1, max_length=5, save=False, progress=False)
print("captions:", len(results))
"""


def _user_env(home, **extra):
    """A user's shell: no log level or XLA flags from the test session."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS", "IMAGE_CAPTIONING_XLA_CACHE_DIR")}
    env.update(IMAGE_CAPTIONING_HOME=str(home), IMAGE_CAPTIONING_OFFLINE="1", **extra)
    return env


def _python(code, env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_import_keeps_a_level_the_user_set(tmp_path):
    done = _python("import models.image_captioning.clip_cap", _user_env(tmp_path, TF_CPP_MIN_LOG_LEVEL="0"))
    assert done.returncode == 0, done.stderr
    assert "absl::InitializeLog" in done.stderr  # level 0: TensorFlow's own lines, as the user asked


def test_script_prints_nothing_at_import_nor_reusing_the_compile_cache(tmp_path_factory, tmp_path):
    """Two runs of a user's script: the first compiles (stderr empty: no start-up lines), the second loads the
    compiled programs (no new entry) and prints no E-level line."""
    model = str(tiny_models.shared_tiny_model(tmp_path_factory))
    env = _user_env(tmp_path / "home")
    code = SCRIPT.format(model=model, demo=str(ROOT / "demo"))
    first = _python(code, env)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "home" / "xla_cache"
    written = sorted(p.name for p in folder.rglob("xla_compile_cache__*.pb"))
    assert written  # something was compiled, so the second run loads it
    second = _python(code, env)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in folder.rglob("xla_compile_cache__*.pb")) == written  # loaded, not recompiled
    for run in (first, second):
        assert run.stdout == "captions: 3\n"
        assert run.stderr == ""


def test_hidden_lines_follow_the_level():
    info = "I0000 00:00:1796441851.016308    7253 cudart_stub.cc:31] Could not find cuda drivers"
    error = "E0000 00:00:1796441975.715746    9374 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result."
    banner = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
    assert [is_hidden_at(info, level) for level in range(4)] == [False, True, True, True]
    assert [is_hidden_at(error, level) for level in range(4)] == [False, False, False, True]
    assert [is_hidden_at(banner, level) for level in range(4)] == [False, False, True, True]
    assert not is_hidden_at("a Python warning", 3)


def test_filtered_stderr_keeps_what_the_level_shows(capfd):
    with filtered_stderr(level=2):
        os.write(2, b"I0000 00:00:1.5    7 port.cc:153] oneDNN\nE0000 00:00:1.5    7 x.cc:1] real error\nmine\n")
    assert capfd.readouterr().err == "E0000 00:00:1.5    7 x.cc:1] real error\nmine\n"


@pytest.mark.parametrize("verbose, expected", [(False, "3"), (True, "0")])
def test_quiet_environment_sets_a_level_only_when_unset(monkeypatch, verbose, expected):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert quiet_environment(verbose) and os.environ["TF_CPP_MIN_LOG_LEVEL"] == expected
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    assert not quiet_environment(verbose) and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_cache_key_differs_by_cpu_features(monkeypatch):
    """A program compiled for AVX-512 must never be loaded on an AVX2-only CPU (XLA only logs the mismatch)."""
    monkeypatch.setattr(compile_cache, "_cpu_flags", lambda: "avx avx2 fma sse4_2")
    avx2 = compile_cache.cache_key()
    monkeypatch.setattr(compile_cache, "_cpu_flags", lambda: "avx avx2 avx512f avx512_bf16 fma sse4_2")
    avx512 = compile_cache.cache_key()
    assert avx2 != avx512 and compile_cache.cache_dir("/s").name == avx512
    monkeypatch.setattr(compile_cache, "_cpu_flags", lambda: "avx avx2 fma sse4_2")
    assert compile_cache.cache_key() == avx2  # the same CPU, the same folder
