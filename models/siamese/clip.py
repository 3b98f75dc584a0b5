"""`CLIP`: the object users call to embed images and texts with an OpenAI CLIP model, in Keras.

It ties together the image path (`models.siamese.image_embedding.ImageEmbedder`: reading with
`utils.image_io`, OpenAI-identical preprocessing with `utils.clip_preprocessing`), the Keras encoders
(`custom_architectures.clip_arch`) and the CLIP tokenizer (`models.siamese.clip_tokenizer`).
``from_pretrained`` converts an OpenAI ``.pt`` (TorchScript or state dict; no torch needed, nothing
in the file run: `utils.convert.torch_file`); ``save`` writes a
saved-model folder (format 2, `models.siamese.clip_saving`: config.json, model.weights.h5, metadata.json,
README.md and the tokenizer's vocabulary) that ``load`` reads without torch (format-1 folders too).

Example::

    clip = CLIP.from_pretrained("ViT-B-32.pt")
    clip.save("pretrained_models/clip_vit_b32")
    clip = CLIP.load("pretrained_models/clip_vit_b32")
    image_features = clip.encode_image(["cat.jpg", "dog.png"])     # (2, 512), unnormalised
    logits = clip.similarity(["cat.jpg"], ["a cat", "a dog"])       # (1, 2)
"""

import os

from utils.tf_startup import import_tensorflow_for_library

