"""Reading images safely: one entry point for paths, PIL images and numpy arrays, with clear errors.

`read_image` decodes completely (``Image.load()``) so a truncated file fails here rather than later in a
batch (any failure of PIL's decoders, whatever it raises, is that image's `ImageReadError`), refuses
decompression bombs (an ICO's icon at its embedded header's size, which PIL decodes inside ``Image.open``)
and JPEGs of more than `MAX_JPEG_SCANS` scans (a CPU bomb), applies the EXIF orientation by default (a
photo taken upright shows upright; OpenAI's CLIP pipeline does not do this: ``exif_transpose=False``
reproduces it) and keeps the image's mode, so that preprocessing can follow OpenAI's order (resize, crop,
then convert to RGB).
`list_images` expands files, directories and glob patterns into a stable list of image paths.

http(s) URLs of the CLI and the Python API (whose user is the operator) are read by `read_url`; the web demo's
visitors' URLs go through `utils.safe_fetch` instead (public addresses only). `read_url`: urllib without any other
scheme handler (a redirect to ``file:`` or ``ftp:`` is refused), at most ``max_bytes`` (announced or
received), ``timeout`` seconds for the whole transfer (headers and redirects included: at the deadline the
connection is shut down, `utils.safe_fetch.Cutoff`), a body cut short of its Content-Length refused; any
failure is that image's `ImageReadError`.

Only regular files are read: a path is opened without blocking and checked on its descriptor
(`utils.file_utils.open_regular_file`), so a FIFO, socket or device named ``.jpg`` gets its own error instead
of hanging the run or reading forever, and a file larger than ``max_bytes`` (default
`utils.file_utils.DEFAULT_MAX_BYTES`, 256 MB) is refused before anything is read. PIL reads the open file
lazily: an animated GIF is decoded for its first frame only, the later frames are never read.

Example::

    from utils.image_io import list_images, read_image
    for path in list_images(["photos/", "more/*.png"]):
        image = read_image(path)          # PIL.Image, EXIF orientation applied
"""

import glob
import http.client
import io
import logging
import os
import re
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
from PIL import Image, ImageOps

from utils.file_utils import DEFAULT_MAX_BYTES, UnsafePathError, open_regular_file, path_problem
from utils.safe_fetch import Cutoff, connect_within

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GLOB_CHARS = set("*?[")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
URL_SCHEMES = ("http", "https")
#: seconds for a whole image download (connecting, then every byte)
URL_TIMEOUT_S = 30.0
#: the most scans (SOS markers) a JPEG may hold: a progressive JPEG is decoded scan by scan, each a pass over
#: the whole image, so that 178 kB of 2,006 scans of a 4096 x 4096 image took 20 s (PIL; 27 s in TensorFlow).
#: Encoders write 1 (baseline) to about 10 (libjpeg's progressive script); the serving graph applies it too
MAX_JPEG_SCANS = 100


class ImageReadError(ValueError):
    """An image that cannot be read: missing, empty, truncated, corrupt, not an image, or too large."""


def _pixel_limit(max_pixels):
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_size(size, limit, name):
    if limit is not None and size[0] * size[1] > limit:
        raise ImageReadError(
            f"{name}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; pass a larger max_pixels if the image is trusted)"
        )


def _jpeg_scans(fp):
    """The number of scans (SOS markers, ``FF DA``: never inside entropy-coded data, where ``FF`` is followed
    by ``00``) in the JPEG file object ``fp``, read from its start in 1 MiB blocks; its position is restored.
    An EXIF thumbnail's or an MPO's other pictures' scans count too (a handful)."""
    position, count, last = fp.tell(), 0, b""
    fp.seek(0)
    try:
        while block := fp.read(1 << 20):
            count += (last + block).count(b"\xff\xda")
            last = block[-1:]
    finally:
        fp.seek(position)
    return count


