"""How a `CLIP` is saved and loaded: the saved-model folder (format 2, `utils.preset_utils`) and format 1.

Format 2 (written by ``CLIP.save``)::

    config.json        {"architecture": "openai_clip", "format_version": 2, "tokenizer": {"context_length"} | null,
                        "model": keras.saving.serialize_keras_object(CLIPModel)}
    model.weights.h5   Keras' weights file, float32, datasets aligned and indexed (`utils.weights_io`):
                       mapped into the variables at load, nothing converted (OpenAI's float16 values are
                       widened once, at conversion; twice the size of float16, ~0.6 s less per load)
    metadata.json      format version, library version, date, source file and SHA-256, ``weights_dtype``
    README.md          a short model card
    bpe_simple_vocab_16e6.txt.gz   the tokenizer's vocabulary (when there is a text encoder)

Format 1 (before): config.json (``format_version`` 1, ``clip``: the architecture dict) and ``weights.h5``
(every variable under ``visual/<path>``, ``text/<path>``, ``logit_scale``); still read, strictly.
"""

from pathlib import Path

from custom_architectures.clip_arch import CLIPModel, build_clip
from utils.convert.common import CheckpointError

ARCHITECTURE = "openai_clip"
FORMAT1_WEIGHTS = "weights.h5"
#: where the text tower's tensors sit in a format-2 model.weights.h5 (Keras' walk names it by its class)
TEXT_PART = "layers/text_transformer/"


def is_saved_clip(directory) -> bool:
    """Whether ``directory`` is a CLIP this library saved (its config.json names "openai_clip")."""
    from utils.model_store import is_saved_model

    return is_saved_model(directory, architecture=ARCHITECTURE)


def _why_not_saved_clip(directory):
    from utils.model_store import saved_model_problem

    return saved_model_problem(directory, architecture=ARCHITECTURE)


is_saved_clip.why_not_ours = _why_not_saved_clip  # what `utils.file_utils.check_replaceable` reports


def clip_card(clip, weights_dtype) -> str:
    c = clip.model.config
    kind = "ViT" if clip.model.is_vit else "ModifiedResNet"
    return "\n".join([
        "# OpenAI CLIP", "",
        f"- image encoder: {kind}, input {clip.input_resolution} px, embedding size {clip.embed_dim}",
        f"- text encoder: {'included' if clip.model.text is not None else 'not included (image only)'}",
        f"- weights stored: {weights_dtype['float16']} tensors float16 (exact), {weights_dtype['float32']} float32",
        f"- source: {clip.source or 'unknown'}" + (f" (SHA-256 {clip.source_sha256})" if clip.source_sha256 else ""),
        f"- architecture: {c}", "", "Load it (no torch needed):", "", "```python",
        "from models.siamese import CLIP", "clip = CLIP.load(\"path/to/this/folder\")", "```", "",
    ])


def save_clip(clip, directory, overwrite=False):
    """`CLIP.save`: a format-2 folder at ``directory`` (atomic; replaces only an empty folder or, with
    ``overwrite``, a saved CLIP). Returns ``directory``."""
    clip.load_text()  # a text encoder loaded lazily is saved too
    from models import __version__
    from utils.file_utils import replace_dir
    from utils.preset_utils import WEIGHTS_FILE, preset_metadata, write_preset
    from utils.weights_io import save_weights

    # "clip": the flat architecture (`clip_config_from_shapes`), readable without Keras (`saved_clip_config`)
    header = {"tokenizer": None if clip.tokenizer is None else {"context_length": clip.tokenizer.context_length},
              "clip": dict(clip.model.config)}

    def write(staging):
        # the weights first: how many tensors of each dtype goes into the metadata and the card
        counts = save_weights(clip.model, staging / WEIGHTS_FILE)  # float32: mapped at load, nothing converted
        metadata = preset_metadata(__version__, source=clip.source, source_sha256=clip.source_sha256,
                                   weights_dtype=counts)
        write_preset(staging, clip.model, ARCHITECTURE, metadata, clip_card(clip, counts), header=header,
                     write_extra=lambda d: clip.tokenizer is not None and clip.tokenizer.save(str(d)),
                     save_weights=lambda path: None)

    replace_dir(directory, write, is_ours=is_saved_clip, overwrite=overwrite)
    return directory