import_tensorflow_for_library()  # no C++ start-up lines unless the user set TF_CPP_MIN_LOG_LEVEL

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from custom_architectures.batching import pad_batch, power_of_two_at_least  # noqa: E402
from custom_architectures.clip_arch import CLIPModel, ModifiedResNet  # noqa: E402
from custom_architectures.compile_policy import CompilePolicy  # noqa: E402
from custom_layers.clip_layers import ResidualAttentionBlock, compiles_per_shape  # noqa: E402
from custom_layers.shared_steps import shared_steps  # noqa: E402
from models import check_jit_compile  # noqa: E402
from models.precision import DEFAULT_PRECISION  # noqa: E402
from models.siamese.clip_tokenizer import CLIPTokenizer  # noqa: E402
from models.siamese.image_embedding import ImageEmbedder  # noqa: E402
from utils.devices import device_scope  # noqa: E402
from utils.file_utils import DEFAULT_MAX_BYTES  # noqa: E402


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
            True / False / "auto", as `ClipCap` takes it. Under "auto" the first call of each batch bucket
            runs eagerly and unpadded (nothing traced or compiled: a one-image run never compiles), and the
            bucket is compiled when it recurs (`custom_architectures.compile_policy`). After construction
            this attribute is a bool: whether the compiled form is XLA (else graph mode).
        source, source_sha256: the OpenAI file this model was converted from and its SHA-256 (None when
            unknown), recorded in a saved folder's metadata.json.
        device: where the encoders run: None (TensorFlow's placement, the default), or "cpu", "gpu",
            "gpu:N" set with `to` (`utils.devices`).
        precision: "float32" (the default) or "bfloat16" (`models.precision`), set at load or with
            `to_precision`; features come out float32 either way.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer | None = None, jit_compile="auto",
                 text_loader=None):

        jit_compile = check_jit_compile(jit_compile)
        # "auto": eager on a bucket's first call, then compiled; True / False: compiled from the first call
        self._policy = CompilePolicy("auto" if jit_compile == "auto" else True)
        self.model = model
        self.tokenizer = tokenizer
        self.source = self.source_sha256 = None
        self.device = None  # TensorFlow device string (utils.devices.resolve_device); see `to`
        self.precision = DEFAULT_PRECISION  # models.precision: see `to_precision`
        self._text_jit = bool(jit_compile)
        self._jit_request = jit_compile  # as given: "auto" lets `to_precision` choose the compiled form
        if jit_compile == "auto":
            jit_compile = not isinstance(model.visual, ModifiedResNet)
        self.jit_compile = bool(jit_compile)
        self._compile_visual()
        self._encode_tokens = None
        # () -> (text tower, tokenizer): a text encoder saved with the model but not loaded yet (`load_text`)
        self._text_loader = text_loader if model.text is None else None
        if model.text is not None:
            self._compile_text()

    def _compile_visual(self):
        visual = self.model.visual
        # graph mode (no XLA) is not padded: one trace with a free batch dimension serves every batch size,
        # unless the graph holds XLA-compiled parts (a bfloat16 ViT's blocks), which compile once per shape
        self._encode_pixels = tf.function(lambda x, run: _encode_or_zeros(visual, x, run, self.embed_dim),
                                          jit_compile=self.jit_compile, reduce_retracing=not self.jit_compile)
        self._pad_pixels = self.jit_compile or compiles_per_shape(visual)

    def _compile_text(self):
        text, text_jit = self.model.text, self._text_jit
        self._pad_tokens = text_jit or compiles_per_shape(text)  # as `_pad_pixels`
        self._encode_tokens = tf.function(lambda t, run: _encode_or_zeros(text, t, run, self.embed_dim),
                                          jit_compile=text_jit, reduce_retracing=not text_jit)

    def _build(self, call):
        """A background build (`CompilePolicy.tier`): ``call`` (one call of a compiled encoder with ``run`` False,
        which compiles its program and computes nothing) on this model's device as it is now."""
        device = self.device

        def build():
            with device_scope(device):
                call()

        return build

    def wait_for_builds(self, timeout=None):
        """Wait for the encoders' programs being compiled in the background (`CompilePolicy.wait`); True when
        all are done (tests, benchmarks)."""
        return self._policy.wait(timeout)

    @property
    def has_text(self) -> bool:
        """Whether this CLIP has its text encoder and tokenizer (loaded, or saved and loaded when first used)."""
        return self._text_loader is not None or (self.model.text is not None and self.tokenizer is not None)

    def load_text(self):
        """Load the text encoder and tokenizer now if they were left for later (`CLIP.load` with
        ``lazy_text``, as `ClipCap.load` does); ``model`` then holds both towers. Returns self."""
        if self._text_loader is not None:
            text, tokenizer = self._text_loader()
            model = CLIPModel(self.model.visual, text, name=self.model.name)
            model.logit_scale.assign(self.model.logit_scale)
            self.model, self.tokenizer, self._text_loader = model, tokenizer, None
            self._compile_text()
        return self

    def to(self, device):
        """Run the encoders on ``device`` ("cpu", "gpu", "gpu:N", or None for TensorFlow's placement);
        returns self. A device TensorFlow does not see is a ValueError naming those it sees."""
        from utils.devices import resolve_device

        self.device = resolve_device(device)
        return self

    def to_precision(self, precision, warn=True):
        """Run the encoders (the text one too, when it is read later) in ``precision`` (a name or alias of
        `models.precision.PRECISIONS`: "float32", "bfloat16" / "bf16"); returns self. Weights cast once, now;
        only a float32 model changes precision. ``warn``: log one line when this CPU lacks the instructions
        that make ``precision`` fast (`models.precision.warn_if_slow`)."""
        from models.precision import check_runnable, resolve_precision, warn_if_slow

        precision = resolve_precision(precision)
        if not precision.clip:
            raise ValueError(f"precision {precision.name!r} applies to ClipCap's GPT-2 only, not to a CLIP")
        if precision.name == self.precision:
            return self
        if self.precision != DEFAULT_PRECISION:
            raise ValueError(f"this CLIP runs in {self.precision}; only a float32 model changes precision "
                             f"(load it again with precision={precision.name!r})")
        check_runnable(precision)
        if warn:
            warn_if_slow(precision)
        text = None if self.model.text is None else precision.apply(self.model.text)
        model = CLIPModel(precision.apply(self.model.visual), text, name=self.model.name)
        model.logit_scale.assign(self.model.logit_scale)
        self.model, self.precision = model, precision.name
        if self._jit_request == "auto" and not precision.xla:  # graph mode: oneDNN's kernels, not XLA's
            self.jit_compile = self._text_jit = False
        self._compile_visual()
        if text is not None:
            self._compile_text()
        if self._text_loader is not None:  # read later: cast when read
            loader = self._text_loader
            self._text_loader = lambda: _cast_text(loader(), precision)
        return self

    def in_precision(self, precision, warn=True):
        """A new `CLIP` running in ``precision``, this one unchanged (`to_precision` on a copy: same weights
        cast once, tokenizer, source, device and compile request; a text encoder left for later is cast when
        read). What a ClipCap cast to bfloat16 uses: a CLIP it shares with a float32 model (``ClipCap.load(...,
        clip=other.clip, precision="bf16")``) stays float32 for that model. Returns self when it already runs
        in ``precision``.

        Example::

            fast = clip.in_precision("bf16")     # clip still encodes in float32
        """
        from models.precision import resolve_precision

        if resolve_precision(precision).name == self.precision:
            return self
        twin = CLIP(self.model, self.tokenizer, jit_compile=self._jit_request, text_loader=self._text_loader)
        twin.source, twin.source_sha256, twin.device, twin.precision = (self.source, self.source_sha256,
                                                                         self.device, self.precision)
        return twin.to_precision(precision, warn=warn)

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, visual_only=False, jit_compile="auto"):
        """Convert an OpenAI CLIP ``.pt`` file (TorchScript archive or state dict; no torch needed), or download
        and convert an OpenAI name. (A directory saved by `save` is read by `load`, also when given here.)

        ``visual_only`` skips the text encoder and the tokenizer (what ClipCap needs). A model name of
        OpenAI's list ("ViT-B/32", "RN50x4", ...) is downloaded once into the model store and its SHA-256
        verified (`models.siamese.presets.fetch_clip`; ``IMAGE_CAPTIONING_MIRROR`` / ``IMAGE_CAPTIONING_OFFLINE``
        apply).

        Example::

            clip = CLIP.from_pretrained("ViT-B/32")
            clip.similarity(["cat.jpg"], ["a cat", "a dog"])
        """
        path = cls._resolve(name_or_path)
        if os.path.isdir(path):
            return cls.load(path, jit_compile=jit_compile)
        from utils.convert.openai_clip import load_openai_clip
        from utils.downloads import sha256_of

        model = load_openai_clip(path, visual_only=visual_only)
        tokenizer = None if visual_only else CLIPTokenizer(context_length=model.config["context_length"])
        clip = cls(model, tokenizer, jit_compile=jit_compile)
        clip.source, clip.source_sha256 = os.path.basename(path), sha256_of(path)
        return clip

    @staticmethod
    def _resolve(name_or_path):
        """Map a model name or path to a local file / directory (names are downloaded once)."""
        from models.siamese.presets import CLIP_SOURCES, fetch_clip

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
        """Write a saved CLIP folder (format 2, `models.siamese.clip_saving`): config.json, model.weights.h5
        (float16 where exact), metadata.json, README.md and the tokenizer's vocabulary.

        Written to a new folder beside ``directory`` and renamed into place; an existing ``directory`` is
        replaced only when it is empty, or a saved CLIP (config.json with architecture "openai_clip") and
        ``overwrite``; anything else raises `utils.file_utils.UnsafePathError` and nothing is changed.
        """
        from models.siamese.clip_saving import save_clip

        if self.precision != DEFAULT_PRECISION:
            raise ValueError(f"this CLIP runs in {self.precision} (weights rounded at load): saved models are "
                             "float32; save the model loaded without precision=")
        return save_clip(self, directory, overwrite=overwrite)

    @classmethod
    def load(cls, name_or_directory, jit_compile="auto", lazy_text=False, precision=DEFAULT_PRECISION):
        """Rebuild a saved CLIP (no torch needed): a folder written by `save` (format 2, or format 1 from
        before it) or a name in the model store. Strict: every weight present, nothing left over; a damaged
        config.json or weights file raises `utils.convert.common.CheckpointError` naming the file.
        ``lazy_text``: the text encoder and tokenizer are read when first used (`load_text`), not now.
        ``precision``: "float32" (default) or "bfloat16" ("bf16"), see `to_precision`; an unknown name is a
        ValueError, one this process cannot run a `models.precision.PrecisionUnavailableError`
        (`models.precision.check_runnable`), raised before anything is read."""
        from models.precision import check_runnable
        from models.siamese.clip_saving import load_clip
        from utils.model_store import model_dir, recover_model_dir

        precision = check_runnable(precision)  # an unknown name, or one this process cannot run: before reading
        clip = load_clip(cls, recover_model_dir(model_dir(name_or_directory)), jit_compile=jit_compile,
                         lazy_text=lazy_text)
        return clip.to_precision(precision)

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

    def encode_pixels(self, pixels, compile_now=None):
        """Preprocessed pixels (B, n_px, n_px, 3) -> raw (unnormalised) image features (B, embed_dim).

        ``compile_now``: None follows ``jit_compile`` (under "auto", a bucket's first call runs eagerly); True
        compiles now (a caller that knows the bucket will recur, e.g. a long `ClipCap.predict` run)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        n = self.input_resolution
        if pixels.ndim != 4 or pixels.shape[1:] != (n, n, 3):
            raise ValueError(f"encode_pixels expects (B, {n}, {n}, 3) pixels, got {pixels.shape}")
        count = len(pixels)
        if count == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        bucket = power_of_two_at_least(count)
        size = bucket if self._pad_pixels else count  # XLA compiles once per shape: a power of two (< 2x work)
        build = self._build(lambda: self._encode_pixels(tf.zeros((size, n, n, 3)), tf.constant(False)))
        with device_scope(self.device), self._policy.tier(("image", bucket), build, force=compile_now) as compiled:
            if not compiled:  # a bucket's first calls (until its program is built in the background): eager
                return np.asarray(self.model.visual(pixels, training=False), np.float32)
            pixels = pad_batch(pixels, size)
            return np.asarray(self._encode_pixels(tf.constant(pixels), tf.constant(True)), np.float32)[:count]

    def will_compile(self, count, compile_now=None):
        """Whether `encode_pixels` on ``count`` images would compile in the foreground (for status lines said
        before it): under "auto" only when ``compile_now`` is True, since a recurring bucket is compiled in the
        background while its calls run eagerly."""
        if self._policy.jit_compile == "auto" and compile_now is None:
            return False
        return self._policy.would_compile(("image", power_of_two_at_least(count)), force=compile_now)

    def encode_image(self, images, batch_size=32, exif_transpose=True):
        """Images (a path, PIL image or array, or a list of them / an (N, H, W, C) array) -> (N, embed_dim)."""
        return self.image_embedder(exif_transpose).embed(images, batch_size=batch_size)

    # --- texts ---------------------------------------------------------------------------------------

    def tokenize(self, texts, truncate=False):
        self.load_text()
        if self.tokenizer is None:
            raise ValueError("this CLIP model has no text encoder (loaded with visual_only=True)")
        return self.tokenizer.tokenize(texts, truncate=truncate)

    def encode_text(self, texts, truncate=False, compile_now=None):
        """A string or list of strings -> raw text features (N, embed_dim).

        Compiled as `encode_pixels` is: batches padded to a power of two, and under "auto" a bucket's first
        call runs eagerly (a one-image re-ranking compiles nothing); ``compile_now=True`` compiles now."""
        token_ids = self.tokenize(texts, truncate=truncate)
        if self._encode_tokens is None:
            raise ValueError("this CLIP model has no text encoder (loaded with visual_only=True)")
        count = len(token_ids)
        if count == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        token_ids = _trim_context(token_ids)
        bucket = power_of_two_at_least(count)
        size = bucket if self._pad_tokens else count  # as encode_pixels: few compiled shapes
        build = self._build(lambda: self._encode_tokens(tf.zeros((size, token_ids.shape[1]), tf.int32),
                                                        tf.constant(False)))
        key = ("text", bucket, token_ids.shape[1])
        with device_scope(self.device), self._policy.tier(key, build, force=compile_now) as compiled:
            if not compiled:  # as encode_pixels: eager until the bucket's program is built
                return np.asarray(self.model.text(token_ids, training=False), np.float32)
            token_ids = pad_batch(token_ids, size)
            return np.asarray(self._encode_tokens(tf.constant(token_ids), tf.constant(True)), np.float32)[:count]

    def encode_token_ids(self, token_ids, multiple=8):
        """(N, context_length) token ids (`tokenize`) -> raw text features (N, embed_dim), the padding columns
        after the longest text cut first (to a multiple of ``multiple``: few compiled shapes). Equal to
        `encode_text`'s features (the text tower is causal and reads the end-of-text position) for
        ``context_length / T`` times less work on short texts, such as MAGIC's partial captions."""
        token_ids = np.asarray(token_ids, np.int32)
        if self._encode_tokens is None:
            raise ValueError("this CLIP model has no text encoder (loaded with visual_only=True)")
        count = len(token_ids)
        if count == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        used = int(np.max(np.flatnonzero(token_ids.any(axis=0)), initial=0)) + 1
        token_ids = token_ids[:, : min(-(-used // multiple) * multiple, token_ids.shape[1])]
        if self._pad_tokens:  # as encode_pixels: few compiled shapes
            token_ids = pad_batch(token_ids, power_of_two_at_least(count))
        with device_scope(self.device):
            return np.asarray(self._encode_tokens(tf.constant(token_ids), tf.constant(True)), np.float32)[:count]

    def similarity(self, images, texts, batch_size=32):
        """CLIP logits (N_img, N_txt): exp(logit_scale) * cosine similarity (OpenAI's logits_per_image)."""
        image_features = self.encode_image(images, batch_size=batch_size)
        text_features = self.encode_text(texts)
        return np.asarray(self.model.logits(image_features, text_features))


def _encode_or_zeros(tower, inputs, run, width):
    """A compiled encoder's body: the tower's float32 features (B, width) of ``inputs``, or zeros when ``run`` is
    False (a background build compiles the program without computing, as the mapper's: ``tf.cond``)."""
    def features():
        with shared_steps(tower, ResidualAttentionBlock):  # the blocks traced once, not once each
            return tf.cast(tower(inputs, training=False), tf.float32)

    return tf.cond(run, features, lambda: tf.zeros((tf.shape(inputs)[0], width), tf.float32))


def _cast_text(loaded, precision):
    """(text tower, tokenizer) of `CLIP.load_text`'s loader with the tower in ``precision``."""
    text, tokenizer = loaded
    return precision.apply(text), tokenizer


def _trim_context(token_ids):
    """(N, context) token ids -> the first columns that hold every row's tokens, their count rounded up to a
    power of two (>= 8, few compiled shapes). The text encoder is causal and reads its features at the
    end-of-text token, so the padding after it changes nothing: a caption of 20 tokens costs ~4x less than the
    full 77 columns, with the same features (to float rounding)."""
    used = np.flatnonzero(np.any(token_ids != 0, axis=0))
    width = min(token_ids.shape[1], max(8, power_of_two_at_least(int(used[-1]) + 1 if len(used) else 1)))
    return token_ids[:, :width]


def is_saved_clip(directory) -> bool:
    """Whether ``directory`` is a CLIP this library saved (its config.json names "openai_clip")."""
    from models.siamese.clip_saving import is_saved_clip as check

    return check(directory)
