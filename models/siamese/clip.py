"""`CLIP`: the object users call to embed images and texts with an OpenAI CLIP model, in Keras.

It ties together the image path (`models.siamese.image_embedding.ImageEmbedder`: reading with
`utils.image_io`, OpenAI-identical preprocessing with `utils.clip_preprocessing`), the Keras encoders
(`custom_architectures.clip_arch`) and the CLIP tokenizer (`models.siamese.clip_tokenizer`). ``from_pretrained`` converts an OpenAI ``.pt`` (TorchScript or state
dict; torch needed) or loads a directory written by ``save`` (config.json, weights.h5 and the tokenizer's
vocabulary; no torch needed).

Example::

    clip = CLIP.from_pretrained("ViT-B-32.pt")
    clip.save("pretrained_models/clip_vit_b32")
    clip = CLIP.load("pretrained_models/clip_vit_b32")
    image_features = clip.encode_image(["cat.jpg", "dog.png"])     # (2, 512), unnormalised
    logits = clip.similarity(["cat.jpg"], ["a cat", "a dog"])       # (1, 2)
"""

import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from custom_architectures.clip_arch import CLIPModel, ModifiedResNet, build_clip  # noqa: E402
from models.siamese.clip_tokenizer import CLIPTokenizer  # noqa: E402
from models.siamese.image_embedding import ImageEmbedder  # noqa: E402
from utils.batching import pad_batch, power_of_two_at_least  # noqa: E402
from utils.file_utils import DEFAULT_MAX_BYTES  # noqa: E402

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "weights.h5"
FORMAT_VERSION = 1


