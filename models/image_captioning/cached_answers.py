"""Nothing to do, nothing loaded: answer a rerun from map.json without loading the model (nor TensorFlow).

A rerun whose every image is already in map.json, captioned by the same model with the same settings from
the same bytes (`models.image_captioning.freshness`, as `prediction.predict` checks them), needs no model: loading
one costs seconds, compiling it more. `answers_from_map` gives ``predict``'s results for such a run (every one
``cached``), or None as soon as one input needs work: then the caller loads the model and runs ``predict``,
which reuses whatever map.json holds.

The model's identity, which map.json's settings record (`models.image_captioning.identity`), is read from
the saved folder's ``metadata.json``, and its name (for display and the default output folder) from its
``config.json`` as `ClipCap.load` names the model (`saved_model_name`); no weights are read. A folder without a
recorded identity (saved by an earlier version) gets no answer here: the model is loaded, which computes it.

Example::

    results = answers_from_map("pretrained_models/coco", ["demo/"], method="beam", beam_size=5)
    if results is None:                   # something to caption: load the model
        results = ClipCap.load("coco").predict(["demo/"], method="beam", beam_size=5)
"""

import logging
from pathlib import Path

from custom_architectures.decoding import as_decoding
from models.image_captioning.freshness import is_fresh
from models.image_captioning.identity import recorded_identity
from models.image_captioning.prediction import (
    MAP_FILENAME,
    _result,
    default_output_dir,
    expand_inputs,
    generation_settings_for,
    load_map,
)
from utils.file_utils import DEFAULT_MAX_BYTES, UnsafePathError, read_json

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
_CONFIG_MAX_BYTES = 1 << 20


def _read_config(model_dir):
    config_path = Path(model_dir) / CONFIG_FILENAME
    config = read_json(config_path, _CONFIG_MAX_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a saved model's config")
    return config_path, config


def saved_model_name(model_dir):
    """The name `ClipCap.load` gives the model saved in ``model_dir`` (`saving.valid_name`, else
    `saving.folder_name`). Raises OSError / ValueError for a missing or unreadable config."""
    from models.image_captioning.saving import folder_name, valid_name

    config_path, config = _read_config(model_dir)
    return valid_name(config.get("name"), config_path) or folder_name(model_dir)


def _holds_int8_weights(config) -> bool:
    """Whether a saved config records int8 weights: GPT-2's ``quantization`` entry, present only then
    (`custom_architectures.quantization`), wherever the serialized backbone nests it."""
    pending = [config]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if value.get("quantization") is not None:
                return True
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def saved_identity_in(model_dir, identity, precision):
    """The identity the model saved in ``model_dir`` (whose recorded identity is ``identity``) has once loaded
    in ``precision``, as ``ClipCap.load(..., precision=...)`` gives it, without loading it; None when it cannot
    be loaded so. A float32 folder: `models.precision.precision_identity` (float32: unchanged). A folder of int8
    weights records their own identity, which loading as saved (None) or in int8 keeps; any other precision
    is refused by the load (its float32 weights are not there): None, never the int8 captions.
    Raises OSError / ValueError for a missing or unreadable config."""
    from models.precision import precision_identity, resolve_precision

    if identity is None:
        return None
    if not _holds_int8_weights(_read_config(model_dir)[1]):
        return precision_identity(identity, precision)
    if precision is None or resolve_precision(precision).name == "int8":
        return identity
    return None


def answers_from_map(model_dir, images, method="greedy", output_dir=None, return_candidates=False,
                     exif_transpose=True, precision=None, max_file_bytes=DEFAULT_MAX_BYTES, **generate_kwargs):
    """``predict``'s results for ``images`` taken from map.json alone, or None when any input needs the model
    (not in map.json, made with other settings, file changed since, an input that cannot be expanded).

    ``model_dir`` is a saved model's folder (only its config.json and metadata.json are read); ``output_dir``
    as in ``predict`` (default `prediction.default_output_dir`: ``<model store>/.outputs/<name>``); ``method``
    a method's name with its ``generate_kwargs``, or a checked `custom_architectures.decoding.Decoding`;
    ``precision``: the one the model would be loaded in (`models.precision`: its results are keyed apart;
    `saved_identity_in`: an int8 folder asked for another precision gets no answer, as its load fails);
    ``max_file_bytes`` as in ``predict`` (None: no limit): a larger file is never answered from map.json (the
    caller's ``predict`` then refuses it), whether or not its neighbours need the model.
    """
    request = as_decoding(method, generate_kwargs)
    try:
        name = saved_model_name(model_dir)
        identity = saved_identity_in(model_dir, recorded_identity(model_dir), precision)
    except (OSError, ValueError, UnsafePathError) as e:
        logger.debug("no answer from map.json: %s", e)
        return None
    if identity is None:
        logger.debug("no answer from map.json: %s records no identity, or is not loaded in precision %s",
                      model_dir, precision)
        return None
    directory = Path(output_dir) if output_dir is not None else default_output_dir(name)
    try:
        stored = load_map(directory / MAP_FILENAME)
    except ValueError:  # a damaged map.json: predict reports it
        return None
    settings = generation_settings_for(name, identity, request.method, request.given, exif_transpose)
    results = []
    for entry in expand_inputs(images):
        cached = stored.get(entry.key) if entry.error is None and entry.key is not None else None
        if not is_fresh(cached, settings, entry.key, max_file_bytes):
            return None
        results.append(_result(entry, caption=cached["caption"], candidates=cached.get("candidates"),
                               cached=True))
    if not results:
        return None
    if not return_candidates:
        for r in results:
            r.pop("candidates", None)
    return results
