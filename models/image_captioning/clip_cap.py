"""`ClipCap`: image captioning with a CLIP prefix and GPT-2 (Mokady et al., arXiv 2111.09734), in Keras.

A CLIP image embedding (B, D) is mapped to a GPT-2 prefix of K embeddings (B, K, C) by the mapper (MLP or
transformer; the released transformer weights expect the embedding L2-normalised first, the MLP weights the
raw one: ``config["normalize_prefix"]``), and GPT-2 continues the prefix with a caption. Decoding is batched,
KV-cached and XLA-compiled (`custom_architectures.generation_utils`); greedy and beam search give the same
captions as the official ``generate2`` and ``generate_beam``.

The network is one Keras model, `ClipCapBackbone` (mapper + GPT-2 + the normalisation policy), which
inference, teacher-forced logits and training all call. ``from_pretrained`` converts an official ``.pt``
checkpoint (no torch needed); ``save`` writes a saved-model folder (format 2: config.json, model.weights.h5,
tokenizer files, the CLIP when there is one, metadata.json, README.md) that ``load`` restores without torch
(`models.image_captioning.saving`; format-1 folders load too).

Example::

    model = ClipCap.from_pretrained("coco_weights.pt", clip="ViT-B-32.pt", tokenizer="gpt2", name="coco")
    model = ClipCap.load("coco")                       # pretrained_models/coco/
    model.caption("cat.jpg")                           # ['A cat sitting on a couch.']
    model.generate(model.encode_images(["cat.jpg"]), method="beam", beam_size=5, num_captions=3)
"""

import os
from types import MappingProxyType

from utils.tf_startup import import_tensorflow_for_library

import_tensorflow_for_library()  # no C++ start-up lines unless the user set TF_CPP_MIN_LOG_LEVEL

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from custom_architectures.batching import pad_batch, power_of_two_at_least  # noqa: E402
from custom_architectures.compile_policy import CompilePolicy  # noqa: E402
from custom_architectures.decoding import as_decoding  # noqa: E402
from custom_architectures.decoding_options import MODEL_STOP_TOKEN  # noqa: E402
from custom_architectures.generation_utils import PrefixDecoder  # noqa: E402
from custom_architectures.guided_decoding import GuidedDecoder  # noqa: E402
from custom_architectures.quantization import is_quantized  # noqa: E402
from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone, MapperLayer  # noqa: E402
from custom_layers.shared_steps import shared_steps  # noqa: E402
from models import check_jit_compile  # noqa: E402
from models.image_captioning.saving import ModelLoadError  # noqa: E402, F401
from models.precision import (  # noqa: E402
    DEFAULT_PRECISION,
    check_runnable,
    precision_identity,
    resolve_precision,
    warn_if_slow,
)
from utils.devices import device_scope  # noqa: E402


def _project(backbone, embeddings, run):
    """The compiled mapper (`ClipCap._project`): float32 prefixes (B, K, C) of ``embeddings``, or zeros when
    ``run`` is False (a background build compiles the program without computing: ``tf.cond``)."""
    shape = (tf.shape(embeddings)[0], backbone.prefix_length, backbone.gpt2.n_embd)

    def prefix():
        with shared_steps(backbone, MapperLayer):  # a transformer mapper's layers traced once, not once each
            return tf.cast(backbone.prefix(embeddings), tf.float32)

    return tf.cond(run, prefix, lambda: tf.zeros(shape, tf.float32))


