"""The saved-model folder, format 2 (keras-hub's preset idea): one writer and one reader for every model.

A folder holds:

- ``config.json``: ``{"architecture": "clipcap" | "openai_clip", "format_version": 2, "model":
  keras.saving.serialize_keras_object(model), ...}`` (the caller adds its own top-level entries: tokenizer
  folder, CLIP folder, name...);
- ``model.weights.h5``: Keras' ``save_weights`` of that model;
- ``metadata.json``: format version, library version, UTC date, the source checkpoint's name and SHA-256
  when the model was converted from a file, and whatever the caller adds (e.g. the weights' dtype);
- ``README.md``: a short model card;
- the caller's extra files (tokenizer, a nested CLIP folder), written by its ``write_extra(staging)``.

The folder is built beside its destination and renamed into place (`utils.file_utils.replace_dir`), so a
reader sees the old folder or the new one; an existing destination is replaced only under the rules of
`utils.file_utils.check_replaceable`. Nothing here imports the models: they pass themselves in.

Example::

    save_preset("pretrained_models/coco", backbone, "clipcap", metadata=preset_metadata("2.0.0"),
                card="# coco\\n...", is_ours=is_saved_model, write_extra=lambda d: tok.save_pretrained(d / "tokenizer"))
    config = read_preset_config("pretrained_models/coco", "clipcap", ModelLoadError)
    backbone = load_preset_model("pretrained_models/coco", config, ModelLoadError)
"""

import datetime
import json
import os
from pathlib import Path

from utils.file_utils import UnsafePathError, read_json, replace_dir

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
MAX_CONFIG_BYTES = 64 << 20  # a 124M GPT-2's config is a few kB; refuse absurd files before parsing


def preset_metadata(library_version, source=None, source_sha256=None, **extra) -> dict:
    """The ``metadata.json`` entries: format 2, library version, UTC date (ISO 8601, seconds), the source
    checkpoint's file name and SHA-256 (None when the model was not converted from a file), then ``extra``."""
    date = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return {"format_version": FORMAT_VERSION, "library_version": library_version, "date": date,
            "source": None if source is None else os.path.basename(os.fspath(source)),
            "source_sha256": source_sha256, **extra}


def write_preset(staging, model, architecture, metadata, card, header=None, write_extra=None,
                 save_weights=None):
    """Write a format-2 folder into the (new, empty) folder ``staging``; see the module docstring.

    ``metadata``: a dict, or ``metadata(staging) -> dict`` called once every other file is written (metadata.json
    is then written last: what records a fingerprint of the other files).

    ``save_weights(path)``: how to write ``model.weights.h5`` (default: `utils.weights_io.save_weights`,
    Keras' file with aligned datasets, which `load_preset_model` maps instead of reading)."""
    import keras

    from utils.weights_io import save_weights as save_aligned

    staging = Path(staging)
    config = {"architecture": architecture, "format_version": FORMAT_VERSION, **(header or {}),
              "model": keras.saving.serialize_keras_object(model)}
    (save_weights or (lambda path: save_aligned(model, path)))(str(staging / WEIGHTS_FILE))
    if write_extra is not None:
        write_extra(staging)
    if not callable(metadata):
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    (staging / CARD_FILE).write_text(card, encoding="utf-8")
    # config.json last: a folder whose config names the architecture is a saved model (is_ours)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if callable(metadata):  # made from the files just written (e.g. their fingerprint): written after them
        (staging / METADATA_FILE).write_text(json.dumps(metadata(staging), indent=2) + "\n", encoding="utf-8")


def save_preset(directory, model, architecture, metadata, card, header=None, write_extra=None, is_ours=None,
                overwrite=False, save_weights=None):
    """`write_preset` into a new folder published atomically at ``directory`` (`replace_dir`: an existing
    ``directory`` is replaced only when empty, or when ``is_ours`` recognises it and ``overwrite``).
    Returns the directory (Path)."""
    replace_dir(directory, lambda staging: write_preset(staging, model, architecture, metadata, card, header,
                                                        write_extra, save_weights),
                is_ours=is_ours, overwrite=overwrite)
    return Path(directory)


def read_json_file(path, error, what="config"):
    """A JSON object from a regular file (bounded read); ``error`` (an exception class) names the file when
    it is not readable, not JSON or not an object."""
    try:
        value = read_json(path, MAX_CONFIG_BYTES)
    except (UnsafePathError, OSError, ValueError) as e:  # read_json: bounded size and nesting
        raise error(f"{path} is not a readable {what} ({e}); save or convert the model again") from e
    if not isinstance(value, dict):
        raise error(f"{path} is not a readable {what}: a JSON object was expected, got {type(value).__name__}")
    return value


