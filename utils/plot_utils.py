"""Matplotlib helpers: images in a grid with their captions.

Example::

    from utils.plot_utils import plot_captions
    fig = plot_captions(["demo/cat.jpg", "demo/coffee.jpg"], ["A cat.", "A cup of coffee."], ncols=2)
"""

import textwrap
from pathlib import Path

import numpy as np


def _as_displayable(image):
    from utils.image_io import read_image

    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3 and image.dtype != np.uint8:
        # a preprocessed (normalised) array: rescale to [0, 1] for display
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    pil = read_image(image)
    if pil.mode not in ("RGB", "RGBA", "L"):
        pil = pil.convert("RGB")
    return np.asarray(pil)


#: inches per caption line at the captions' font size (10 pt, matplotlib's default line spacing 1.2, margin)
_CAPTION_FONT = 10
_LINE_IN = _CAPTION_FONT / 72 * 1.4
_TITLE_IN = 0.3
_GAP_IN = 0.15


def wrap_caption(caption, wrap=32) -> list:
    """The lines ``caption`` is drawn in (none for None or "")."""
    return textwrap.wrap(str(caption), wrap) if caption else []


def grid_layout(captions, ncols, width=4.0, wrap=32, titles=False):
    """Where each cell goes, in inches from the figure's top-left: ``(figure_height, cells)`` with a cell
    ``(left, top, image_size, caption_lines)``. Each row is as tall as a title, a square image box and its
    longest wrapped caption, so no caption reaches the next row's titles."""
    rows = [captions[i:i + ncols] for i in range(0, len(captions), ncols)]
    cells, top = [], 0.0
    image = width - 2 * _GAP_IN
    for row in rows:
        wrapped = [wrap_caption(c, wrap) for c in row]
        text = max(len(lines) for lines in wrapped) * _LINE_IN
        for column, lines in enumerate(wrapped):
            cells.append((column * width + _GAP_IN, top + (_TITLE_IN if titles else _GAP_IN), image, lines))
        top += (_TITLE_IN if titles else _GAP_IN) + image + _GAP_IN + text + _GAP_IN
    return top, cells


def plot_captions(images, captions, ncols=4, width=4.0, wrap=32, titles=None, figure=None):
    """Draw ``images`` in a grid, each with its caption underneath; returns the matplotlib figure.

    Rows are sized by their longest wrapped caption (`grid_layout`): a long caption never overlaps the
    next row's titles.

    Args:
        images: paths, PIL images or numpy arrays (anything `utils.image_io.read_image` reads).
        captions: one string per image (None or "" for no caption).
        ncols: columns of the grid (fewer when there are fewer images).
        width: inches per column; wrap: caption characters per line.
        titles: optional short labels drawn above each image (e.g. file names).
        figure: an existing figure to draw into (cleared and resized first).
    """
    images = list(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to plot")
    ncols = max(1, min(int(ncols), len(images)))
    height, cells = grid_layout(captions, ncols, width, wrap, titles is not None)
    if figure is None:
        import matplotlib.pyplot as plt

        figure = plt.figure()
    else:
        figure.clear()
    figure.set_size_inches(width * ncols, height)
    total_w = width * ncols
    for i, (image, (left, top, size, lines)) in enumerate(zip(images, cells)):
        ax = figure.add_axes([left / total_w, 1 - (top + size) / height, size / total_w, size / height])
        ax.set_anchor("N")  # a wide image's box shrinks upwards: its caption stays above the next row
        pixels = _as_displayable(image)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
        if lines:
            ax.set_xlabel("\n".join(lines), fontsize=_CAPTION_FONT)
    return figure


#: the PNG ``Software`` text of a grid this library wrote: the only existing file ``--grid`` may replace
GRID_SOFTWARE = "image_captioning captions grid"


def is_captions_grid(path) -> bool:
    """Whether ``path`` is a PNG that `save_captions_grid` wrote (its ``Software`` text chunk, looked for in the
    first 64 KiB: matplotlib writes it before the pixels); False for any other or unreadable file."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and GRID_SOFTWARE.encode() in head


def save_captions_grid(path, images, captions, titles=None, ncols=4, dpi=100):
    """`plot_captions` saved as a PNG at ``path``, written atomically (`utils.file_utils.atomic_open`);
    no pyplot (no GUI backend, no global figure). Returns the path."""
    from matplotlib.figure import Figure

    from utils.file_utils import atomic_open

    figure = plot_captions(images, captions, ncols=ncols, titles=titles, figure=Figure())
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=dpi, metadata={"Software": GRID_SOFTWARE})
    return Path(path)
