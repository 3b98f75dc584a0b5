"""How a `ClipCap` is converted, saved and loaded: the saved-model folder (format 2) and its legacy reader.

Format 2 (`utils.preset_utils`; written by ``ClipCap.save``, ``convert``, ``download`` and the trainer):

```
config.json        {"architecture": "clipcap", "format_version": 2, "name", "checkpoint", "checkpoint_sha256",
                    "clip_name", "stop_token" (absent in older folders: "."), "tokenizer": "tokenizer",
                    "clip": "clip" | null,
                    "model": keras.saving.serialize_keras_object(ClipCapBackbone)}
model.weights.h5   the backbone's weights (Keras save_weights: mapper and GPT-2)
tokenizer/         the GPT-2 tokenizer files (save_pretrained)
clip/              the CLIP (image encoder, and the text encoder since re-ranking), a saved CLIP folder of the same format (when there is one)
metadata.json      format version, library version, UTC date, source checkpoint and its SHA-256, the model's
                   ``identity`` (`models.image_captioning.identity`: what its cached captions are keyed by) and
                   ``identity_files``, the fingerprint of the files it stands for (trusted only while they match)
README.md          a short model card
```

Format 1 (before; config.json with ``format_version`` 1, mapper.weights.h5, gpt2.weights.h5) is read by
`models.image_captioning.format1` and gives the same model: the same captions.
"""

import logging
import os
from pathlib import Path

from utils.convert.common import CheckpointError

TOKENIZER_DIR = "tokenizer"
CLIP_DIR = "clip"
ARCHITECTURE = "clipcap"


class ModelLoadError(CheckpointError):
    """A saved model that cannot be loaded (a missing or invalid config key, a damaged weights file); the
    message names the file (and the key) and says what to do."""


def valid_name(name, config_path):
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


def folder_name(directory):
    """The folder's own name as the model's name when it is a plain name, else None (no name)."""
    from utils.file_utils import check_model_name

    try:
        return check_model_name(Path(os.path.abspath(directory)).name)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- conversion


def convert_official(cls, source, clip=None, tokenizer="gpt2", name=None, normalize_prefix=None,
                     jit_compile="auto", overwrite=False, clip_name=None, stop_token=None):
    """`ClipCap.from_pretrained`: an official ``.pt`` converted (no torch needed), or an official model name
    downloaded and converted once (`models.image_captioning.pretrained.get_pretrained`)."""
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
    from models.image_captioning.gpt2_hub import fetch_gpt2_tokenizer
    from models.image_captioning.presets import MODELS
    from models.image_captioning.pretrained import get_pretrained
    from utils.convert.clipcap import check_clip_matches, load_clipcap
    from utils.download_manifest import sha256_of
    from utils.file_utils import check_replaceable
    from utils.model_store import is_saved_model, saved_model_dir
    from utils.tokenizer import load_gpt2_tokenizer, stop_token_id

    path = os.fspath(source)
    if not os.path.exists(path) and path in MODELS:
        given = {k: v for k, v in dict(clip=clip, name=name, normalize_prefix=normalize_prefix,
                                       clip_name=clip_name, stop_token=stop_token).items() if v is not None}
        if given or tokenizer != "gpt2":
            raise ValueError(f"{path!r} is an official model: its CLIP, tokenizer and settings are fixed "
                             f"(got {sorted(given) + (['tokenizer'] if tokenizer != 'gpt2' else [])}); give the "
                             "checkpoint file to convert it differently")
        return get_pretrained(cls, path)
    if name is not None:  # refuse a bad name, or a store folder that is not ours, before converting
        if overwrite:
            keep_legacy_outputs(saved_model_dir(name))
        check_replaceable(saved_model_dir(name), is_saved_model, overwrite)
    if isinstance(tokenizer, str | os.PathLike):  # a hub name: by the transport (mirror, manifest, offline mode)
        tokenizer = load_gpt2_tokenizer(fetch_gpt2_tokenizer(os.fspath(tokenizer)))
    if stop_token is not None:  # a stop token that is not one token: refused before converting
        stop_token_id(tokenizer, stop_token)
    mapper, gpt2, config = load_clipcap(path)
    info = {"checkpoint": os.path.basename(path), "checkpoint_sha256": sha256_of(path), "clip_name": clip_name,
            "stop_token": stop_token}
    if normalize_prefix is not None:
        config["normalize_prefix"] = bool(normalize_prefix)
    if clip is not None and not hasattr(clip, "embed_dim"):
        from models.siamese.clip import CLIP
        from models.siamese.presets import CLIP_SOURCES

        clip_source = os.fspath(clip)
        if clip_source in CLIP_SOURCES and clip_name is None:  # an OpenAI name: recorded, for save_official
            info["clip_name"] = clip_source
        clip = CLIP.from_pretrained(clip_source, jit_compile=jit_compile)  # with its text encoder (rerank)
        check_clip_matches(clip.embed_dim, config, clip_name=clip_source, checkpoint_name=info["checkpoint"])
    if len(tokenizer) > gpt2.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's GPT-2 only "
                         f"{gpt2.vocab_size}: they do not belong together")
    info["name"] = name
    backbone = ClipCapBackbone(mapper, gpt2, normalize_prefix=config["normalize_prefix"])
    model = cls(backbone, tokenizer, clip=clip, jit_compile=jit_compile, info=info)
    if name is not None:
        model.save(saved_model_dir(name), overwrite=overwrite)  # the folder checked above
    return model