def _check_architecture(config, architecture, path, what):
    if config.get("architecture") != architecture:
        raise ValueError(f"{path} does not describe a {what} model: {config.get('architecture')!r}")


def read_saved_header(directory, architecture, error, what=None):
    """``config.json`` of a saved folder of any format version, checked to be ``architecture``'s (``what``:
    the model's name in messages): FileNotFoundError when the folder has none (not a saved model), ``error``
    when it is unreadable, ValueError when it describes another model. Which reader the folder needs is the
    caller's (its ``format_version``)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved {what or architecture} model: {CONFIG_FILE} not found")
    config = read_json_file(path, error)
    _check_architecture(config, architecture, path, what or architecture)
    return config


def read_preset_config(directory, architecture, error, required=()):
    """``config.json`` of a format-2 folder, checked: ``architecture`` (ValueError for another model's
    folder), ``format_version`` 2 and the ``model`` entry plus ``required`` keys (``error`` naming the file
    and the key)."""
    path = Path(directory) / CONFIG_FILE
    config = read_json_file(path, error)
    _check_architecture(config, architecture, path, architecture)
    if config.get("format_version") != FORMAT_VERSION:
        raise error(f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("model", *required):
        if key not in config:
            raise error(f"{path} lacks the key {key!r}: the saved model is damaged or was not written by this "
                        "library; save or convert it again")
    if not isinstance(config["model"], dict):
        raise error(f"{path}: 'model' must be an object (a serialized Keras model), got "
                    f"{type(config['model']).__name__}: the saved model is damaged or was edited; save or convert "
                    "it again")
    check_model_config(config["model"], path, error)
    return config


#: the dtypes / dtype policies a saved model may name: Keras' floating ones and mixed-precision policies
DTYPE_NAMES = frozenset({"float16", "float32", "float64", "bfloat16", "mixed_float16", "mixed_bfloat16"})
_DTYPE_KEYS = ("dtype", "dtype_policy")
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy")
#: the packages whose classes a saved model's config may name (Keras' and this library's layers)
_CONFIG_MODULES = ("keras", "custom_architectures", "custom_layers")


#: the dtype policy every layer of a saved model runs in: bfloat16 models are not saved (`models.precision`:
#: not ``savable``) and an int8 one keeps float32 policies (its int8 weights are variables of float32 layers)
SAVED_POLICY = "float32"


def _policy_name(value):
    """The policy name of a config's dtype entry that `_is_known_dtype` accepts (None for None)."""
    return value["config"]["name"] if isinstance(value, dict) else value


def check_model_config(value, config_path, error, where="model"):
    """Refuse (``error`` naming ``config_path`` and the entry) a serialized model that names anything but
    Keras' and this library's classes (and the registered mapper types': `_is_registered_mapper`), or a dtype
    other than `DTYPE_NAMES` (a plain name or a Keras ``DTypePolicy``): Keras would resolve e.g.
    ``{"class_name": "function", "module": "os"}`` as a dtype and load; or a layer whose dtype policy is not
    `SAVED_POLICY` (a float32 folder whose config.json was edited to "bfloat16" would load as float32 and fail
    at its first caption: bfloat16 layers, float32 inputs). Checked before ``deserialize_keras_object`` sees
    the config (read by `read_json_file`: its nesting is bounded, so this walk is too): by `read_preset_config`
    on the whole model (a part built later, as CLIP's lazily loaded text tower, included) and again by
    `load_preset_model`."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_model_config(item, config_path, error, f"{where}[{i}]")
        return
    if not isinstance(value, dict):
        return
    if "class_name" in value or "module" in value:
        module, class_name = value.get("module"), value.get("class_name")
        if (not isinstance(module, str) or not isinstance(class_name, str) or class_name in ("function", "__lambda__")
                or not (module.split(".")[0] in _CONFIG_MODULES or _is_registered_mapper(module, class_name))):
            raise error(f"{config_path}: {where} names {module!r}.{class_name!r}, not a Keras or image_captioning "
                        "class: refused (the saved model is damaged or was edited); save or convert it again")
    for key, item in value.items():
        if key in _DTYPE_KEYS and not _is_known_dtype(item):
            raise error(f"{config_path}: {where}.{key} is {json.dumps(item)[:120]}, not one of "
                        f"{', '.join(sorted(DTYPE_NAMES))} (or a Keras DTypePolicy of one): refused; save or convert "
                        "the model again")
        if key in _DTYPE_KEYS and _policy_name(item) not in (None, SAVED_POLICY):
            layer = value.get("name")
            raise error(f"{config_path}: {where}.{key}{f' (layer {layer!r})' if isinstance(layer, str) else ''} is "
                        f"{_policy_name(item)!r}, expected {SAVED_POLICY!r}: a saved model's layers run in "
                        f"{SAVED_POLICY} (a bfloat16 model is not saved: load the float32 one with "
                        "precision='bfloat16'); config.json was edited: refused; save or convert the model again")
        check_model_config(item, config_path, error, f"{where}.{key}")


def _is_registered_mapper(module, class_name):
    """Whether ``module.class_name`` is a mapper type this process registered (`mapper_registry.MAPPERS`): a
    mapper class written outside the library's packages loads, and a config still names no other class."""
    from custom_architectures.transformers_arch.mapper_registry import MAPPERS

    classes = (entry.resolve() for entry in MAPPERS.values())
    return any(cls.__module__ == module and cls.__qualname__ == class_name for cls in classes)


