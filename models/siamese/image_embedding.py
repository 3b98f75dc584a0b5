"""`ImageEmbedder`: the one path image source -> decoded image -> OpenAI preprocessing -> CLIP features.

Every caller that turns images into CLIP embeddings goes through it, so they all read, preprocess and
encode alike (same safety checks, size caps, EXIF handling, error messages, numbers)::

    read        path / bytes / PIL / array -> decoded PIL image   (`utils.image_io.read_image`: regular files
                only, byte and pixel caps, EXIF orientation unless ``exif_transpose=False``)
    preprocess  PIL image -> (n_px, n_px, 3) float32               (`utils.clip_preprocessing.preprocess_image`,
                OpenAI's transform)
    encode_batch  list / (B, n_px, n_px, 3) pixels -> (B, D)       (``CLIP.encode_pixels``: raw features)

The three parts are separate methods so that a pipeline can run them as concurrent stages
(``ClipCap.predict``: reader threads, a preprocess stage, a batched encode stage; the local extraction of
`datasets.embeddings`; the Beam DoFn + ``RunInference`` handler of `beam_inference` / `beam_extraction`);
`embed` chains them for a list of images (``CLIP.encode_image``).

Example::

    embedder = clip.image_embedder(exif_transpose=False)          # what OpenAI's code computes
    features = embedder.embed(["cat.jpg", "dog.png"])            # (2, D)
    pixels = embedder.preprocess(embedder.read("cat.jpg"))       # (n_px, n_px, 3), one stage at a time
"""

import os

import numpy as np

from utils.clip_preprocessing import preprocess_image
from utils.file_utils import DEFAULT_MAX_BYTES
from utils.image_io import ImageReadError, read_image


def is_single_image(images):
    """Whether ``images`` is one image (a path, bytes, PIL image, (H, W[, C]) array) rather than a list."""
    if isinstance(images, (str, os.PathLike, bytes)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return not isinstance(images, (list, tuple))


class ImageEmbedder:
    """Reads, preprocesses and encodes images for one CLIP image encoder, with one reading policy.

    Args:
        encode_pixels: (B, n_px, n_px, 3) float32 -> (B, D) raw image features (``CLIP.encode_pixels``); None
            for an embedder that only reads and preprocesses (a Beam DoFn, where the model lives elsewhere).
        input_resolution: the image side n_px the encoder takes.
        exif_transpose: apply the EXIF orientation when reading (OpenAI's and the official code do not).
        max_bytes: refuse image files larger than this many bytes (None: no limit).
    """

    def __init__(self, encode_pixels, input_resolution, exif_transpose=True, max_bytes=DEFAULT_MAX_BYTES):
        self.encode_pixels = encode_pixels
        self.input_resolution = int(input_resolution)
        self.exif_transpose = bool(exif_transpose)
        self.max_bytes = max_bytes

    @classmethod
    def from_clip(cls, clip, exif_transpose=True, max_bytes=DEFAULT_MAX_BYTES):
        """The embedder of a `models.siamese.clip.CLIP` (its ``encode_pixels`` and ``input_resolution``)."""
        return cls(clip.encode_pixels, clip.input_resolution, exif_transpose=exif_transpose, max_bytes=max_bytes)

    # --- stages --------------------------------------------------------------------------------------

    def read(self, source):
        """A path, PIL image or array -> the decoded PIL image (its mode kept); `ImageReadError` if bad."""
        return read_image(source, exif_transpose=self.exif_transpose, max_bytes=self.max_bytes)

    def read_bytes(self, data, name):
        """Bytes read from any file system -> the decoded PIL image, as `read`; errors name ``name``."""
        if not data:
            raise ImageReadError(f"{name}: empty file (0 bytes)")
        try:
            return read_image(bytes(data), exif_transpose=self.exif_transpose)
        except ImageReadError as e:
            message = str(e)
            message = message[len("image bytes: "):] if message.startswith("image bytes: ") else message
            raise ImageReadError(f"{name}: {message}") from e

    def preprocess(self, image):
        """A decoded PIL image (from `read`) -> (n_px, n_px, 3) float32, OpenAI's transform channels-last."""
        return preprocess_image(image, self.input_resolution)

    def load(self, source):
        """`read` then `preprocess`: one image source -> (n_px, n_px, 3) float32."""
        return self.preprocess(self.read(source))

    def encode_batch(self, pixels, compile_now=None):
        """A list of `preprocess` outputs, or (B, n_px, n_px, 3) pixels -> raw image features (B, D).
        ``compile_now=True`` asks ``CLIP.encode_pixels`` to compile at once (a long run)."""
        if self.encode_pixels is None:
            raise ValueError("this ImageEmbedder has no image encoder (built to read and preprocess only)")
        pixels = np.stack(pixels) if isinstance(pixels, (list, tuple)) else pixels
        return np.asarray(self.encode_pixels(pixels, compile_now=compile_now))

    # --- whole ---------------------------------------------------------------------------------------

    def embed(self, images, batch_size=32):
        """Images (one source, a list of them, or an (N, H, W, C) array) -> (N, D), ``batch_size`` at a time."""
        if is_single_image(images):
            images = [images]
        from custom_architectures.decoding_options import check_integer

        batch_size = check_integer("batch_size", batch_size, minimum=1)  # 2.5 or "2": named, not a TypeError
        features = []
        for start in range(0, len(images), batch_size):
            features.append(self.encode_batch([self.load(image) for image in images[start : start + batch_size]]))
        if not features:  # no image: the encoder's own (0, D)
            n = self.input_resolution
            return self.encode_batch(np.zeros((0, n, n, 3), np.float32))
        return np.concatenate(features)
