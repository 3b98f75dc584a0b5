"""``caption --grid FILE``: a contact sheet of the images with their captions (`utils.plot_utils`), whose long
captions never reach the next row, written atomically, never over a file that is not a PNG."""

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import main
from utils import plot_utils
from utils.plot_utils import plot_captions

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [str(ROOT / "demo" / name) for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg",
                                                   "camera.jpg")]
LONG = " ".join(["a very long caption that goes on and on"] * 8)


def _row_extents(figure, ncols):
    """(top, bottom) in display pixels of each row: its axes with every text drawn on them."""
    figure.canvas.draw()  # axis labels take their place when drawn
    renderer = figure.canvas.get_renderer()
    rows = {}
    for i, ax in enumerate(figure.axes):
        boxes = [ax.get_window_extent(renderer)]
        boxes += [t.get_window_extent(renderer) for t in (ax.title, ax.xaxis.label, *ax.texts) if t.get_text()]
        top, bottom = max(b.y1 for b in boxes), min(b.y0 for b in boxes)
        old = rows.get(i // ncols, (top, bottom))
        rows[i // ncols] = (max(old[0], top), min(old[1], bottom))
    return [rows[r] for r in sorted(rows)]


def test_long_captions_do_not_reach_the_next_row():
    captions = [LONG, "a cat", "short", "a rocket", "a man with a camera"]
    figure = Figure()
    FigureCanvasAgg(figure)  # a renderer to measure the texts with
    figure = plot_captions(PHOTOS, captions, ncols=2, titles=[Path(p).name for p in PHOTOS], figure=figure)
    rows = _row_extents(figure, 2)
    assert len(rows) == 3
    for (_, bottom), (next_top, _) in zip(rows, rows[1:]):
        assert bottom >= next_top, rows  # display y grows upwards: a row ends above the next one begins
    assert rows[-1][1] >= 0  # the last caption is inside the figure


def test_rows_are_sized_by_their_longest_caption():
    height, cells = plot_utils.grid_layout([LONG, "a", "b", "c"], ncols=2, titles=True)
    (_, top0, size, lines0), _, (_, top1, _, _), _ = cells
    assert len(lines0) > 5 and top1 - top0 >= size + len(lines0) * 10 / 72  # row 1 starts below row 0's text
    short_height, _ = plot_utils.grid_layout(["a", "b", "c", "d"], ncols=2, titles=True)
    assert height > short_height


def test_caption_grid_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    grid = tmp_path / "sheet.png"
    code = main.main(["caption", *PHOTOS, "--model", str(tiny_model_dir), "--max-length", "8", "--no-save",
                      "--grid", str(grid)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"grid of 5 image(s) saved in {grid}" in err.splitlines()
    captions = [line.split("\t", 1)[1] for line in out.splitlines()]
    height, _ = plot_utils.grid_layout(captions, ncols=4, titles=True)
    with Image.open(grid) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (4 * 4 * 100, pytest.approx(round(height * 100), abs=1))  # 100 dpi: 4 columns, 2 rows
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["sheet.png"]  # no temporary left
    code = main.main(["caption", PHOTOS[0], "--model", str(tiny_model_dir), "--max-length", "8", "--no-save",
                      "--grid", str(grid)])  # its own earlier grid: replaced
    assert code == 0 and "grid of 1 image(s)" in capsys.readouterr().err


def test_grid_never_replaces_a_users_png(tiny_model_dir, tmp_path, capsys):
    """A PNG the library did not write (a photo, even one of the inputs) is refused, not overwritten."""
    photo = tmp_path / "photo.png"
    Image.open(PHOTOS[0]).save(photo)
    before = photo.read_bytes()
    code = main.main(["caption", str(photo), "--model", str(tiny_model_dir), "--no-save", "--grid", str(photo)])
    assert code == main.EXIT_USAGE and "not a captions grid written by this library" in capsys.readouterr().err
    assert photo.read_bytes() == before


@pytest.mark.parametrize("name, content", [("notes.png", b"my notes"), ("sheet.jpg", None)])
def test_grid_refuses_a_file_that_is_not_a_png(tiny_model_dir, tmp_path, capsys, name, content):
    target = tmp_path / name
    if content is not None:
        target.write_bytes(content)
    code = main.main(["caption", PHOTOS[0], "--model", str(tiny_model_dir), "--no-save", "--grid", str(target)])
    assert code == main.EXIT_USAGE
    assert ("not a captions grid" if content else "give a .png file name") in capsys.readouterr().err
    assert (target.read_bytes() == content) if content else not target.exists()