class CLIP:
    """An OpenAI CLIP model: image encoder, optional text encoder and tokenizer, logit scale.

    Attributes:
        model: the Keras `CLIPModel` (``model.visual``, ``model.text`` or None, ``model.logit_scale``).
        visual: ``model.visual``, (B, n_px, n_px, 3) float32 -> (B, embed_dim).
        embed_dim, input_resolution: the joint embedding size and the image side n_px.
        tokenizer: a `CLIPTokenizer`, or None for an image-only model.
        jit_compile: encode images through XLA-compiled functions; batches are then zero-padded to a power
            of two so that few shapes get compiled. ``"auto"`` (default): XLA for a ViT, plain graph mode for
            a ModifiedResNet, the faster of the two on CPU for each (``benchmarks/bench_clip.py``: ViT-B/32
            22.2 vs 20.2 img/s, RN50x4 3.95 vs 4.47 img/s); the text encoder is compiled unless False.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer | None = None, jit_compile="auto"):
        import tensorflow as tf

        self.model = model
        self.tokenizer = tokenizer
        self._text_jit = text_jit = bool(jit_compile)
        if jit_compile == "auto":
            jit_compile = not isinstance(model.visual, ModifiedResNet)
        self.jit_compile = bool(jit_compile)
        # graph mode (no XLA) is not padded: one trace with a free batch dimension serves every batch size
        self._encode_pixels = tf.function(lambda x: model.visual(x, training=False), jit_compile=self.jit_compile,
                                          reduce_retracing=not self.jit_compile)
        self._encode_tokens = None
        if model.text is not None:
            self._encode_tokens = tf.function(lambda t: model.text(t, training=False), jit_compile=text_jit,
                                              reduce_retracing=not text_jit)

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, visual_only=False, jit_compile="auto"):
        """An OpenAI CLIP ``.pt`` file (TorchScript archive or state dict) or a directory saved by `save`.

        ``visual_only`` skips the text encoder and the tokenizer (what ClipCap needs). A model name of
        OpenAI's list ("ViT-B/32", "RN50x4", ...) is downloaded once into the model store and its SHA-256
        verified (`utils.downloads.fetch_clip`; ``IMAGE_CAPTIONING_MIRROR`` / ``IMAGE_CAPTIONING_OFFLINE``
        apply).

        Example::

            clip = CLIP.from_pretrained("ViT-B/32")
            clip.similarity(["cat.jpg"], ["a cat", "a dog"])
        """
        path = cls._resolve(name_or_path)
        if os.path.isdir(path):
            return cls.load(path, jit_compile=jit_compile)
        from utils.convert.openai_clip import load_openai_clip

        model = load_openai_clip(path, visual_only=visual_only)
        tokenizer = None if visual_only else CLIPTokenizer(context_length=model.config["context_length"])
        return cls(model, tokenizer, jit_compile=jit_compile)

    @staticmethod
    def _resolve(name_or_path):
        """Map a model name or path to a local file / directory (names are downloaded once)."""
        from utils.downloads import CLIP_SOURCES, fetch_clip

        path = os.fspath(name_or_path)
        if os.path.exists(path):
            return path
        if path in CLIP_SOURCES:
            return str(fetch_clip(path))
        raise FileNotFoundError(
            f"{path!r} is not an existing file or directory, nor an OpenAI CLIP name "
            f"({', '.join(CLIP_SOURCES)}). Give the path of an OpenAI CLIP .pt file (e.g. ViT-B-32.pt) or of a "
            "directory written by CLIP.save."
        )

    def save(self, directory, overwrite=False):
        """Write config.json, weights.h5 (every variable by its path) and the tokenizer's vocabulary.

        Written to a new folder beside ``directory`` and renamed into place; an existing ``directory`` is
        replaced only when it is empty, or a saved CLIP (config.json with architecture "openai_clip") and
        ``overwrite``; anything else raises `utils.file_utils.UnsafePathError` and nothing is changed.
        """
        from utils.file_utils import replace_dir

        config = {
            "format_version": FORMAT_VERSION,
            "architecture": "openai_clip",
            "clip": self.model.config,
            "tokenizer": None if self.tokenizer is None else {"context_length": self.tokenizer.context_length},
        }

        def write(staging):
            import h5py

            with open(os.path.join(staging, CONFIG_FILENAME), "w") as f:
                json.dump(config, f, indent=2)
            with h5py.File(os.path.join(staging, WEIGHTS_FILENAME), "w") as f:
                for key, variable in _named_variables(self.model).items():
                    f.create_dataset(key, data=np.asarray(variable.numpy()))
            if self.tokenizer is not None:
                self.tokenizer.save(str(staging))

        replace_dir(directory, write, is_ours=is_saved_clip, overwrite=overwrite)
        return directory

    @classmethod
    def load(cls, directory, jit_compile="auto"):
        """Rebuild a model saved by `save` (strict: every variable present, nothing left over).

        A damaged config.json or weights.h5 raises `utils.convert.common.CheckpointError` naming the file.
        """
        from utils.convert.common import CheckpointError
        from utils.file_utils import UnsafePathError, read_regular_file

        config_path = os.path.join(directory, CONFIG_FILENAME)
        weights_path = os.path.join(directory, WEIGHTS_FILENAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory} is not a saved CLIP model: {os.path.basename(path)} missing")
        try:
            config = json.loads(read_regular_file(config_path, max_bytes=1 << 20))
        except (UnsafePathError, ValueError) as e:
            raise CheckpointError(f"{config_path} is not a readable config ({e}); save the CLIP again") from e
        if not isinstance(config, dict) or config.get("architecture") != "openai_clip":
            found = config.get("architecture") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{config_path} does not describe a CLIP model: {found!r}")
        if not isinstance(config.get("clip"), dict):
            raise CheckpointError(f"{config_path} lacks the key 'clip' (the architecture): the saved CLIP is "
                                  "damaged; save it again")
        try:
            model = build_clip(config["clip"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: invalid 'clip' architecture ({type(e).__name__}: {e}); the "
                                  "saved CLIP is damaged: save it again") from e
        try:
            _load_weights(model, weights_path)
        except OSError as e:  # h5py: truncated or not an HDF5 file
            raise CheckpointError(f"cannot read {weights_path} ({e}); the file is damaged: save the CLIP "
                                  "again") from e
        tokenizer = None
        if config.get("tokenizer") is not None:
            tokenizer = CLIPTokenizer.from_directory(directory, **config["tokenizer"])
        return cls(model, tokenizer, jit_compile=jit_compile)

    # --- properties ----------------------------------------------------------------------------------

    @property
    def visual(self):
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return int(self.model.config["embed_dim"])

    @property
    def input_resolution(self) -> int:
        return int(self.model.config["image_resolution"])

    @property
    def logit_scale(self) -> float:
        return float(np.exp(self.model.logit_scale.numpy()))

    # --- images --------------------------------------------------------------------------------------

    def image_embedder(self, exif_transpose=True, max_bytes=DEFAULT_MAX_BYTES):
        """The `ImageEmbedder` of this CLIP: read -> OpenAI preprocessing -> `encode_pixels`, as stages.

        ``exif_transpose=False`` reproduces OpenAI exactly (it ignores the EXIF orientation); image files
        above ``max_bytes`` are refused.
        """
        return ImageEmbedder.from_clip(self, exif_transpose=exif_transpose, max_bytes=max_bytes)

    def preprocess(self, image, exif_transpose=True):
        """One image (path / PIL / array) -> (n_px, n_px, 3) float32, OpenAI's transform channels-last.

        ``exif_transpose=False`` reproduces OpenAI exactly (it ignores the EXIF orientation).
        """
        return self.image_embedder(exif_transpose).load(image)

    def encode_pixels(self, pixels):
        """Preprocessed pixels (B, n_px, n_px, 3) -> raw (unnormalised) image features (B, embed_dim)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        n = self.input_resolution
        if pixels.ndim != 4 or pixels.shape[1:] != (n, n, 3):
            raise ValueError(f"encode_pixels expects (B, {n}, {n}, 3) pixels, got {pixels.shape}")
        count = len(pixels)
        if count == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        if self.jit_compile:  # XLA compiles once per shape: pad to a power of two (few shapes, < 2x work)
            pixels = pad_batch(pixels, power_of_two_at_least(count))
        return np.asarray(self._encode_pixels(pixels))[:count]

    def encode_image(self, images, batch_size=32, exif_transpose=True):
        """Images (a path, PIL image or array, or a list of them / an (N, H, W, C) array) -> (N, embed_dim)."""
        return self.image_embedder(exif_transpose).embed(images, batch_size=batch_size)

    # --- texts ---------------------------------------------------------------------------------------

    def tokenize(self, texts, truncate=False):
        if self.tokenizer is None:
            raise ValueError("this CLIP model has no text encoder (loaded with visual_only=True)")
        return self.tokenizer.tokenize(texts, truncate=truncate)

    def encode_text(self, texts, truncate=False):
        """A string or list of strings -> raw text features (N, embed_dim)."""
        token_ids = self.tokenize(texts, truncate=truncate)
        if self._encode_tokens is None:
            raise ValueError("this CLIP model has no text encoder (loaded with visual_only=True)")
        count = len(token_ids)
        if count == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        if self._text_jit:  # as encode_pixels: few compiled shapes
            token_ids = pad_batch(token_ids, power_of_two_at_least(count))
        return np.asarray(self._encode_tokens(token_ids))[:count]

    def similarity(self, images, texts, batch_size=32):
        """CLIP logits (N_img, N_txt): exp(logit_scale) * cosine similarity (OpenAI's logits_per_image)."""
        image_features = self.encode_image(images, batch_size=batch_size)
        text_features = self.encode_text(texts)
        return np.asarray(self.model.logits(image_features, text_features))


