"""``main.py export --format official`` / `ClipCap.save_official` replace only what they wrote.

The description beside the ``.pt`` (``<stem>.json``) is replaced only when an export wrote it (its ``format``
is `SIDECAR_FORMAT`), whatever ``--overwrite`` says: ``<model>/config.pt`` must never replace the model's own
``config.json``. Nothing is written inside a saved model's folder (the exported one or any other): its files
are not ours to replace, and saving that model again would delete the export. Refusals come before the model
is loaded and leave every file as it was.
"""

import shutil

import pytest

import main

pytestmark = pytest.mark.usefixtures("isolated_home")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_into_the_model_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _snapshot(model)
    for output in (model / "config.pt", model / "clip" / "config.pt", model / "tokenizer" / "x.pt"):
        code = main.main(["export", str(model), str(output), "--format", "official", "--overwrite"])
        assert code == 2 and "inside the saved model folder" in capsys.readouterr().err, output
    assert _snapshot(model) == before  # before the fix: config.json became the export's description


def test_only_a_description_an_export_wrote_is_replaced(tiny_model_dir, tiny_clipcap, tmp_path, capsys):
    from utils.convert.clipcap_export import SIDECAR_FORMAT
    from utils.file_utils import UnsafePathError

    pt, sidecar = tmp_path / "out" / "model.pt", tmp_path / "out" / "model.json"
    pt.parent.mkdir()
    sidecar.write_text('{"mine": "not an export"}')
    code = main.main(["export", str(tiny_model_dir), str(pt), "--format", "official", "--overwrite"])
    assert code == 2 and "is not a description written by an official export" in capsys.readouterr().err
    with pytest.raises(UnsafePathError, match="is not a description written by an official export"):
        tiny_clipcap.save_official(pt, overwrite=True)
    assert sidecar.read_text() == '{"mine": "not an export"}' and not pt.exists()

    sidecar.unlink()
    tiny_clipcap.save_official(pt)
    first = pt.read_bytes()
    tiny_clipcap.save_official(pt, overwrite=True)  # our own description and a checkpoint are replaced
    assert pt.read_bytes() == first and f'"format": "{SIDECAR_FORMAT}"' in sidecar.read_text()


def test_overwrite_replaces_only_a_pytorch_checkpoint(tiny_model_dir, tiny_clipcap, tmp_path, capsys):
    """``--overwrite`` named any file: ``export model thesis.tex --format official --overwrite`` replaced the
    thesis with a state dict. Only a file the torch-free reader takes for a checkpoint is replaced now."""
    from utils.file_utils import UnsafePathError

    for name, data in (("thesis.tex", b"\\documentclass{article}"), ("empty.pt", b""), ("notes.pt", b"PK\x03\x04 no")):
        target = tmp_path / name
        target.write_bytes(data)
        code = main.main(["export", str(tiny_model_dir), str(target), "--format", "official", "--overwrite"])
        assert code == 2 and "is not a PyTorch checkpoint" in capsys.readouterr().err, name
        with pytest.raises(UnsafePathError, match="is not a PyTorch checkpoint"):
            tiny_clipcap.save_official(target, overwrite=True)
        assert target.read_bytes() == data and not target.with_suffix(".json").exists(), name


def test_python_export_refuses_any_saved_model_folder(tiny_model_dir, tiny_clipcap, tmp_path):
    """The Python API does not know which folder the model came from: every saved model's folder is refused."""
    from utils.file_utils import UnsafePathError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _snapshot(model)
    for output in (model / "config.pt", model / "clip" / "export.pt"):
        with pytest.raises(UnsafePathError, match="inside the saved model folder"):
            tiny_clipcap.save_official(output, overwrite=True)
    assert _snapshot(model) == before