def _check_jpeg_scans(image, name):
    """`ImageReadError` for a JPEG of more than `MAX_JPEG_SCANS` scans, before any is decoded."""
    if image.format in ("JPEG", "MPO"):
        scans = _jpeg_scans(image.fp)
        if scans > MAX_JPEG_SCANS:
            raise ImageReadError(
                f"{name}: a progressive JPEG of {scans} scans (more than {MAX_JPEG_SCANS}): refused, each scan "
                f"costs a pass over the whole {image.size[0]}x{image.size[1]} image (usual files have at most "
                "a dozen)")


def _check_icon(fp, limit, name):
    """`Image.open` of an ICO decodes its largest icon at once (``IcoImagePlugin._open`` calls ``load``), at
    the size the embedded PNG or BMP header says, whatever the icon directory says (a 16 x 16 entry held an
    8000 x 8000 PNG: 256 MB decoded before ``max_pixels`` was checked): that header's size is checked first,
    read as PIL reads it (``IcoFile.frame``) without decoding. Other files: nothing (``fp`` left at its
    position)."""
    from PIL import BmpImagePlugin, IcoImagePlugin, PngImagePlugin

    position = fp.tell()
    try:
        if fp.read(4) != b"\0\0\1\0":
            return
        fp.seek(position)
        entry = IcoImagePlugin.IcoFile(fp).entry[0]  # the one Image.open decodes
        fp.seek(entry.offset)
        png = fp.read(8) == PngImagePlugin._MAGIC
        fp.seek(entry.offset)
        if png:
            size = PngImagePlugin.PngImageFile(fp).size
        else:
            width, height = BmpImagePlugin.DibImageFile(fp).size
            size = (width, height // 2)  # the colours, then the AND mask
        _check_size(size, limit, f"{name} (its largest icon)")
    finally:
        fp.seek(position)


def _open_bytes(data, name, max_pixels, exif_transpose=False):
    """Decode an image from bytes or a binary file object (read lazily: only what the first frame needs).

    Any failure of PIL's decoders is this image's `ImageReadError`: a crafted file makes some of them raise
    other errors than OSError / SyntaxError (a DDS: NotImplementedError, a TIFF of RATIONAL strip offsets:
    TypeError ...), which must fail that image alone, never the batch or the web demo's request."""
    limit = _pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # with an explicit max_pixels our own check decides; otherwise PIL's warning becomes an error
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            fp = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
            _check_icon(fp, limit, name)
            image = Image.open(fp)
            _check_size(image.size, limit, name)
            _check_jpeg_scans(image, name)
            image.load()  # the first frame only (PIL reads later frames on seek)
            if exif_transpose:  # while the file is open (some formats read their EXIF block from it)
                ImageOps.exif_transpose(image, in_place=True)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{name}: refused as a possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(f"{name}: not an image file (unrecognised format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{name}: cannot decode image (truncated or corrupt file?): {e}") from e
    except MemoryError as e:
        raise ImageReadError(f"{name}: not enough memory to decode the image") from e
    except Exception as e:  # noqa: BLE001 (a decoder's own failure on crafted bytes: see the docstring)
        raise ImageReadError(f"{name}: cannot decode image (corrupt or unsupported file?): "
                             f"{type(e).__name__}: {e}") from e
    return image


def _exif_transposed(image, name, in_place):
    """``ImageOps.exif_transpose`` of an image already decoded; its EXIF block's errors (a broken TIFF header:
    SyntaxError ...) are `ImageReadError`s naming ``name``."""
    try:
        return ImageOps.exif_transpose(image, in_place=in_place)
    except MemoryError as e:
        raise ImageReadError(f"{name}: not enough memory to rotate the image") from e
    except Exception as e:  # noqa: BLE001 (PIL's EXIF reader on crafted bytes, as `_open_bytes`)
        raise ImageReadError(f"{name}: cannot read the EXIF orientation (corrupt EXIF block?): "
                             f"{type(e).__name__}: {e}") from e


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


def is_url(text) -> bool:
    """Whether ``text`` is a string of the form ``scheme://...`` (any scheme: `read_url` refuses all but
    http and https)."""
    return isinstance(text, str) and bool(_URL_RE.match(text))


class _DeadlineConnections:
    """urllib's connection opening for one `read_url`: every connection (each redirect's, a proxy's) gets at
    most the time left and is watched by the fetch's `utils.safe_fetch.Cutoff`, which shuts it down at the
    deadline, so that no hop (name lookup, status line, headers, ``100 Continue`` answers, body) outlasts
    ``timeout`` (`utils.safe_fetch.connect_within`)."""

    def do_open(self, http_class, req, **kwargs):
        cutoff = self.cutoff

        def connection(host, timeout=None, **conn_kwargs):
            remaining = cutoff.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the deadline passed")
            h = http_class(host, timeout=remaining, **conn_kwargs)
            h._create_connection = (lambda address, timeout, source=None:  # the plain socket, before TLS
                                    cutoff.watch(connect_within(address, cutoff.deadline, source)))
            return h

        return super().do_open(connection, req, **kwargs)


class _DeadlineHTTPHandler(_DeadlineConnections, urllib.request.HTTPHandler):
    def __init__(self, cutoff):
        super().__init__()
        self.cutoff = cutoff


class _DeadlineHTTPSHandler(_DeadlineConnections, urllib.request.HTTPSHandler):
    def __init__(self, cutoff):
        super().__init__()
        self.cutoff = cutoff


def _url_opener(cutoff):
    # only HTTP(S) (+ proxies from the environment, redirects, errors): no file:, ftp: or data: handler
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _DeadlineHTTPHandler(cutoff), _DeadlineHTTPSHandler(cutoff),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def read_url(url, max_bytes=DEFAULT_MAX_BYTES, timeout=URL_TIMEOUT_S) -> bytes:
    """The bytes an http(s) URL serves: at most ``max_bytes`` (None: no cap; refused from the announced
    length when it exceeds it), within ``timeout`` seconds in all (every name lookup, connection, redirect,
    status line, header and byte: at the deadline the connection is shut down, `utils.safe_fetch.Cutoff`;
    lookups: `utils.safe_fetch.connect_within`); the whole body
    its Content-Length announces; `ImageReadError` otherwise (another scheme, an HTTP error, no connection,
    too slow, too large, cut short, empty). Any address is read (loopback and private ones too: the user
    chose the URL)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in URL_SCHEMES:
        raise ImageReadError(f"{url}: unsupported URL scheme {scheme!r} (only http and https are read)")
    too_slow = f"{url}: not downloaded within {timeout:g} s"
    request = urllib.request.Request(url, headers={"User-Agent": "image_captioning"})
    cutoff = Cutoff(time.monotonic() + timeout)
    try:
        with cutoff, _url_opener(cutoff).open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageReadError(f"{url}: {length} bytes exceeds the limit of {max_bytes} bytes "
                                     "(raise max_bytes / --max-file-bytes if the source is trusted)")
            data = bytearray()
            while chunk := response.read1(1 << 16):
                data += chunk
                if max_bytes is not None and len(data) > max_bytes:
                    raise ImageReadError(f"{url}: more than {max_bytes} bytes (raise max_bytes / "
                                         "--max-file-bytes if the source is trusted)")
                if cutoff.fired:
                    raise ImageReadError(too_slow)
            if cutoff.fired:  # the shutdown ended the read: what arrived is not all of it
                raise ImageReadError(too_slow)
            if response.length:  # read1 ends quietly when the connection closes before the announced length
                raise ImageReadError(f"{url}: the connection closed {response.length} bytes before the announced "
                                     f"end ({length} bytes)")
    except urllib.error.HTTPError as e:
        raise ImageReadError(f"{url}: HTTP error {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if cutoff.fired or isinstance(e.reason, TimeoutError):
            raise ImageReadError(too_slow) from e
        raise ImageReadError(f"{url}: cannot download: {e.reason}") from e
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        if cutoff.fired or isinstance(e, TimeoutError):
            raise ImageReadError(too_slow) from e
        raise ImageReadError(f"{url}: cannot download: {type(e).__name__}: {e}") from e
    if not data:
        raise ImageReadError(f"{url}: empty response (0 bytes)")
    return bytes(data)


def _open_image_file(path, max_bytes):
    """A binary file object on the image file ``path`` (a non-empty regular file of at most ``max_bytes``);
    `ImageReadError` saying what is wrong otherwise."""
    if not os.path.lexists(path):
        raise ImageReadError(f"no such image file: {path}")
    if os.path.isdir(path):
        raise ImageReadError(f"{path} is a directory, not an image (use list_images to expand it)")
    try:  # never blocks (FIFO) nor reads without bound (device): checked on the open descriptor
        f = open_regular_file(path, max_bytes)
    except UnsafePathError as e:
        raise ImageReadError(str(e)) from e
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return f


def read_image_file(path, max_bytes=DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of the image file ``path``, checked as `read_image` checks a path (same errors); for a caller
    that needs the bytes themselves as well as the image (their digest: `models.image_captioning.freshness`)."""
    path = os.fspath(path)
    with _open_image_file(path, max_bytes) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageReadError(f"{path}: more than {max_bytes} bytes (the file grew while being read)")
    return data


def read_image(source, exif_transpose=True, max_pixels=None, max_bytes=DEFAULT_MAX_BYTES):
    """A decoded `PIL.Image.Image` from a path, a PIL image or a numpy array, its mode kept.

    Args:
        source: a file path (str / PathLike), an http(s) URL (`read_url`), a PIL image, or a numpy array (uint8 (H, W[, 1|3|4]),
            uint16 (H, W), or floats in [0, 1]).
        exif_transpose: rotate / flip according to the EXIF orientation tag (OpenAI does not: False).
        max_pixels: refuse images with more pixels (default: PIL's ``Image.MAX_IMAGE_PIXELS``; None there
            means no limit). PIL itself still refuses files above twice its own limit.
        max_bytes: refuse image files larger than this (default 256 MB; None: no limit).

    Raises:
        ImageReadError: missing path, directory, FIFO / device / socket, dangling or looping symbolic link,
            empty or too large file, non-image bytes, truncated / corrupt data (any decoder error), a
            corrupt EXIF block, decompression bomb, a JPEG of more than `MAX_JPEG_SCANS` scans, or an
            unsupported array.

    Example::

        image = read_image("cat.jpg")             # PIL.Image in its own mode (RGB, L, P, RGBA, I;16 ...)
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, _pixel_limit(max_pixels), "image")
        try:
            if getattr(source, "tile", None) and getattr(source, "fp", None) is not None:  # not decoded yet
                _check_jpeg_scans(source, "image")
            source.load()
        except ImageReadError:
            raise
        except MemoryError as e:
            raise ImageReadError("the given PIL image: not enough memory to decode it") from e
        except Exception as e:  # noqa: BLE001 (any decoder failure, as `_open_bytes`)
            raise ImageReadError(f"cannot decode the given PIL image (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
        _check_size(image.size, _pixel_limit(max_pixels), "image array")
    elif is_url(source):
        return _open_bytes(read_url(source, max_bytes), source, max_pixels, exif_transpose=exif_transpose)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with _open_image_file(path, max_bytes) as f:
            return _open_bytes(f, path, max_pixels, exif_transpose=exif_transpose)
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageReadError("empty image bytes")
        return _open_bytes(bytes(source), "image bytes", max_pixels, exif_transpose=exif_transpose)
    else:
        raise ImageReadError(
            f"cannot read an image from a {type(source).__name__}: give a path, a PIL image or a numpy array"
        )
    if exif_transpose:
        if image is source:  # the caller's image: never modified
            image = _exif_transposed(image, "image", in_place=False)
        else:
            _exif_transposed(image, "image array", in_place=True)
    return image


def _has_image_extension(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def expand_paths(paths_dirs_globs):
    """Like `list_images`, but also returns what a directory or pattern held that cannot be read.

    Returns:
        a list of ``(path, problem)`` in `list_images`' order: ``problem`` is None for a regular file, or
        why the path is not read (a FIFO, socket, device, dangling or looping link named like an image).
        An explicitly named path is always ``(path, None)``: `read_image` reports its problem.
    """
    if isinstance(paths_dirs_globs, (str, os.PathLike)):
        paths_dirs_globs = [paths_dirs_globs]
    items = [os.fspath(p) for p in paths_dirs_globs]
    if not items:
        raise ImageReadError("no image paths given")
    found, seen = [], set()
    for item in items:
        if is_url(item):
            matches = [(item, None)]  # read (and judged) by read_image
        elif os.path.isdir(item):
            # os.walk lists names without opening files (a FIFO cannot block it) and does not follow
            # symbolic links to directories (no loops)
            candidates = sorted(os.path.join(root, name) for root, _, names in os.walk(item)
                                for name in names if _has_image_extension(name))
            matches = [(p, path_problem(p)) for p in candidates]
            if not matches:
                raise ImageReadError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in directory {item}")
        elif os.path.lexists(item):
            matches = [(item, None)]  # named explicitly: kept whatever it is, read_image judges it
        elif _GLOB_CHARS & set(item):
            candidates = sorted(p for p in glob_no_links(item)
                                if _has_image_extension(p) and not os.path.isdir(p))
            matches = [(p, path_problem(p)) for p in candidates]
            if not matches:
                raise ImageReadError(f"no image file matches the pattern {item!r}")
        else:
            raise ImageReadError(f"no such file or directory: {item}")
        for path, problem in matches:
            if path not in seen:
                seen.add(path)
                found.append((path, problem))
    return found


def glob_no_links(pattern):
    """``glob.glob(pattern, recursive=True)``, except that ``**`` does not follow symbolic links to
    directories (as `os.walk` for a directory input): Python's ``**`` does, so a folder holding a link to
    itself matched one file 40 times over (`d/x.jpg`, `d/a/x.jpg`, ...), and two such links never ended.
    The parts around each ``**`` go through `glob.glob` (hidden names and character classes as it treats
    them); a ``**`` lists the base folder and its non-hidden subfolders. Unsorted, without duplicates."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    head, rest = os.sep.join(parts[:i]) or (os.sep if i == 1 and parts[0] == "" else ""), os.sep.join(parts[i + 1:])
    if not head:
        bases = [""]
    elif glob.has_magic(head):
        bases = [b for b in glob.glob(head) if os.path.isdir(b)]
    else:
        bases = [head] if os.path.isdir(head) else []
    found = {}
    for base in bases:
        for root, dirs, files in os.walk(base or os.curdir):  # followlinks=False: links to folders not entered
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            folder = root if base else os.path.relpath(root)
            folder = "" if folder == os.curdir else folder
            if rest:
                matches = glob_no_links(os.path.join(glob.escape(folder), rest) if folder else rest)
            else:  # a trailing **: everything below, as glob gives it
                matches = [os.path.join(folder, n) for n in (*dirs, *files) if not n.startswith(".")]
            found.update(dict.fromkeys(matches))
    return list(found)


def list_images(paths_dirs_globs):
    """Expand files, directories (recursively, by `IMAGE_EXTENSIONS`) and glob patterns into image paths.

    Order is stable: arguments in the given order, each directory / pattern sorted; duplicates keep their
    first position. A file named explicitly is kept whatever its extension or kind (read_image will judge
    it). Directories and patterns keep regular files only: a FIFO, socket, device or dangling link named
    like an image is skipped with a warning in the log (`expand_paths` returns them with their problem).

    Raises:
        ImageReadError: a path that does not exist, a directory with no image, a pattern matching nothing,
            or an empty list of inputs.

    Example::

        list_images(["a.jpg", "photos/", "scans/**/*.png"])
    """
    found, problems = [], []
    for path, problem in expand_paths(paths_dirs_globs):
        if problem is None:
            found.append(path)
        else:
            problems.append(problem)
            logger.warning("skipped %s", problem)
    if not found:
        raise ImageReadError("no readable image: " + "; ".join(problems))
    return found