def _is_known_dtype(value):
    """Whether a config's dtype entry is None, a name of `DTYPE_NAMES` or Keras' DTypePolicy of one."""
    if value is None or isinstance(value, str):
        return value is None or value in DTYPE_NAMES
    return (isinstance(value, dict) and value.get("module") == "keras" and value.get("class_name") in _POLICY_CLASSES
            and value.get("registered_name") is None and isinstance(value.get("config"), dict)
            and set(value["config"]) == {"name"} and value["config"]["name"] in DTYPE_NAMES)


#: how many parameters one stored value may stand for at most (a packed low-bit format stores two per byte)
_VALUES_PER_ELEMENT = 2


def implied_parameters(value) -> int:
    """A lower bound of the parameter count of the serialized model ``value`` (config.json's ``model``),
    from its GPT-2, CLIP towers (ViT or ModifiedResNet) and mappers' sizes (each transformer layer at least its
    12 width² projections, a mapper's 4, each ResNet block its 3x3 conv, each embedding table its rows x
    width), without building anything: what a config edited to n_layer 10**9
    would allocate. Entries that are not positive integers count for nothing (the model's own checks refuse
    them)."""
    total = 0
    stack = [value]
    while stack:  # iterative: the config's nesting is bounded by `read_json_file`, its breadth is not
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        stack.extend(item.values())
        c = item.get("config") if isinstance(item.get("config"), dict) else None
        if c is None:
            continue

        def size(*keys, _c=c):
            values = [_c.get(k) for k in keys]
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
            return values if ok else None

        kind = item.get("class_name")
        if kind == "GPT2" and (v := size("vocab_size", "n_positions", "n_embd", "n_layer")):
            total += v[2] * (v[0] + v[1]) + 12 * v[3] * v[2] ** 2
        elif kind == "TextTransformer" and (v := size("vocab_size", "context_length", "width", "layers")):
            total += v[2] * (v[0] + v[1]) + 12 * v[3] * v[2] ** 2
        elif kind == "VisionTransformer" and (v := size("input_resolution", "patch_size", "width", "layers")):
            total += 3 * v[1] ** 2 * v[2] + ((v[0] // v[1]) ** 2 + 1) * v[2] + 12 * v[3] * v[2] ** 2
        elif kind == "ModifiedResNet" and (v := size("input_resolution", "width", "output_dim")):
            stages = c.get("layers")
            if isinstance(stages, list) and all(type(n) is int and n > 0 for n in stages):
                # each block's 3x3 conv (planes² x 9); the attention pool's q, k, v (32 width)², c_proj, positions
                total += sum(n * 9 * (v[1] * 2 ** i) ** 2 for i, n in enumerate(stages))
                total += 32 * v[1] * (3 * 32 * v[1] + v[2]) + ((v[0] // 32) ** 2 + 1) * 32 * v[1]
        elif (v := size("prefix_length", "n_embd")) is not None:  # a mapper: its output is K x n_embd
            total += v[0] * v[1]
            if kind == "ClipCapTransformerMapper" and (w := size("num_layers", "clip_length", "prefix_size")):
                total += 4 * w[0] * v[1] ** 2 + w[2] * w[1] * v[1]  # q, k, v, project per layer; the linear
            elif kind == "ClipCapMLP" and (w := size("prefix_size")):
                total += w[0] * v[0] * v[1] // 2  # the first Linear: D -> K x C / 2 (or K x C)
    return total


def stored_values(weights_path) -> int:
    """The number of values the HDF5 file ``weights_path`` stores (its datasets' sizes, from its header: no
    data read)."""
    import h5py

    sizes = []
    with h5py.File(weights_path, "r") as f:
        f.visititems(lambda name, obj: sizes.append(int(obj.size)) if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes)


def check_model_size(model_config, weights_path, config_path, error):
    """Refuse (``error``) a config whose model would hold more parameters (`implied_parameters`) than the
    weights file stores values (`stored_values`): building it would only exhaust memory before the load
    failed. Checked before anything is built."""
    implied = implied_parameters(model_config)
    if implied == 0:
        return
    try:
        stored = stored_values(weights_path)
    except (OSError, ValueError, RuntimeError) as e:
        raise error(f"cannot read {weights_path} ({type(e).__name__}: {e}); the file is damaged: save or "
                    "convert the model again") from e
    if implied > _VALUES_PER_ELEMENT * stored:
        raise error(f"{config_path}: 'model' describes a model of at least {implied:,} parameters but "
                    f"{weights_path} stores {stored:,} values: refused before building it (config.json is damaged "
                    "or was edited, or the files do not belong together); save or convert the model again")


def load_preset_model(directory, config, error, load_weights=None, expected=None):
    """Rebuild ``config["model"]`` (``keras.saving.deserialize_keras_object``) and load ``model.weights.h5``
    into it (or ``load_weights(model, path)``); ``error`` names config.json or the weights file when either
    is damaged or they do not match: a config whose model is larger than the weights file
    (`check_model_size`, before building), a layer whose dtype policy is not float32 (`check_model_config`),
    or that builds anything but a Keras layer (an ``expected`` class when given) is refused before a weight is
    read; weights that are not finite after (`check_finite_weights`)."""
    import keras

    from utils.weights_io import load_weights_strict, variables_to_be_loaded

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is an incomplete saved model: {WEIGHTS_FILE} missing")
    if not isinstance(config.get("model"), dict):
        raise error(f"{config_path}: 'model' must be an object (a serialized Keras model), got "
                    f"{type(config.get('model')).__name__}; save or convert the model again")
    check_model_config(config["model"], config_path, error)
    check_model_size(config["model"], weights_path, config_path, error)
    try:
        with variables_to_be_loaded():
            model = keras.saving.deserialize_keras_object(config["model"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise error(f"{config_path}: invalid 'model' entry ({type(e).__name__}: {e}); the saved model is "
                    "damaged: save or convert it again") from e
    wanted = expected or keras.layers.Layer
    if not isinstance(model, wanted):
        raise error(f"{config_path}: 'model' builds {type(model).__name__ if not isinstance(model, type) else model}, "
                    f"not a {wanted.__name__}; the saved model is damaged or was edited: save or convert it again")
    try:
        (load_weights or load_weights_strict)(model, weights_path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise error(f"cannot load the weights from {weights_path} ({type(e).__name__}: {e}); the file is "
                    "damaged or does not match config.json: save or convert the model again") from e
    check_finite_weights(model, weights_path, error)
    return model


_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def check_finite_weights(model, weights_path, error):
    """Refuse (``error`` naming ``weights_path``, the variable and where) a ``model`` any of whose floating
    weights holds NaN or an infinity: such a file loads and captions silently wrong (NaN scores, empty
    captions). One vectorised pass over the weights as loaded (one reduction per variable, a single result
    read back): measured 0.05 s for a 124M GPT-2 (float32) on 2 CPU cores, against 0.26 s for its load."""
    import keras
    import numpy as np
    import tensorflow as tf

    variables = [v for v in model.weights if keras.backend.standardize_dtype(v.dtype) in _FLOAT_DTYPES]
    if not variables:
        return
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(v.value)) for v in variables]).numpy()
    if finite.all():
        return
    variable = variables[int(np.argmin(finite))]
    values = np.asarray(variable.numpy())
    bad = ~np.isfinite(values)
    where = np.unravel_index(int(np.argmax(bad)), values.shape) if values.ndim else ()
    raise error(f"{weights_path}: the weight {variable.path} {tuple(values.shape)} is not finite: "
                f"{int(bad.sum()):,} NaN or infinite value(s), the first {values[where]} at index "
                f"{tuple(int(i) for i in where)}; every weight must be finite (the file is damaged or was edited): "
                "refused; save or convert the model again")


def read_metadata(directory, error):
    """``metadata.json`` of a format-2 folder ({} when the file is absent: it is informative only)."""
    path = Path(directory) / METADATA_FILE
    return read_json_file(path, error, what="metadata file") if path.is_file() else {}
