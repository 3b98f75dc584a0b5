"""Reading images safely: one entry point for paths, PIL images and numpy arrays, with clear errors.

`read_image` decodes completely (``Image.load()``) so a truncated file fails here rather than later in a
batch, refuses decompression bombs, applies the EXIF orientation by default (a photo taken upright shows
upright; OpenAI's CLIP pipeline does not do this: ``exif_transpose=False`` reproduces it) and keeps the
image's mode, so that preprocessing can follow OpenAI's order (resize, crop, then convert to RGB).
`list_images` expands files, directories and glob patterns into a stable list of image paths.

Example::

    from utils.image_io import list_images, read_image
    for path in list_images(["photos/", "more/*.png"]):
        image = read_image(path)          # PIL.Image, EXIF orientation applied
"""

import glob
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GLOB_CHARS = set("*?[")


class ImageReadError(ValueError):
    """An image that cannot be read: missing, empty, truncated, not an image, or too large."""


def _pixel_limit(max_pixels):
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_size(size, limit, name):
    if limit is not None and size[0] * size[1] > limit:
        raise ImageReadError(
            f"{name}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; pass a larger max_pixels if the image is trusted)"
        )


def _open_bytes(data, name, max_pixels):
    limit = _pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # with an explicit max_pixels our own check decides; otherwise PIL's warning becomes an error
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, limit, name)
            image.load()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{name}: refused as a possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(f"{name}: not an image file (unrecognised format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{name}: cannot decode image (truncated or corrupt file?): {e}") from e
    return image


def _from_array(array):
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageReadError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode I;16
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageReadError("a float image array must hold values in [0, 1] (uint8 arrays hold 0..255)")
        return Image.fromarray(np.round(array * 255).astype(np.uint8))
    raise ImageReadError(
        f"unsupported image array dtype {array.dtype}: use uint8 (0..255), 2-D uint16, or floats in [0, 1]"
    )


def read_image(source, exif_transpose=True, max_pixels=None):
    """A decoded `PIL.Image.Image` from a path, a PIL image or a numpy array, its mode kept.

    Args:
        source: a file path (str / PathLike), a PIL image, or a numpy array (uint8 (H, W[, 1|3|4]),
            uint16 (H, W), or floats in [0, 1]).
        exif_transpose: rotate / flip according to the EXIF orientation tag (OpenAI does not: False).
        max_pixels: refuse images with more pixels (default: PIL's ``Image.MAX_IMAGE_PIXELS``; None there
            means no limit). PIL itself still refuses files above twice its own limit.

    Raises:
        ImageReadError: missing path, directory, empty file, non-image bytes, truncated / corrupt data,
            decompression bomb, or an unsupported array.

    Example::

        image = read_image("cat.jpg")             # PIL.Image in its own mode (RGB, L, P, RGBA, I;16 ...)
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, _pixel_limit(max_pixels), "image")
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageReadError(f"cannot decode the given PIL image (truncated or corrupt?): {e}") from e
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
        _check_size(image.size, _pixel_limit(max_pixels), "image array")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageReadError(f"no such image file: {path}")
        if os.path.isdir(path):
            raise ImageReadError(f"{path} is a directory, not an image (use list_images to expand it)")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise ImageReadError(f"{path}: empty file (0 bytes)")
        image = _open_bytes(data, path, max_pixels)
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageReadError("empty image bytes")
        image = _open_bytes(bytes(source), "image bytes", max_pixels)
    else:
        raise ImageReadError(
            f"cannot read an image from a {type(source).__name__}: give a path, a PIL image or a numpy array"
        )
    if exif_transpose:
        if image is source:  # the caller's image: never modified
            image = ImageOps.exif_transpose(image)
        else:
            ImageOps.exif_transpose(image, in_place=True)
    return image


def _is_image_file(path):
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(paths_dirs_globs):
    """Expand files, directories (recursively, by `IMAGE_EXTENSIONS`) and glob patterns into image paths.

    Order is stable: arguments in the given order, each directory / pattern sorted; duplicates keep their
    first position. A file named explicitly is kept whatever its extension (read_image will judge it).

    Raises:
        ImageReadError: a path that does not exist, a directory with no image, a pattern matching nothing,
            or an empty list of inputs.

    Example::

        list_images(["a.jpg", "photos/", "scans/**/*.png"])
    """
    if isinstance(paths_dirs_globs, (str, os.PathLike)):
        paths_dirs_globs = [paths_dirs_globs]
    items = [os.fspath(p) for p in paths_dirs_globs]
    if not items:
        raise ImageReadError("no image paths given")
    found, seen = [], set()
    for item in items:
        if os.path.isfile(item):
            matches = [item]
        elif os.path.isdir(item):
            matches = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            )
            if not matches:
                raise ImageReadError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in directory {item}")
        elif _GLOB_CHARS & set(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if _is_image_file(p))
            if not matches:
                raise ImageReadError(f"no image file matches the pattern {item!r}")
        else:
            raise ImageReadError(f"no such file or directory: {item}")
        for path in matches:
            if path not in seen:
                seen.add(path)
                found.append(path)
    return found
