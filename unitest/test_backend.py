"""Keras' backend is chosen in one place (`custom_layers/__init__.py`) and only TensorFlow is accepted."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code, **env):
    full = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    full.pop("KERAS_BACKEND", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full,
                          timeout=300)


def test_one_place_sets_the_backend():
    needle = "setdefault(" + '"KERAS_BACKEND"'  # built, so this file does not match itself
    hits = sorted(str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
                  if not any(part in (".git", "venv", ".venv") for part in path.parts)
                  and needle in path.read_text(encoding="utf-8"))
    assert hits == ["custom_layers/__init__.py"], hits


def test_every_package_imports_the_backend_first():
    for package in ("custom_architectures", "utils", "models", "datasets", "custom_train_objects", "hparams",
                    "loggers", "testing", "benchmarks", "unitest"):
        text = (ROOT / package / "__init__.py").read_text(encoding="utf-8")
        code = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert code and code[0].startswith("import custom_layers"), package


def test_tensorflow_is_chosen_over_a_keras_json(tmp_path):
    (tmp_path / ".keras").mkdir()
    (tmp_path / ".keras" / "keras.json").write_text('{"backend": "jax"}')
    result = _run("import utils.weights_io, keras; print(keras.backend.backend())", KERAS_HOME=str(tmp_path / ".keras"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "tensorflow"


def test_another_backend_is_a_clear_error():
    result = _run("import models", KERAS_BACKEND="jax")
    assert result.returncode != 0
    assert "backend only" in result.stderr and "'jax'" in result.stderr


def test_the_bottom_floor_imports_nothing_heavy():
    result = _run("import sys, custom_layers; print('keras' in sys.modules, 'tensorflow' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