def load_clip(cls, directory, jit_compile="auto", lazy_text=False):
    """`CLIP.load`: a format-2 or format-1 folder -> a `CLIP`. A damaged config.json or weights file raises
    `CheckpointError` naming the file. ``lazy_text``: a format-2 folder's text encoder and tokenizer are read
    when first used (`CLIP.load_text`), not now (ClipCap's start-up: +0.46 s for ViT-B/32's text tower, +0.2 s
    for the tokenizer's vocabulary)."""
    from utils.preset_utils import (
        CONFIG_FILE,
        load_preset_model,
        read_metadata,
        read_preset_config,
        read_saved_header,
    )

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = read_saved_header(directory, ARCHITECTURE, CheckpointError, "CLIP")
    metadata = {}
    text_loader = None
    if config.get("format_version") == 1:
        model = _load_format1(directory, config)
    elif lazy_text and _has_text(config):
        config = read_preset_config(directory, ARCHITECTURE, CheckpointError)
        _tokenizer_kwargs(config, config_path)
        model = _load_visual_part(directory, config)
        metadata = read_metadata(directory, CheckpointError)
        text_loader = lambda: _load_text_part(directory, config)  # noqa: E731
    else:
        config = read_preset_config(directory, ARCHITECTURE, CheckpointError)
        model = load_preset_model(directory, config, CheckpointError, expected=CLIPModel)
        if not isinstance(model, CLIPModel):
            raise CheckpointError(f"{config_path}: 'model' is a {type(model).__name__}, not a CLIPModel")
        metadata = read_metadata(directory, CheckpointError)
    tokenizer_kwargs = _tokenizer_kwargs(config, config_path)  # checked before anything is built from it
    tokenizer = None
    if tokenizer_kwargs is not None and text_loader is None:
        tokenizer = _load_tokenizer(directory, tokenizer_kwargs)
    clip = cls(model, tokenizer, jit_compile=jit_compile, text_loader=text_loader)
    clip.source, clip.source_sha256 = metadata.get("source"), metadata.get("source_sha256")
    return clip


#: the most tokens a CLIP's context may hold (OpenAI's: 77): a larger value is a damaged config
MAX_CONTEXT_LENGTH = 4096


def _tokenizer_kwargs(config, config_path):
    """config.json's ``tokenizer`` entry, checked: None (no text encoder) or ``{"context_length": n}`` with n a
    positive integer (at most `MAX_CONTEXT_LENGTH`), as `save_clip` writes it; `CheckpointError` naming the
    file and the entry for anything else (a list, an unknown key, a string)."""
    value = config.get("tokenizer")
    if value is None:
        return None
    length = value.get("context_length", 77) if isinstance(value, dict) else None
    if (not isinstance(value, dict) or set(value) - {"context_length"} or not isinstance(length, int)
            or isinstance(length, bool) or not 0 < length <= MAX_CONTEXT_LENGTH):
        import json

        raise CheckpointError(f"{config_path}: entry 'tokenizer' is {json.dumps(value, default=str)[:80]}, not null "
                              f"or {{\"context_length\": n}} (n from 1 to {MAX_CONTEXT_LENGTH}); the saved CLIP is "
                              "damaged or was edited: save it again")
    return {"context_length": length}


def _load_tokenizer(directory, kwargs):
    """The `CLIPTokenizer` of a saved folder; a missing or damaged vocabulary file is a `CheckpointError`
    naming it."""
    from models.siamese.clip_tokenizer import CLIPTokenizer

    try:
        return CLIPTokenizer.from_directory(str(directory), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the CLIP tokenizer of {directory} ({e}); the saved CLIP is damaged: "
                              "save it again") from e


def _has_text(config) -> bool:
    model = config.get("model")
    return (config.get("tokenizer") is not None and isinstance(model, dict) and isinstance(model.get("config"), dict)
            and model["config"].get("text") is not None)