# ----------------------------------------------------------------------------------------------- saving


def model_card(model) -> str:
    """A short README.md for a saved ClipCap: what it is, its sizes, where it comes from, how to load it."""
    from models.siamese.clip_score import has_text_encoder

    c = model.config
    gpt2 = c["gpt2"]
    source = c.get("checkpoint") or "trained or built with this library"
    lines = [
        f"# ClipCap model {model.name or ''}".rstrip(), "",
        "CLIP prefix captioning (Mokady et al., arXiv 2111.09734) in Keras: a CLIP image embedding is mapped to "
        "a GPT-2 prefix, and GPT-2 continues it with a caption.", "",
        f"- mapper: {c['mapping_type']}, prefix length K={c['prefix_length']}, CLIP embedding size "
        f"{c['prefix_size']}, embedding L2-normalised first: {'yes' if c['normalize_prefix'] else 'no'}",
        f"- GPT-2: {gpt2['n_layer']} layers x {gpt2['n_embd']}, {gpt2['vocab_size']} tokens; captions end with "
        f"{model.stop_token!r}",
        f"- CLIP image encoder: {'included (clip/)' if model.clip is not None else 'not included'}"
        + (", text encoder (re-ranking): " + ("included" if has_text_encoder(model.clip) else "not included")
           if model.clip is not None else "")
        + (f", expects {c['clip_name']}" if c.get("clip_name") else ""),
        f"- source: {source}" + (f" (SHA-256 {c['checkpoint_sha256']})" if c.get("checkpoint_sha256") else ""),
        "", "Load it (no torch needed):", "", "```python", "from models.image_captioning import ClipCap",
        "model = ClipCap.load(\"path/to/this/folder\")", "model.caption(\"cat.jpg\")", "```", "",
    ]
    return "\n".join(lines)


def save_clipcap(model, name_or_directory=None, overwrite=False):
    """`ClipCap.save`: write ``model`` as a format-2 folder (see the module docstring); returns it (str)."""
    from models import __version__
    from models.image_captioning.identity import FILES_KEY, IDENTITY_KEY, compute_identity, files_fingerprint
    from utils.model_store import is_saved_model, model_dir
    from utils.preset_utils import preset_metadata, save_preset

    target = name_or_directory if name_or_directory is not None else model.name
    if target is None:
        raise ValueError("save needs a name or directory (this model has no name)")
    directory = model_dir(target)
    header = {**model.info, "stop_token": model.stop_token, "tokenizer": TOKENIZER_DIR,
              "clip": CLIP_DIR if model.clip is not None else None}
    # from the weights in memory, as they are written; a model quantized at load (int8) keeps the identity it
    # was given then (the float32 model's, in its precision: what cached answers and Beam key it by before loading)
    identity = model.identity if model.precision != "float32" else compute_identity(model)
    fields = preset_metadata(__version__, source=model.info.get("checkpoint"),
                             source_sha256=model.info.get("checkpoint_sha256"), **{IDENTITY_KEY: identity})

    def metadata(staging):  # the identity stands for these very files (`identity.recorded_identity`)
        return {**fields, FILES_KEY: files_fingerprint(staging)}

    def write_extra(staging):
        model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        if model.clip is not None:
            model.clip.save(str(staging / CLIP_DIR))

    keep_legacy_outputs(directory)
    save_preset(directory, model.backbone, ARCHITECTURE, metadata, model_card(model), header=header,
                write_extra=write_extra, is_ours=is_saved_model, overwrite=overwrite)
    model.record_identity(identity)
    return str(directory)





