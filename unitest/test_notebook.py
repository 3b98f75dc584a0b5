"""image_captioning.ipynb runs top to bottom (nbclient) against the tiny offline model, and is stored clean."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "image_captioning.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_against_tiny_model(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("IMAGE_CAPTIONING_NOTEBOOK_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("IMAGE_CAPTIONING_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    except Exception as e:  # show the failing cell's traceback
        pytest.fail(f"notebook failed: {e}")
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "loaded 'tiny'" in text
    for name in ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg", "camera.jpg"):
        assert name in text
    assert "web_demo.png" not in text  # a screenshot of the web demo, not one of the photographs
    assert "beam (5)" in text and "images/s" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the grid