def _load_weights(model, weights_path):
    """Assign every variable of ``model`` from weights.h5 (strict: all present, nothing left over)."""
    import h5py

    variables = _named_variables(model)
    with h5py.File(weights_path, "r") as f:
        stored = {}

        def collect(name, obj):  # visititems stops at the first non-None return
            if isinstance(obj, h5py.Dataset):
                stored[name] = obj

        f.visititems(collect)
        missing = sorted(set(variables) - set(stored))
        unexpected = sorted(set(stored) - set(variables))
        mismatched = [
            f"{k}: {stored[k].shape} vs {tuple(v.shape)}"
            for k, v in variables.items()
            if k in stored and tuple(stored[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{weights_path} does not match its config: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, mis-shaped {mismatched[:5]}"
            )
        for key, variable in variables.items():
            variable.assign(stored[key][()])


def is_saved_clip(directory) -> bool:
    """Whether ``directory`` is a CLIP this library saved (its config.json names "openai_clip")."""
    from utils.downloads import is_saved_model

    return is_saved_model(directory, architecture="openai_clip")


def _named_variables(model):
    """{"visual/<path>" | "text/<path>" | "logit_scale": variable}: stable names for the weights file."""
    named = {f"visual/{v.path}": v for v in model.visual.weights}
    if model.text is not None:
        named.update({f"text/{v.path}": v for v in model.text.weights})
    named["logit_scale"] = model.logit_scale
    if len(named) != len(model.visual.weights) + (len(model.text.weights) if model.text else 0) + 1:
        raise RuntimeError("CLIP variables do not have unique paths")
    return named
