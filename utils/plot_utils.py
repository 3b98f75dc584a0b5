"""Matplotlib helpers: images in a grid with their captions.

Example::

    from utils.plot_utils import plot_captions
    fig = plot_captions(["demo/cat.jpg", "demo/coffee.jpg"], ["A cat.", "A cup of coffee."], ncols=2)
"""

import math
import textwrap

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


def plot_captions(images, captions, ncols=4, width=4.0, wrap=32, titles=None, figure=None):
    """Draw ``images`` in a grid, each with its caption underneath; returns the matplotlib figure.

    Args:
        images: paths, PIL images or numpy arrays (anything `utils.image_io.read_image` reads).
        captions: one string per image (None or "" for no caption).
        ncols: columns of the grid (fewer when there are fewer images).
        width: inches per column; wrap: caption characters per line.
        titles: optional short labels drawn above each image (e.g. file names).
        figure: an existing figure to draw into (cleared first).
    """
    import matplotlib.pyplot as plt

    images = list(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to plot")
    ncols = max(1, min(int(ncols), len(images)))
    nrows = math.ceil(len(images) / ncols)
    if figure is None:
        figure = plt.figure(figsize=(width * ncols, (width + 0.8) * nrows))
    else:
        figure.clear()
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = figure.add_subplot(nrows, ncols, i + 1)
        pixels = _as_displayable(image)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
        if caption:
            ax.set_xlabel("\n".join(textwrap.wrap(str(caption), wrap)), fontsize=10)
    figure.tight_layout()
    return figure