class ClipCap:
    """A ClipCap captioner: ``clip`` (optional) -> ``backbone`` (mapper + GPT-2), with its GPT-2 ``tokenizer``.

    Attributes:
        backbone: the `ClipCapBackbone` (one Keras model: mapper, GPT-2, ``normalize_prefix``).
        clip: a `models.siamese.clip.CLIP` (image encoder, and the text encoder that ``rerank="clip"`` uses:
            ``clip.has_text``; a loaded model reads it when first used, ``clip.load_text()``) or None (then
            caption CLIP embeddings given to `generate`).
        tokenizer: a `utils.gpt2_tokenizer.GPT2Tokenizer` (what `load_gpt2_tokenizer` gives; a
            ``GPT2TokenizerFast`` works too).
        info: what is not architecture: ``name`` (where `save` / `predict` write by default), ``checkpoint``
            and ``checkpoint_sha256`` (the converted file), ``clip_name`` (the OpenAI CLIP the mapper expects),
            ``stop_token`` (the token that ends its captions; None: "." as for every English GPT-2, see
            `stop_token`).
        mapper, gpt2, config: read-only views (``backbone.mapper``, ``backbone.gpt2``, and a mapping of the
            backbone's description with ``info``: mapping_type, prefix_length, prefix_size, normalize_prefix,
            gpt2, name, checkpoint, ...).
        jit_compile: True, False or "auto" (as `CLIP`'s): XLA-compiled decoding and mapper unless False;
            under "auto" (default) the first call of each shape (batch bucket, method and its options,
            max_length) runs uncompiled and unpadded, and the shape is compiled when it recurs
            (`custom_architectures.compile_policy`), so a one-image run compiles nothing. The CLIP loaded
            with the model gets the same value.
        device: where mapper, GPT-2 and CLIP run: None (TensorFlow's placement, the default) or "cpu", "gpu",
            "gpu:N" set with `to` (`utils.devices`; a device TensorFlow does not see is an error).
        precision: the numeric precision mapper, GPT-2 and CLIP run in, a name of `models.precision.PRECISIONS`:
            "float32" (the default) or "bfloat16", set at load (``load(..., precision=...)``) or with
            `to_precision`. A bfloat16 model has its own `identity` and is not saved (save the float32 one).
    """

    INFO_KEYS = ("name", "checkpoint", "checkpoint_sha256", "clip_name", "stop_token")
    #: replacing one of these drops the recorded identity (`identity`)
    _IDENTITY_PARTS = ("backbone", "tokenizer", "clip")

    def __init__(self, backbone, tokenizer, clip=None, jit_compile="auto", info=None):
        if not isinstance(backbone, ClipCapBackbone):
            raise TypeError(f"ClipCap needs a ClipCapBackbone, got {type(backbone).__name__}")
        info = dict(info or {})
        unknown = sorted(set(info) - set(self.INFO_KEYS))
        if unknown:
            raise ValueError(f"unknown ClipCap info keys {unknown}: expected some of {self.INFO_KEYS}")
        self._identity = None  # (identity, normalize_prefix) recorded at load / save, see `identity`
        self.backbone = backbone
        self.tokenizer = tokenizer
        if info.get("stop_token") is not None:  # a recorded stop token: refused now if not one token
            self._check_stop_token(info["stop_token"])
        self.info = {k: info.get(k) for k in self.INFO_KEYS}
        self.clip = clip
        self.jit_compile = check_jit_compile(jit_compile)
        self._policy = CompilePolicy(self.jit_compile)
        self.device = None  # TensorFlow device string (utils.devices.resolve_device); see `to`
        # models.precision (see `to_precision`): a GPT-2 built with int8 weights (an int8 folder) runs in int8
        self.precision = "int8" if is_quantized(backbone.gpt2) else DEFAULT_PRECISION
        self._compile()
        if clip is not None:
            self._check_clip(clip, "the given CLIP model")

    def __setattr__(self, name, value):
        if name in self._IDENTITY_PARTS:  # another backbone, tokenizer or CLIP: another model
            self.__dict__["_identity"] = None
        super().__setattr__(name, value)

    @property
    def uses_xla(self) -> bool:
        """Whether the compiled form of mapper and decoding is XLA (else a plain TensorFlow graph): XLA
        unless ``jit_compile`` is False, or "auto" with a precision XLA runs slowly (bfloat16 on CPU,
        `models.precision.Precision.xla`)."""
        return self.jit_compile is True or (bool(self.jit_compile) and resolve_precision(self.precision).xla)

    def _compile(self):
        backbone = self.backbone
        self._xla = self.uses_xla  # the compiled form ("auto": after a shape's first call)
        self.decoder = PrefixDecoder(backbone.gpt2, xla=self._xla)
        self.guided_decoder = GuidedDecoder(backbone.gpt2)  # MAGIC (method="magic")
        self._project = tf.function(lambda e, run: _project(backbone, e, run), jit_compile=self._xla)
        self._logits = tf.function(lambda e, ids: backbone(e, ids), jit_compile=self._xla)

    def to(self, device):
        """Run mapper, GPT-2 and the CLIP (when there is one) on ``device`` ("cpu", "gpu", "gpu:N", or None
        for TensorFlow's placement); returns self. Raises ValueError for a device TensorFlow does not see."""
        from utils.devices import resolve_device

        device = resolve_device(device)
        if self.clip is not None:
            self.clip.to(device)
        self.device = device
        return self

    def to_precision(self, precision):
        """Run mapper, GPT-2 and the CLIP (when there is one) in ``precision`` (a name or alias of
        `models.precision.PRECISIONS`: "float32", "bfloat16" / "bf16"); returns self.

        The float32 weights are cast once, now (`models.precision.cast_model`); the compiled functions are
        rebuilt. Only a float32 model changes precision (the rounded weights cannot give float32 back: load the
        model again). Logs one warning line when this CPU lacks the instructions that make ``precision``
        fast (`models.precision.warn_if_slow`). Raises ValueError for an unknown name, and
        `models.precision.PrecisionUnavailableError` for one this process cannot run (`check_runnable`)."""
        precision = resolve_precision(precision)
        if precision.name == self.precision:
            return self
        if resolve_precision(self.precision).savable:
            raise ValueError(f"this model holds {self.precision} weights (saved so); its float32 weights are not "
                             "here: load the float32 model it was made from")
        if self.precision != DEFAULT_PRECISION:
            raise ValueError(f"this model runs in {self.precision}; only a float32 model changes precision "
                             f"(load it again with precision={precision.name!r})")
        check_runnable(precision)
        warn_if_slow(precision)
        recorded = self._identity  # the float32 weights' identity: `identity` adds the precision to it
        if precision.savable and recorded is not None and recorded[0] is not None:
            # saved as it is: the identity it will record is the float32 one's in this precision
            recorded = (precision_identity(recorded[0], precision.name), recorded[1])
        self.backbone = precision.apply(self.backbone)
        if self.clip is not None and precision.clip:  # a new CLIP: one shared with a float32 model stays float32
            self.clip = self.clip.in_precision(precision, warn=False)
        self._identity = recorded
        self.precision = precision.name
        self._compile()
        return self

    # --- construction --------------------------------------------------------------------------------

    @property
    def mapper(self):
        return self.backbone.mapper

    @property
    def gpt2(self):
        return self.backbone.gpt2

    @property
    def config(self):
        """A read-only mapping: the backbone's `describe` (architecture, ``normalize_prefix``, ``gpt2``) and
        `info` (``stop_token``: the one in effect). Change ``info`` / ``normalize_prefix`` through their
        attributes."""
        return MappingProxyType({**self.backbone.describe(), **self.info, "stop_token": self.stop_token})

    @property
    def name(self):
        return self.info.get("name")

    @name.setter
    def name(self, value):
        from utils.file_utils import check_model_name

        self.info["name"] = None if value is None else check_model_name(value)

    @property
    def identity(self) -> str:
        """``"sha256:<hex>"``: what this model's cached captions are keyed by (`models.image_captioning.identity`).

        The identity recorded when the model was loaded or saved, while its backbone, tokenizer, CLIP and
        ``normalize_prefix`` are those it was recorded for (a folder that records none: computed from the
        weights at the first use and kept); otherwise computed from the weights in memory, every time (a model
        built in memory may be changed between two calls)."""
        from models.image_captioning.identity import compute_identity

        if self._identity is not None and self._identity[1] == self.normalize_prefix:
            if self._identity[0] is None:  # loaded from a folder that records none: computed once
                self._identity = (compute_identity(self), self._identity[1])
            return self._in_precision(self._identity[0])
        return self._in_precision(compute_identity(self))

    def _in_precision(self, identity):
        """The identity of the weights held, in this model's precision: a precision applied at load
        (bfloat16) keys the float32 identity apart (`models.precision.precision_identity`); one whose weights
        are saved (int8) recorded its own identity when it was made (`to_precision`), kept as it is. A CLIP
        that runs in another precision than this model implies (a float32 model given a bfloat16 CLIP) keys it
        apart again: its features, hence its captions, differ."""
        precision = resolve_precision(self.precision)
        identity = identity if precision.savable else precision_identity(identity, self.precision)
        clip_precision = getattr(self.clip, "precision", DEFAULT_PRECISION)
        if self.clip is not None and clip_precision != (precision.name if precision.clip else DEFAULT_PRECISION):
            identity = precision_identity(identity, clip_precision, part="clip")
        return identity

    def record_identity(self, identity):
        """Set the identity of this model as it is now (`identity`): done by `load` and `save`; None: the
        weights as loaded, whose identity is computed when first needed."""
        self._identity = (identity, self.normalize_prefix)

    def forget_identity(self):
        """Drop the recorded identity: call it after changing the weights in place (training, set_weights)."""
        self._identity = None

    @property
    def stop_token(self) -> str:
        """The token that ends this model's captions (kept in the text, unless it is a special token such as
        ``<|endoftext|>``): the one recorded with the model (``convert`` / ``train --stop-token``, saved in
        config.json), else ``"."`` (English GPT-2; folders saved before it was recorded). Setting it checks
        that it is one token of the vocabulary (`utils.tokenizer.TokenizerError` naming both otherwise)."""
        from utils.tokenizer import DEFAULT_STOP_TOKEN

        return self.info.get("stop_token") or DEFAULT_STOP_TOKEN

    @stop_token.setter
    def stop_token(self, value):
        self._check_stop_token(value)
        self.info["stop_token"] = value
        self._identity = None  # another stop token, other captions: `identity` covers it

    def _check_stop_token(self, token):
        from utils.tokenizer import stop_token_id

        return stop_token_id(self.tokenizer, token)

    @property
    def normalize_prefix(self) -> bool:
        return self.backbone.normalize_prefix

    @normalize_prefix.setter
    def normalize_prefix(self, value):
        self.backbone.normalize_prefix = bool(value)
        self._compile()  # the compiled functions read the policy when traced

    @property
    def prefix_length(self) -> int:
        return self.backbone.prefix_length

    @property
    def prefix_size(self) -> int:
        return self.backbone.prefix_size

    def _check_clip(self, clip, clip_name):
        from utils.convert.clipcap import check_clip_matches

        check_clip_matches(clip.embed_dim, self.config, clip_name=clip_name,
                           checkpoint_name=self.info.get("checkpoint") or "the ClipCap mapper")

    @classmethod
    def from_pretrained(cls, source, clip=None, tokenizer="gpt2", name=None, normalize_prefix=None,
                        jit_compile="auto", overwrite=False, clip_name=None, stop_token=None):
        """Convert an official ClipCap checkpoint (no torch needed), or download and convert an official name.

        Args:
            source: path to an official ClipCap ``.pt`` (``coco_weights.pt``, ``transformer_weights.pt``...), or
                an official model name (``coco``, ``conceptual``, ``coco_transformer``: downloaded, converted
                and saved into the model store once, as `load` does for them).
            clip: an OpenAI CLIP name ("ViT-B/32", downloaded once), path to an OpenAI CLIP ``.pt`` (or a saved
                CLIP directory), a `CLIP` instance, or None.
                Its embedding size must equal the mapper's prefix size (else `CheckpointError`).
            tokenizer: a GPT-2 tokenizer name ("gpt2", from the HF cache), a local directory, or a tokenizer.
            name: when given, the converted model is saved to ``pretrained_models/<name>/``; a plain name
                only (ValueError for "", "..", "a/b", "/abs"), checked before any work.
            normalize_prefix: override the checkpoint kind's default (transformer: True, MLP: False).
            overwrite: replace an existing saved model of that name (see `save`).
            clip_name: the OpenAI name of the CLIP the mapper expects (recorded for `save_official`; found
                by itself when ``clip`` is such a name).
            stop_token: the token that ends the captions, recorded with the model (None: "."); refused before
                any conversion unless it is one token of the tokenizer's vocabulary.
        """
        from models.image_captioning.saving import convert_official

        return convert_official(cls, source, clip=clip, tokenizer=tokenizer, name=name,
                                normalize_prefix=normalize_prefix, jit_compile=jit_compile, overwrite=overwrite,
                                clip_name=clip_name, stop_token=stop_token)

    def save(self, name_or_directory=None, overwrite=False):
        """Write this model as a saved-model folder (format 2, `models.image_captioning.saving`): config.json,
        model.weights.h5, tokenizer/, clip/ (when there is a CLIP), metadata.json and a README.md card.

        ``name_or_directory``: a plain name (saved under ``pretrained_models/<name>``), a directory, or None
        (this model's name). Written to a new folder beside it and renamed into place; an existing folder is
        replaced only when it is empty, or a saved ClipCap and ``overwrite``; anything else raises
        `utils.file_utils.UnsafePathError` and nothing is changed. Returns the directory (str).
        """
        from models.image_captioning.saving import save_clipcap

        self._check_saveable()
        return save_clipcap(self, name_or_directory, overwrite=overwrite)

    def _check_saveable(self):
        """ValueError unless the weights are the model (float32, or int8's values and scales): a bfloat16
        model's are rounded copies of the float32 model's."""
        if not resolve_precision(self.precision).savable and self.precision != DEFAULT_PRECISION:
            raise ValueError(f"this model runs in {self.precision} (weights rounded at load): saved models are "
                             "float32; save the model loaded without precision= (load it with precision= to run "
                             "it so)")

    def save_official(self, path, clip_name=None, legacy_buffers=False, overwrite=False):
        """Write this model as an official ClipCap checkpoint: ``path`` (.pt, ``torch.save`` of the official
        ``ClipCaptionModel.state_dict()``, loadable with ``strict=True``) and ``<path stem>.json`` (the CLIP it
        needs: ``clip_name`` or ``info["clip_name"]``, and the official constructor's arguments). torch needed;
        see `utils.convert.clipcap_export`. Existing files are replaced only with ``overwrite``. Returns
        (pt path, json path)."""
        from utils.convert.clipcap_export import export_official

        self._check_saveable()
        return export_official(self, path, clip_name=clip_name, legacy_buffers=legacy_buffers,
                               overwrite=overwrite)

    @classmethod
    def load(cls, name_or_directory, clip=None, jit_compile="auto", precision=None):
        """Restore a saved model (no torch needed): a directory or a name in ``pretrained_models``. Folders of
        format 2 (`save`) and of format 1 (before it: mapper.weights.h5 + gpt2.weights.h5) both load.

        The official models' names (``coco``, ``conceptual``, ``coco_transformer``; `models.image_captioning.presets.MODELS`)
        are downloaded and converted on first use (no torch needed), then simply loaded.

        ``clip``: a CLIP to use instead of the saved one (checked for the embedding size): a `CLIP` instance,
        an OpenAI CLIP name ("ViT-B/32", downloaded once), the path of an OpenAI CLIP ``.pt`` or of a saved CLIP
        folder (e.g. to add the text encoder re-ranking needs to a model saved with an image-only CLIP).

        ``precision``: None (the default: as saved, float32 or int8), or a name of `models.precision.PRECISIONS`:
        "float32", "bfloat16" ("bf16"): weights cast once at load, bf16 matmuls and convolutions, float32 layer
        norms, softmax and scores (a `CLIP` instance given as ``clip`` is cast in place); "int8": GPT-2's blocks
        and LM head with int8 weights per output channel, for one-image latency (a float32 folder is quantized
        at load; an int8 folder, saved from such a model, loads as int8 and cannot give float32 back). See
        `to_precision`; an unknown name is a ValueError, a precision this process cannot run a
        `models.precision.PrecisionUnavailableError` (`models.precision.check_runnable`), both raised before
        anything is read.
        """
        from models.image_captioning.loading import load_clipcap

        precision_given, precision = precision, resolve_precision(precision)  # unknown: fails before any work
        if precision_given is not None:
            check_runnable(precision)  # so does a precision this process cannot run
        if isinstance(clip, str | os.PathLike):
            from models.siamese.clip import CLIP

            clip = CLIP.from_pretrained(os.fspath(clip), jit_compile=jit_compile)

        model = load_clipcap(cls, name_or_directory, clip=clip, jit_compile=jit_compile)
        return model if precision_given is None else model.to_precision(precision)

    # --- embeddings ----------------------------------------------------------------------------------

    def encode_images(self, images, batch_size=32):
        """Images (paths, PIL images, arrays, or one of them) -> raw CLIP image embeddings (N, D)."""
        if self.clip is None:
            raise ValueError("this ClipCap model has no CLIP image encoder (model.clip is None): give one to "
                             "from_pretrained / load, or pass CLIP embeddings to generate")
        return np.asarray(self.clip.encode_image(images, batch_size=batch_size), np.float32)

    def _embeddings(self, embeddings):
        """(N, D) float32 CLIP embeddings, checked: shape, finite values (NaN / inf, also from float32
        overflow, would give nonsense captions with NaN scores), and no zero vector when the mapper
        L2-normalises (a zero vector has no direction: its prefix would be NaN)."""
        with np.errstate(over="ignore"):  # an overflow to inf is reported below, with its rows
            embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.prefix_size:
            raise ValueError(f"expected CLIP embeddings of shape (N, {self.prefix_size}) for this "
                             f"{self.config['mapping_type']} mapper, got {embeddings.shape}")
        bad = ~np.all(np.isfinite(embeddings), axis=1)
        if bad.any():
            raise ValueError(f"CLIP embeddings hold NaN or infinite values (float32) in rows "
                             f"{np.flatnonzero(bad).tolist()} (of {len(embeddings)}): no caption can be made from "
                             "them; check how they were computed")
        if self.normalize_prefix:
            zero = ~np.any(embeddings, axis=1)
            if zero.any():
                raise ValueError(f"CLIP embeddings in rows {np.flatnonzero(zero).tolist()} (of {len(embeddings)}) "
                                 "are all zeros: this mapper L2-normalises its input, and a zero vector has no "
                                 "direction")
        return embeddings

    def prefix(self, embeddings, compile_now=None):
        """CLIP embeddings (N, D) -> GPT-2 prefixes (N, K, C): normalisation policy, then the mapper
        (``compile_now=True``: compiled now even under "auto", as `generate`'s)."""
        embeddings = self._embeddings(embeddings)
        n = len(embeddings)
        if n == 0:
            return np.zeros((0, self.prefix_length, self.gpt2.n_embd), np.float32)
        bucket = power_of_two_at_least(n)
        with device_scope(self.device):
            # lower_workers=False: this call (a few eager ops) does not show which TensorFlow threads serve the
            # calls, and the decoding call its build overlaps runs on the inter-op pool
            with self._policy.tier(("prefix", bucket), self._prefix_build(bucket, embeddings.shape[1]),
                                   force=compile_now, lower_workers=False) as compiled:
                if compiled:  # few compiled shapes:
                    embeddings = pad_batch(embeddings, bucket, fill=1.0)  # padded with ones (L2-normalisable)
                    prefix = np.asarray(self._project(tf.constant(embeddings), tf.constant(True)))[:n]
                else:  # "auto" until the shape's program is built in the background: eager, nothing compiled
                    prefix = np.asarray(self.backbone.prefix(tf.constant(embeddings)), np.float32)
        bad = ~np.all(np.isfinite(prefix), axis=(1, 2))
        if bad.any():  # finite inputs, non-finite outputs: overflow in the mapper, or damaged weights
            raise ValueError(f"the mapper turned the CLIP embeddings of rows {np.flatnonzero(bad).tolist()} (of {n}) "
                             "into NaN or infinite prefixes (embeddings far out of range, or damaged mapper weights)")
        return prefix

    def _prefix_build(self, bucket, width):
        """The background build of the mapper for ``bucket`` rows (`CompilePolicy.tier`): compiled by one call
        that computes nothing (``run`` False: the build's computation would share the cores with the calls)."""
        device = self.device

        def build():
            with device_scope(device):
                self._project(tf.ones((bucket, width)), tf.constant(False))

        return build

    def logits(self, embeddings, token_ids):
        """Teacher-forced logits (N, K+T, vocab) of GPT-2 on [prefix, token_ids (N, T)] (`ClipCapBackbone`)."""
        prefix = self.prefix(embeddings)  # checks the embeddings and the prefixes
        embeddings = self._embeddings(embeddings)
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        if token_ids.ndim != 2 or len(token_ids) != len(prefix):
            raise ValueError(f"token_ids must be (N, T) with N={len(prefix)}, got {token_ids.shape}")
        with device_scope(self.device):
            return np.asarray(self._logits(tf.constant(embeddings), tf.constant(token_ids)))

    # --- captions ------------------------------------------------------------------------------------

    def sampler(self, method="greedy", **options):
        """The `generation_utils` sampler for these `generate` arguments, checked
        (`custom_architectures.decoding.decoding`)."""
        return as_decoding(method, options).sampler

    def generate(self, embeddings, method="greedy", compile_now=None, image_ids=None, **options):
        """Captions for CLIP embeddings (N, D) (raw, as `encode_images` returns them).

        Args:
            method: a decoding method's name (`custom_architectures.samplers.SAMPLERS`): 'greedy' (= the official
                ``generate2``), 'beam' (= the official ``generate_beam``), 'sample' (temperature, top_k, top_p;
                ``num_captions`` different captions per image), 'magic' (MAGIC search, Su et al. 2022: needs
                CLIP's text tower, `custom_architectures.samplers.Magic`); or a `Decoding` checked already
                (`custom_architectures.decoding.decoding`: what ``predict`` carries; then no ``options``).
            compile_now: None follows `jit_compile`; True compiles the mapper and the decoding loop now even
                under "auto" (for a caller that knows the shape will recur: `predict` on a long run); False
                (under "auto") runs them uncompiled and builds nothing in the background (a caller that knows
                this is the shape's last call: `predict`'s last batch of a short run).
            image_ids: what each image's random draws (``sample``) are keyed by, with the seed: N distinct
                integers >= 0 (None: 0 .. N-1). `predict` passes each image's index in its input, so that an
                image's sampled captions do not depend on which images share its batch.
            **options: the decoding options, each declared once with its type, default, bounds and help
                (`custom_architectures.decoding.request_options`; ``python main.py caption --help`` lists them):
                the method's own (``beam_size``; ``temperature``, ``top_k``, ``top_p``; ``magic_k``,
                ``magic_alpha``, ``magic_beta``) and every method's:

                - ``num_captions``: candidates returned per image (beam: the best num_captions of the beams).
                - ``max_length``: most generated tokens per caption (the stop token included).
                - ``seed``: makes sampling reproducible (None: a fresh random seed); an integer in [0, 2**32),
                  since the draws are keyed by 32 bits (a larger seed is refused rather than folded).
                - ``rerank``: None (the decoder's order) or "clip": every candidate the method produced (beam:
                  all ``beam_size`` beams; sample: the ``num_captions`` draws) is scored by CLIPScore
                  (``2.5 * max(cos(image, "A photo depicts " + text), 0)``, `models.image_captioning.rerank`)
                  with ``model.clip``'s text encoder, re-ordered, and the best ``num_captions`` returned, each
                  with its ``clip_score``. The embeddings must be ``model.clip``'s image features.
                - ``rerank_weight``: A in the rank score ``clip_score + A * score`` (default 0).
                - ``stop_token``: the model's own by default (`stop_token`: '.' for English GPT-2); a string
                  that is one token of the vocabulary, kept in the caption unless it is a special token
                  (``<|endoftext|>``); None never stops early.

        Raises:
            ValueError: for NaN / infinite embeddings (naming the rows), an option outside its declared type or
                bounds (``beam_size=0``, a temperature that is not a finite number > 0, ``top_p`` outside
                (0, 1], a non-integer ``max_length`` ...) or one the method refuses; TypeError for an option no
                method knows.

        Returns:
            one list per image of ``num_captions`` dicts ``{"tokens": [ids], "text": str, "score": float}``,
            best first; ``score`` is the average log-probability per generated token (with ``rerank``, also
            ``clip_score``, and best first by the rank score).
        """
        request, stop = self.check_generate_args(method, **options)
        sampler, max_length, rerank = request.sampler, request.max_length, request.rerank
        seed = request.seed
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        prefix = self.prefix(embeddings, compile_now=compile_now)
        if len(prefix) == 0:
            return []
        with device_scope(self.device):
            if sampler.guided:
                out = self.guided_decoder(prefix, sampler, self._magic_guide(embeddings), max_length=max_length,
                                          stop_token_id=stop, jit_compile=self._decode_mode(compile_now))
            else:
                out = self.decoder(prefix, sampler, max_length=max_length, stop_token_id=stop, seed=seed,
                                   jit_compile=self._decode_mode(compile_now), image_ids=image_ids)
        silent = self.hides_stop_token(stop)
        keep = None if rerank else request.num_captions  # re-ranking scores every candidate, then keeps the best
        results = []
        for tokens, scores in zip(out.tokens, out.scores):
            results.append([
                {"tokens": t, "text": self.tokenizer.decode(t[:-1] if silent and t and t[-1] == stop else t).strip(),
                 "score": float(s)}
                for t, s in list(zip(tokens, scores))[:keep]
            ])
        if rerank:
            from models.image_captioning.rerank import rerank_candidates

            results = rerank_candidates(self.clip, self._embeddings(embeddings), results, request.rerank_weight,
                                        compile_now=compile_now)
            results = [candidates[:request.num_captions] for candidates in results]
        return results

    def _text_clip(self):
        """The CLIP whose text tower MAGIC scores partial captions with; ValueError saying how to get one."""
        from models.image_captioning.rerank import text_encoder_help

        if self.clip is None or not self.clip.has_text:
            raise ValueError(text_encoder_help(self.name, needs="method='magic'"))
        return self.clip.load_text()  # read now if `ClipCap.load` left it for first use

    def _magic_guide(self, embeddings):
        """MAGIC's CLIP scorer for these image embeddings (`guided_decoding.GuidedDecoder`'s ``guide``):
        (image rows (M,), M token-id lists) -> (M,) exp(logit_scale) * cos(image, CLIP text features of the
        decoded tokens), texts cut to CLIP's context as OpenAI's ``truncate=True`` (MAGIC: ``truncation=True``)."""
        clip = self._text_clip()
        images = np.asarray(embeddings, np.float32)
        images = images / np.linalg.norm(images, axis=-1, keepdims=True)
        scale = clip.logit_scale

        def guide(rows, token_lists):
            texts = [self.tokenizer.decode(tokens) for tokens in token_lists]
            features = np.asarray(clip.encode_token_ids(clip.tokenize(texts, truncate=True)), np.float32)
            features = features / np.linalg.norm(features, axis=-1, keepdims=True)
            return scale * np.sum(images[np.asarray(rows)] * features, axis=-1)

        return guide

    def hides_stop_token(self, stop_id):
        """Whether the stop token ``stop_id`` stays out of the captions' text: a special token (``<|endoftext|>``)
        ends a caption without being part of it; a mark ('.', '。') is kept, as the official code keeps '.'."""
        from utils.tokenizer import is_special_token

        return stop_id is not None and is_special_token(self.tokenizer, self.tokenizer.convert_ids_to_tokens(stop_id))

    def _decode_mode(self, compile_now):
        """The decoder's ``jit_compile`` for a call: the model's, or under "auto" ``compile_now`` when given
        (True: compile now; False: the caller knows the shape will not recur, so nothing is built)."""
        return bool(compile_now) if compile_now is not None and self.jit_compile == "auto" else self.jit_compile

    def wait_for_builds(self, timeout=None):
        """Wait for the programs being compiled in the background under "auto" (`CompilePolicy.tier`: CLIP's
        encoders, the mapper, the decoding loops); True when all are done (benchmarks and tests that time the
        compiled forms)."""
        waits = [self._policy.wait, self.decoder.wait_for_builds]
        if self.clip is not None:
            waits.append(self.clip.wait_for_builds)
        return all([wait(timeout) for wait in waits])

    def decoder_will_compile(self, batch_size, sampler, max_length, compile_now=None):
        """Whether `generate` on ``batch_size`` rows with this sampler would compile a new decoding loop (never
        for a guided method: `guided_decoding.GuidedDecoder` runs instead)."""
        if getattr(sampler, "guided", False):
            return False
        return self.decoder.will_compile(batch_size, self.prefix_length, max_length, sampler,
                                         self._decode_mode(compile_now))

    def check_generate_args(self, method="greedy", **options):
        """Check `generate`'s arguments without decoding (so a long run fails before any work): ``method`` and
        ``options`` as `generate` takes them (a `Decoding` is not checked again), then what needs this model.
        Returns (the `Decoding`, the stop token's id or None). Raises ValueError / TypeError as `generate` does
        (MAGIC without CLIP's text tower: ValueError saying how to add it; ``rerank`` without it:
        `rerank.MissingTextEncoderError`, saying how to add one), and ValueError for what this model's GPT-2
        cannot decode (`_check_model_bounds`: more beams than its vocabulary, a stop token without an
        embedding row, a ``max_length`` beyond its positions), which would otherwise fail inside the loop."""
        from utils.tokenizer import stop_token_id

        request = as_decoding(method, options)
        if request.sampler.guided:
            self._text_clip()
        if request.rerank:
            from models.image_captioning.rerank import check_text_encoder

            check_text_encoder(self)
        stop_token = self.resolve_stop_token(request.stop_token)
        stop = None if stop_token is None else stop_token_id(self.tokenizer, stop_token)
        self._check_model_bounds(request, stop_token, stop)
        return request, stop

    def _check_model_bounds(self, request, stop_token, stop):
        """ValueError unless GPT-2 can decode ``request`` with the stop id ``stop`` (of ``stop_token``):

        - ``beam_size`` and ``magic_k`` <= GPT-2's vocabulary (its embedding rows): each step takes the top
          ``beam_size`` / ``magic_k`` tokens of a row (otherwise TensorFlow's "input must have at least k
          columns" inside the loop);
        - the stop id < that vocabulary: a token without a row (a tokenizer larger than the model's) is never
          generated, so the captions would never stop early;
        - the prefix and ``max_length`` within GPT-2's ``n_positions``, by the decoder's own rule (the compiled
          loop feeds K + max_length - 1 positions, MAGIC's K + max_length), checked here before any work.
        """
        vocab, positions, k = int(self.gpt2.vocab_size), int(self.gpt2.n_positions), self.prefix_length
        for name in ("beam_size", "magic_k"):  # the top-k of a row: beams, MAGIC's candidates (the method's own)
            count = request.own_values().get(name)
            if count is not None and count > vocab:
                raise ValueError(f"{name}={count} exceeds the model's vocabulary of {vocab} tokens (GPT-2's "
                                 f"embedding rows): {name} must be in [1, {vocab}] for this model")
        if stop is not None and not 0 <= stop < vocab:
            raise ValueError(f"stop_token {stop_token!r} has id {stop} but the model's GPT-2 has only {vocab} "
                             f"embedding rows (ids 0 .. {vocab - 1}): it could never be generated; the tokenizer "
                             "does not belong to this GPT-2")
        fed = k + request.max_length - (0 if request.sampler.guided else 1)
        if fed > positions:
            longest = positions - k + (0 if request.sampler.guided else 1)
            raise ValueError(f"max_length={request.max_length} with this model's prefix of {k} positions exceeds "
                             f"GPT-2's n_positions={positions}: max_length must be in [1, {longest}]"
                             + (f" for method={request.method!r} (it feeds the last step's candidates too)"
                                if request.sampler.guided else ""))

    def resolve_stop_token(self, stop_token=MODEL_STOP_TOKEN):
        """``stop_token`` as a string (or None): `MODEL_STOP_TOKEN` -> this model's `stop_token`."""
        return self.stop_token if stop_token is MODEL_STOP_TOKEN else stop_token

    def caption(self, images, **generate_kwargs):
        """Images (paths, PIL images, arrays, or one) -> the best caption of each, a list of str. Sampling
        keys a file's draws by its absolute path (a URL's by itself), as `predict` does."""
        from custom_architectures.samplers import draw_id
        from utils.image_io import is_url

        many = isinstance(images, list | tuple) or (isinstance(images, np.ndarray) and images.ndim == 4)
        items = list(images) if many else [images]
        names = [os.fspath(item) if isinstance(item, str | os.PathLike) else None for item in items]
        ids = [i if name is None else draw_id(name if is_url(name) else os.path.abspath(name))
               for i, name in enumerate(names)]
        results = self.generate(self.encode_images(images), image_ids=ids, **generate_kwargs)
        return [candidates[0]["text"] for candidates in results]

    def predict(self, images, **kwargs):
        """Caption many images (paths, directories, globs, PIL, arrays) through a concurrent pipeline that
        keeps input order, isolates bad images and records results in map.json.

        See `models.image_captioning.prediction.predict` for the arguments (batch_size, method, save,
        overwrite, output_dir, return_candidates, generate kwargs...).

        Example::

            for r in model.predict("holidays/", method="beam"):
                print(r["image"], r["caption"])
        """
        from models.image_captioning.prediction import predict

        return predict(self, images, **kwargs)

    def __repr__(self):
        return (f"ClipCap(name={self.name!r}, mapper={self.config['mapping_type']}, K={self.prefix_length}, "
                f"prefix_size={self.prefix_size}, gpt2={self.gpt2.n_layer} layers x {self.gpt2.n_embd}, "
                f"clip={'yes' if self.clip is not None else 'no'})")
