"""`ClipCap`: image captioning with a CLIP prefix and GPT-2 (Mokady et al., arXiv 2111.09734), in Keras.

A CLIP image embedding (B, D) is mapped to a GPT-2 prefix of K embeddings (B, K, C) by the mapper (MLP or
transformer; the released transformer weights expect the embedding L2-normalised first, the MLP weights the
raw one: ``config["normalize_prefix"]``), and GPT-2 continues the prefix with a caption. Decoding is batched,
KV-cached and XLA-compiled (`custom_architectures.generation_utils`); greedy and beam search give the same
captions as the official ``generate2`` and ``generate_beam``.

``from_pretrained`` converts an official ``.pt`` checkpoint (torch needed); ``save`` writes a directory
(config.json, Keras weights, tokenizer files, and the CLIP model when there is one) that ``load`` restores
without torch.

Example::

    model = ClipCap.from_pretrained("coco_weights.pt", clip="ViT-B-32.pt", tokenizer="gpt2", name="coco")
    model = ClipCap.load("coco")                       # pretrained_models/coco/
    model.caption("cat.jpg")                           # ['A cat sitting on a couch.']
    model.generate(model.encode_images(["cat.jpg"]), method="beam", beam_size=5, num_captions=3)
"""

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from custom_architectures.batching import pad_batch, power_of_two_at_least  # noqa: E402
from custom_architectures.generation_utils import PrefixDecoder  # noqa: E402
from custom_architectures.samplers import SAMPLERS, check_integer, check_seed, get_sampler  # noqa: E402
from custom_architectures.transformers_arch.clip_cap_arch import build_mapper  # noqa: E402
from custom_architectures.transformers_arch.gpt2_arch import GPT2  # noqa: E402
from utils.convert.common import CheckpointError  # noqa: E402

CONFIG_FILENAME = "config.json"
MAPPER_WEIGHTS = "mapper.weights.h5"
GPT2_WEIGHTS = "gpt2.weights.h5"
TOKENIZER_DIR = "tokenizer"
CLIP_DIR = "clip"
FORMAT_VERSION = 1
METHODS = tuple(SAMPLERS)  # the decoding methods (`custom_architectures.samplers`)
_MAPPER_KEYS = ("prefix_size", "prefix_length", "n_embd", "clip_length", "num_layers", "num_heads", "mlp_ratio")


def _model_dir(name_or_directory):
    """Where a model named or placed by ``name_or_directory`` lives.

    A ``Path``, a string with a separator, or an existing folder of the working directory is a directory;
    any other string is a model name, which must be plain (`utils.file_utils.check_model_name`: "", ".",
    ".." and names with separators are refused) and lives in the model store (``pretrained_models/<name>``).
    """
    from utils.downloads import saved_model_dir

    if isinstance(name_or_directory, os.PathLike):
        return Path(name_or_directory)
    text = str(name_or_directory)
    separators = [s for s in (os.sep, os.altsep) if s]
    if any(s in text for s in separators) or Path(text).is_absolute():
        return Path(text)
    if text not in ("", ".", "..") and Path(text).is_dir():
        return Path(text)
    return saved_model_dir(text)  # ValueError for anything but a plain name


def _valid_name(name, config_path):
    """A saved config's ``name`` when it is a plain name, else None with a warning: the name decides where
    `save` and `predict` write by default, so "..", "/abs" or "a/b" must never be used."""
    from utils.file_utils import check_model_name

    if name is None:
        return None
    try:
        return check_model_name(name)
    except ValueError as e:
        logging.getLogger(__name__).warning("%s: key 'name' ignored: %s", config_path, e)
        return None


def _folder_name(directory):
    """The folder's own name as the model's name when it is a plain name, else None (no name)."""
    from utils.file_utils import check_model_name

    try:
        return check_model_name(Path(os.path.abspath(directory)).name)
    except ValueError:
        return None


class ModelLoadError(CheckpointError):
    """A saved model that cannot be loaded (a missing or invalid config key, a damaged weights file); the
    message names the file (and the key) and says what to do."""