def keep_legacy_outputs(directory):
    """Before ``directory`` is replaced: when it is a model store folder holding results where earlier versions
    wrote them (``<store>/<name>/outputs/map.json``), move them out of it
    (`prediction.migrate_legacy_outputs`), so that ``convert --overwrite`` never deletes captions."""
    from models.image_captioning.prediction import migrate_legacy_outputs
    from utils.file_utils import UnsafePathError
    from utils.model_store import home_dir, legacy_outputs_dir

    directory = Path(os.path.abspath(directory))
    name = folder_name(directory)
    if name is None or directory.parent != Path(os.path.abspath(home_dir())):
        return
    if os.path.lexists(legacy_outputs_dir(name)):
        migrate_legacy_outputs(name)
        left = legacy_outputs_dir(name) / "map.json"
        if os.path.lexists(left):  # damaged: left where it is, and so never deleted by the replacement
            raise UnsafePathError(f"{left} could not be moved out of the model folder (see the log): move it "
                                  f"yourself before replacing {directory} (nothing was changed)")


def build_or_explain(what, path, make):
    """``make()``, with any error of Keras / h5py / tokenizers turned into a `ModelLoadError` naming ``path``."""
    try:
        return make()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load the {what} from {path} ({type(e).__name__}: {e}); the file is damaged "
                             "or does not match config.json: save or convert the model again") from e


def sub_folder(directory, config, key):
    """The sub-folder that config.json's entry ``key`` ("tokenizer", "clip") names, checked before anything is
    read from it: one plain name (`utils.file_utils.check_model_name`: no separator, no "..", not absolute)
    of a real folder inside ``directory`` (not a symbolic link, which could lead out of it); `ModelLoadError`
    naming config.json and the entry otherwise."""
    from utils.file_utils import check_model_name
    from utils.preset_utils import CONFIG_FILE

    config_path = Path(directory) / CONFIG_FILE
    value = config.get(key)
    try:
        check_model_name(value)
    except ValueError:
        raise ModelLoadError(f"{config_path}: entry {key!r} is {json_excerpt(value)}, not the name of a folder "
                             f"inside {directory} (such as {key!r}); the saved model is damaged or was edited: "
                             "save or convert it again") from None
    path = Path(directory) / value
    if path.is_symlink() or not path.is_dir():
        what = "a symbolic link" if path.is_symlink() else "missing" if not os.path.lexists(path) else "not a folder"
        raise ModelLoadError(f"{config_path}: entry {key!r} names {path}, which is {what}: the saved model is "
                             "damaged or incomplete; save or convert it again")
    return path


def json_excerpt(value, limit=80):
    """``value`` as JSON, at most ``limit`` characters (for messages)."""
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def load_parts(cls, directory, config, backbone, clip, jit_compile):
    """The tokenizer and CLIP of a saved folder (both formats) around ``backbone`` -> a `ClipCap`.

    A tokenizer with more tokens than GPT-2 has embedding rows is refused (`ModelLoadError`), as conversion
    refuses it: its extra tokens have no row, so GPT-2 never generates them (such a stop token would never
    stop a caption). Fewer tokens than rows is fine: GPT-2 checkpoints are often padded."""
    from utils.preset_utils import CONFIG_FILE
    from utils.tokenizer import load_gpt2_tokenizer

    config_path = directory / CONFIG_FILE
    tokenizer_dir = sub_folder(directory, config, "tokenizer")
    tokenizer = build_or_explain("tokenizer", tokenizer_dir, lambda: load_gpt2_tokenizer(str(tokenizer_dir)))
    rows = int(backbone.gpt2.vocab_size)
    if len(tokenizer) > rows:
        raise ModelLoadError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's GPT-2 "
                             f"only {rows} embedding rows: they do not belong together (the tokenizer was edited "
                             "or replaced); save or convert the model again with its own tokenizer")
    given_clip = clip is not None
    if clip is None and config.get("clip") is not None:
        from models.siamese.clip import CLIP

        # the text encoder (re-ranking only) is read when first used: captioning's start-up does not pay it
        clip = CLIP.load(str(sub_folder(directory, config, "clip")), jit_compile=jit_compile, lazy_text=True)
    info = {k: config.get(k) for k in cls.INFO_KEYS}
    info["name"] = valid_name(config.get("name"), config_path) or folder_name(directory)
    model = cls(backbone, tokenizer, clip=clip, jit_compile=jit_compile, info=info)
    model.record_identity(loaded_identity(model, directory, given_clip))
    return model


def loaded_identity(model, directory, given_clip=False):
    """The identity of ``model`` as just loaded from ``directory``: the one its metadata.json records, else
    None (a folder saved before identities were recorded, format 1, or another CLIP given to the load):
    `ClipCap.identity` then computes it from the loaded weights once, when first needed (a load that never
    caches a caption, the web demo's, pays nothing)."""
    from models.image_captioning.identity import recorded_identity

    identity = None if given_clip else recorded_identity(directory)
    if identity is None:
        logging.getLogger(__name__).info("%s: no recorded identity%s; computed from the weights when needed",
                                         directory, " for this CLIP" if given_clip else
                                         " (save the model again to record it)")
    return identity