def _load_visual_part(directory, config):
    """The `CLIPModel` of a format-2 folder without its text tower (text=None), from the file's other tensors."""
    from utils.preset_utils import load_preset_model
    from utils.weights_io import load_weights_part

    model_config = config["model"]
    visual_config = {**config, "model": {**model_config, "config": {**model_config["config"], "text": None}}}
    model = load_preset_model(directory, visual_config, CheckpointError, load_weights=lambda m, path: load_weights_part(
        m, path, lambda name: not name.startswith(TEXT_PART)))
    if not isinstance(model, CLIPModel):
        raise CheckpointError(f"{directory}: 'model' is a {type(model).__name__}, not a CLIPModel")
    return model


def _load_text_part(directory, config):
    """(text tower, tokenizer) of a format-2 folder: what `load_clip` left for later with ``lazy_text``."""
    import keras

    from utils.preset_utils import CONFIG_FILE, WEIGHTS_FILE, check_finite_weights, check_model_size
    from utils.weights_io import load_weights_part, variables_to_be_loaded

    weights_path = Path(directory) / WEIGHTS_FILE
    tokenizer_kwargs = _tokenizer_kwargs(config, Path(directory) / CONFIG_FILE)
    check_model_size(config["model"]["config"]["text"], weights_path, Path(directory) / CONFIG_FILE, CheckpointError)
    try:
        with variables_to_be_loaded():
            text = keras.layers.deserialize(config["model"]["config"]["text"])
        load_weights_part(text, weights_path, lambda name: name.startswith(TEXT_PART))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot load CLIP's text encoder from {weights_path} ({type(e).__name__}: {e}); "
                              "the file is damaged or does not match config.json: save or convert it again") from e
    check_finite_weights(text, weights_path, CheckpointError)  # as the eager load checks it
    return text, _load_tokenizer(directory, tokenizer_kwargs)


def saved_clip_config(directory) -> dict:
    """The architecture dict (`clip_config_from_shapes`'s) of a saved CLIP folder, either format, without
    loading weights (e.g. its ``image_resolution``)."""
    from utils.preset_utils import CONFIG_FILE, read_json_file

    path = Path(directory) / CONFIG_FILE
    config = read_json_file(path, CheckpointError)
    if not isinstance(config.get("clip"), dict):  # both formats write it
        raise CheckpointError(f"{path} lacks the key 'clip' (the architecture): the saved CLIP is damaged; save "
                              "it again")
    return dict(config["clip"])


# ----------------------------------------------------------------------------------------- format 1


def _load_format1(directory, config):
    config_path, weights_path = directory / "config.json", directory / FORMAT1_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved CLIP model: {FORMAT1_WEIGHTS} missing")
    if not isinstance(config.get("clip"), dict):
        raise CheckpointError(f"{config_path} lacks the key 'clip' (the architecture): the saved CLIP is "
                              "damaged; save it again")
    try:
        model = build_clip(config["clip"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid 'clip' architecture ({type(e).__name__}: {e}); the "
                              "saved CLIP is damaged: save it again") from e
    try:
        _load_format1_weights(model, weights_path)
    except OSError as e:  # h5py: truncated or not an HDF5 file
        raise CheckpointError(f"cannot read {weights_path} ({e}); the file is damaged: save the CLIP "
                              "again") from e
    return model


def _load_format1_weights(model, weights_path):
    """Assign every variable of ``model`` from a format-1 weights.h5 (strict: all present, nothing left over)."""
    import h5py

    variables = named_variables(model)
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


def named_variables(model):
    """{"visual/<path>" | "text/<path>" | "logit_scale": variable}: the format-1 weights file's names."""
    named = {f"visual/{v.path}": v for v in model.visual.weights}
    if model.text is not None:
        named.update({f"text/{v.path}": v for v in model.text.weights})
    named["logit_scale"] = model.logit_scale
    if len(named) != len(model.visual.weights) + (len(model.text.weights) if model.text else 0) + 1:
        raise RuntimeError("CLIP variables do not have unique paths")
    return named