def make_sampler(method="greedy", beam_size=5, temperature=1.0, top_k=None, top_p=None, num_captions=1):
    """The sampler for `ClipCap.generate`'s arguments (`custom_architectures.samplers.get_sampler`), validated
    without a model (so a command line can fail before loading one): integers must be integers (numpy's too;
    not bool, not 2.0), ``temperature`` finite and > 0, ``top_p`` in (0, 1], ``top_k`` >= 1, whatever the
    method (a wrong value is an error even where the method ignores it)."""
    return get_sampler(method, beam_size=beam_size, temperature=temperature, top_k=top_k, top_p=top_p,
                       num_captions=num_captions)


def check_decoding_args(method="greedy", beam_size=5, max_length=67, temperature=1.0, top_k=None, top_p=None,
                        num_captions=1, seed=None):
    """Validate `ClipCap.generate`'s arguments that need no model (all but ``stop_token``); returns
    (sampler, max_length, seed). Raises ValueError / TypeError as ``generate`` does."""
    sampler = make_sampler(method, beam_size, temperature, top_k, top_p, num_captions)
    max_length = check_integer("max_length", max_length, minimum=1)
    return sampler, max_length, None if seed is None else check_seed(seed)


class ClipCap:
    """A ClipCap captioner: ``clip`` (optional) -> ``mapper`` -> ``gpt2``, with its GPT-2 ``tokenizer``.

    Attributes:
        clip: a `models.siamese.clip.CLIP` (image encoder) or None (then caption CLIP embeddings given to
            `generate`).
        mapper: the Keras mapper, (B, D) -> (B, K, C).
        gpt2: the Keras `GPT2`.
        tokenizer: a ``GPT2TokenizerFast``.
        config: a JSON-able dict: mapper architecture, ``normalize_prefix``, ``gpt2`` config, ``name``.
        name: the model's name (where `save` / `predict` write by default), or None.
    """

    def __init__(self, mapper, gpt2, tokenizer, config, clip=None, jit_compile=True):
        self.mapper = mapper
        self.gpt2 = gpt2
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.clip = clip
        self.jit_compile = jit_compile
        self.decoder = PrefixDecoder(gpt2)
        self._project = tf.function(self._project_eager, jit_compile=jit_compile)
        self._logits = tf.function(lambda ids, prefix: gpt2(token_ids=ids, inputs_embeds=prefix),
                                   jit_compile=jit_compile)
        if clip is not None:
            self._check_clip(clip, "the given CLIP model")

    # --- construction --------------------------------------------------------------------------------

    @property
    def name(self):
        return self.config.get("name")

    @property
    def prefix_length(self) -> int:
        return int(self.config["prefix_length"])

    @property
    def prefix_size(self) -> int:
        return int(self.config["prefix_size"])

    def _check_clip(self, clip, clip_name):
        from utils.convert.clipcap import check_clip_matches

        check_clip_matches(clip.embed_dim, self.config, clip_name=clip_name,
                           checkpoint_name=self.config.get("checkpoint", "the ClipCap mapper"))

    @classmethod
    def from_pretrained(cls, checkpoint, clip=None, tokenizer="gpt2", name=None, normalize_prefix=None,
                        jit_compile=True, overwrite=False):
        """Convert an official ClipCap checkpoint (torch needed).

        Args:
            checkpoint: path to an official ClipCap ``.pt`` (``coco_weights.pt``, ``transformer_weights.pt``...).
            clip: an OpenAI CLIP name ("ViT-B/32", downloaded once), path to an OpenAI CLIP ``.pt`` (or a saved
                CLIP directory), a `CLIP` instance, or None.
                Its embedding size must equal the mapper's prefix size (else `CheckpointError`).
            tokenizer: a GPT-2 tokenizer name ("gpt2", from the HF cache), a local directory, or a tokenizer.
            name: when given, the converted model is saved to ``pretrained_models/<name>/``; a plain name
                only (ValueError for "", "..", "a/b", "/abs"), checked before any work.
            normalize_prefix: override the checkpoint kind's default (transformer: True, MLP: False).
            overwrite: replace an existing saved model of that name (see `save`).
        """
        from utils.convert.clipcap import check_clip_matches, load_clipcap
        from utils.downloads import is_saved_model, saved_model_dir
        from utils.file_utils import check_replaceable
        from utils.tokenizer import load_gpt2_tokenizer

        if name is not None:  # refuse a bad name, or a store folder that is not ours, before converting
            check_replaceable(saved_model_dir(name), is_saved_model, overwrite)
        mapper, gpt2, config = load_clipcap(checkpoint)
        config["checkpoint"] = os.path.basename(os.fspath(checkpoint))
        if normalize_prefix is not None:
            config["normalize_prefix"] = bool(normalize_prefix)
        if clip is not None and not hasattr(clip, "embed_dim"):
            from models.siamese.clip import CLIP
            from utils.downloads import CLIP_SOURCES

            clip_name = os.fspath(clip)
            if clip_name in CLIP_SOURCES:  # an OpenAI name: recorded, for save_official
                config["clip_name"] = clip_name
            clip = CLIP.from_pretrained(clip_name, visual_only=True)
            check_clip_matches(clip.embed_dim, config, clip_name=clip_name, checkpoint_name=config["checkpoint"])
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_gpt2_tokenizer(os.fspath(tokenizer))
        if len(tokenizer) > gpt2.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's GPT-2 only "
                             f"{gpt2.vocab_size}: they do not belong together")
        config["name"] = name
        model = cls(mapper, gpt2, tokenizer, config, clip=clip, jit_compile=jit_compile)
        if name is not None:
            model.save(saved_model_dir(name), overwrite=overwrite)  # the folder checked above
        return model

    def save(self, name_or_directory=None, overwrite=False):
        """Write config.json, the mapper's and GPT-2's weights, the tokenizer files and the CLIP model (if any)
        to a directory (or ``pretrained_models/<name>/``); returns the directory.

        The model is written to a new folder beside the target and renamed into place, so the target holds
        the old model or the new one, never half of one. An existing target is replaced only when it is
        empty, or a saved ClipCap and ``overwrite``; any other folder or file raises
        `utils.file_utils.UnsafePathError` (ValueError) and nothing is changed. Files and folders get the
        permissions the umask gives.
        """
        from utils.downloads import is_saved_model
        from utils.file_utils import replace_dir

        target = name_or_directory if name_or_directory is not None else self.name
        if target is None:
            raise ValueError("save needs a name or directory (this model has no name)")
        directory = _model_dir(target)
        config = dict(self.config, format_version=FORMAT_VERSION, architecture="clipcap",
                      clip=CLIP_DIR if self.clip is not None else None, tokenizer=TOKENIZER_DIR)

        def write(staging):
            self.mapper.save_weights(str(staging / MAPPER_WEIGHTS))
            self.gpt2.save_weights(str(staging / GPT2_WEIGHTS))
            self.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
            if self.clip is not None:
                self.clip.save(str(staging / CLIP_DIR))
            with open(staging / CONFIG_FILENAME, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)

        replace_dir(directory, write, is_ours=is_saved_model, overwrite=overwrite)
        return str(directory)

    def save_official(self, path, clip_name=None, legacy_buffers=False, overwrite=False):
        """Write this model as an official ClipCap checkpoint: ``path`` (.pt, ``torch.save`` of the official
        ``ClipCaptionModel.state_dict()``, loadable with ``strict=True``) and ``<path stem>.json`` (the CLIP it
        needs: ``clip_name`` or ``config["clip_name"]``, and the official constructor's arguments). torch needed;
        see `utils.convert.clipcap_export`. Existing files are replaced only with ``overwrite``. Returns
        (pt path, json path)."""
        from utils.convert.clipcap_export import export_official

        return export_official(self, path, clip_name=clip_name, legacy_buffers=legacy_buffers,
                               overwrite=overwrite)

    @classmethod
    def load(cls, name_or_directory, clip=None, jit_compile=True):
        """Restore a model written by `save` (no torch needed): a directory or a name in ``pretrained_models``.

        The official models' names (``coco``, ``conceptual``, ``coco_transformer``; `utils.downloads.MODELS`)
        are downloaded and converted on first use (that first time needs torch), then simply loaded.

        ``clip``: a `CLIP` instance to use instead of the saved one (checked for the embedding size).
        """
        from utils.file_utils import UnsafePathError, read_regular_file
        from utils.tokenizer import load_gpt2_tokenizer

        directory = _model_dir(name_or_directory)
        config_path = directory / CONFIG_FILENAME
        if not config_path.is_file() and clip is None:
            from utils.downloads import MODELS, get_pretrained

            if str(name_or_directory) in MODELS:  # an official model: downloaded and converted once
                return get_pretrained(str(name_or_directory))
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved ClipCap model: {CONFIG_FILENAME} not found")
        try:
            config = json.loads(read_regular_file(config_path, max_bytes=1 << 20))
        except (UnsafePathError, ValueError) as e:
            raise ModelLoadError(f"{config_path} is not a readable config ({e}); save or convert the model "
                                 "again") from e
        if not isinstance(config, dict) or config.get("architecture") != "clipcap":
            found = config.get("architecture") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{config_path} does not describe a ClipCap model: {found!r}")
        for key in ("mapping_type", "prefix_length", "prefix_size", "gpt2", "tokenizer"):
            if key not in config:
                raise ModelLoadError(f"{config_path} lacks the key {key!r}: the saved model is damaged or "
                                     "was not written by ClipCap.save; save or convert it again")
        if not isinstance(config["gpt2"], dict):
            raise ModelLoadError(f"{config_path}: key 'gpt2' must be an object of GPT2 arguments, got "
                                 f"{type(config['gpt2']).__name__}")
        for filename in (MAPPER_WEIGHTS, GPT2_WEIGHTS):
            if not (directory / filename).is_file():
                raise FileNotFoundError(f"{directory} is an incomplete ClipCap model: {filename} missing")

        def build(what, path, make):  # name the damaged file in any error of Keras / h5py / tokenizers
            try:
                return make()
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                raise ModelLoadError(f"cannot load the {what} from {path} ({type(e).__name__}: {e}); the file "
                                     "is damaged or does not match config.json: save or convert the model "
                                     "again") from e

        mapper = build("mapper", config_path, lambda: build_mapper(
            config["mapping_type"], **{k: config[k] for k in _MAPPER_KEYS if k in config}))
        build("mapper weights", directory / MAPPER_WEIGHTS,
              lambda: mapper.load_weights(str(directory / MAPPER_WEIGHTS)))
        gpt2 = build("GPT-2", config_path, lambda: GPT2(**config["gpt2"]))
        build("GPT-2 weights", directory / GPT2_WEIGHTS, lambda: gpt2.load_weights(str(directory / GPT2_WEIGHTS)))
        tokenizer_dir = directory / str(config.pop("tokenizer"))
        tokenizer = build("tokenizer", tokenizer_dir, lambda: load_gpt2_tokenizer(str(tokenizer_dir)))
        saved_clip = config.pop("clip", None)
        if clip is None and saved_clip is not None:
            from models.siamese.clip import CLIP

            clip = CLIP.load(str(directory / saved_clip), jit_compile="auto" if jit_compile else False)
        config.pop("format_version", None)
        config.pop("architecture", None)
        config["name"] = _valid_name(config.get("name"), config_path) or _folder_name(directory)
        return cls(mapper, gpt2, tokenizer, config, clip=clip, jit_compile=jit_compile)

    # --- embeddings ----------------------------------------------------------------------------------

    def encode_images(self, images, batch_size=32):
        """Images (paths, PIL images, arrays, or one of them) -> raw CLIP image embeddings (N, D)."""
        if self.clip is None:
            raise ValueError("this ClipCap model has no CLIP image encoder (model.clip is None): give one to "
                             "from_pretrained / load, or pass CLIP embeddings to generate")
        return np.asarray(self.clip.encode_image(images, batch_size=batch_size), np.float32)

    def _project_eager(self, embeddings):
        if self.config.get("normalize_prefix", False):
            embeddings = embeddings / tf.norm(embeddings, axis=-1, keepdims=True)
        return self.mapper(embeddings)

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
        if self.config.get("normalize_prefix", False):
            zero = ~np.any(embeddings, axis=1)
            if zero.any():
                raise ValueError(f"CLIP embeddings in rows {np.flatnonzero(zero).tolist()} (of {len(embeddings)}) "
                                 "are all zeros: this mapper L2-normalises its input, and a zero vector has no "
                                 "direction")
        return embeddings

    def prefix(self, embeddings):
        """CLIP embeddings (N, D) -> GPT-2 prefixes (N, K, C): normalisation policy, then the mapper."""
        embeddings = self._embeddings(embeddings)
        n = len(embeddings)
        if n == 0:
            return np.zeros((0, self.prefix_length, self.gpt2.n_embd), np.float32)
        if self.jit_compile:  # few compiled shapes; padded with ones, which the L2 normalisation accepts
            embeddings = pad_batch(embeddings, power_of_two_at_least(n), fill=1.0)
        prefix = np.asarray(self._project(tf.constant(embeddings)))[:n]
        bad = ~np.all(np.isfinite(prefix), axis=(1, 2))
        if bad.any():  # finite inputs, non-finite outputs: overflow in the mapper, or damaged weights
            raise ValueError(f"the mapper turned the CLIP embeddings of rows {np.flatnonzero(bad).tolist()} (of {n}) "
                             "into NaN or infinite prefixes (embeddings far out of range, or damaged mapper weights)")
        return prefix

    def logits(self, embeddings, token_ids):
        """Teacher-forced logits (N, K+T, vocab) of GPT-2 on [prefix, token_ids (N, T)]."""
        prefix = self.prefix(embeddings)
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        if token_ids.ndim != 2 or len(token_ids) != len(prefix):
            raise ValueError(f"token_ids must be (N, T) with N={len(prefix)}, got {token_ids.shape}")
        return np.asarray(self._logits(tf.constant(token_ids), tf.constant(prefix)))

    # --- captions ------------------------------------------------------------------------------------

    def sampler(self, method="greedy", beam_size=5, temperature=1.0, top_k=None, top_p=None, num_captions=1):
        """The `generation_utils` sampler for these `generate` arguments, validated (`make_sampler`)."""
        return make_sampler(method, beam_size, temperature, top_k, top_p, num_captions)

    def generate(self, embeddings, method="greedy", beam_size=5, max_length=67, stop_token=".", temperature=1.0,
                 top_k=None, top_p=None, num_captions=1, seed=None):
        """Captions for CLIP embeddings (N, D) (raw, as `encode_images` returns them).

        Args:
            method: 'greedy' (= the official ``generate2``), 'beam' (= the official ``generate_beam``) or
                'sample' (temperature, top_k, top_p; ``num_captions`` different captions per image).
            beam_size: beams per image for 'beam'.
            max_length: most generated tokens per caption (the stop token included).
            stop_token: a string that is one token of the vocabulary ('.'), kept in the caption; None never
                stops early.
            temperature: divides the logits (changes beam and sampling decisions, and every score).
            num_captions: candidates returned per image (beam: the best num_captions of the beams).
            seed: makes sampling reproducible (None: a fresh random seed); an integer in [0, 2**32), since
                the draws are keyed by 32 bits (a larger seed is refused rather than folded onto a smaller one).

        Raises:
            ValueError: for NaN / infinite embeddings (naming the rows), a non-integer ``beam_size`` /
                ``max_length`` / ``num_captions`` / ``seed`` / ``top_k``, ``beam_size=0``, a temperature that is
                not a finite number > 0, ``top_p`` outside (0, 1].

        Returns:
            one list per image of ``num_captions`` dicts ``{"tokens": [ids], "text": str, "score": float}``,
            best first; ``score`` is the average log-probability per generated token.
        """
        sampler, max_length, stop, seed = self.check_generate_args(
            method, beam_size, max_length, stop_token, temperature, top_k, top_p, num_captions, seed)
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        prefix = self.prefix(embeddings)
        if len(prefix) == 0:
            return []
        out = self.decoder(prefix, sampler, max_length=max_length, stop_token_id=stop, seed=seed,
                           jit_compile=self.jit_compile)
        results = []
        for tokens, scores in zip(out.tokens, out.scores):
            results.append([
                {"tokens": t, "text": self.tokenizer.decode(t).strip(), "score": float(s)}
                for t, s in list(zip(tokens, scores))[:num_captions]
            ])
        return results

    def check_generate_args(self, method="greedy", beam_size=5, max_length=67, stop_token=".", temperature=1.0,
                            top_k=None, top_p=None, num_captions=1, seed=None):
        """Validate `generate`'s arguments without decoding (so a long run fails before any work); returns
        (sampler, max_length, stop_token_id, seed). Raises ValueError / TypeError as `generate` does."""
        from utils.tokenizer import stop_token_id

        sampler, max_length, seed = check_decoding_args(method, beam_size, max_length, temperature, top_k, top_p,
                                                        num_captions, seed)
        stop = None if stop_token is None else stop_token_id(self.tokenizer, stop_token)
        return sampler, max_length, stop, seed

    def caption(self, images, **generate_kwargs):
        """Images (paths, PIL images, arrays, or one) -> the best caption of each, a list of str."""
        results = self.generate(self.encode_images(images), **generate_kwargs)
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
