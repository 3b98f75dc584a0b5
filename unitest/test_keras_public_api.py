"""The library and its tools use Keras' public API only: no module imports ``keras.src`` (Keras' private
package, which a minor release may reorganise: `utils/weights_io.py` used to, so every load depended on it).

A grep over every ``.py`` file outside ``unitest/`` (a test may probe a Keras internal to check an effect,
as `test_cold_start` checks that Keras' DataFrame support is off).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"\bkeras\s*\.\s*src\b|from\s+keras\s+import\s+src\b")


def private_keras_uses(root):
    """[(file, line number, line)] of every mention of ``keras.src`` in the .py files outside unitest/."""
    found = []
    for path in sorted(Path(root).rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "unitest" or any(p.startswith(".") or p in ("venv", "__pycache__") for p in rel.parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                found.append((str(rel), number, line.strip()))
    return found


def test_no_module_imports_keras_private_package():
    found = private_keras_uses(ROOT)
    assert not found, "keras.src used:\n" + "\n".join(f"  {f}:{n}: {line}" for f, n, line in found)


def test_the_check_finds_a_private_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("import os\nfrom keras.src.saving import saving_lib\n")
    (tmp_path / "pkg" / "b.py").write_text("import keras\nx = keras.src.backend  # attribute access counts\n")
    (tmp_path / "pkg" / "c.py").write_text("from keras import src\n")
    (tmp_path / "pkg" / "ok.py").write_text("import keras  # keras.src in a comment is fine\n")
    assert [(f, n) for f, n, _ in private_keras_uses(tmp_path)] == [("pkg/a.py", 2), ("pkg/b.py", 2),
                                                                      ("pkg/c.py", 1)]
