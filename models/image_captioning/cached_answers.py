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


def saved_model_name(model_dir):
    """The name `ClipCap.load` gives the model saved in ``model_dir`` (`saving.valid_name`, else
    `saving.folder_name`). Raises OSError / ValueError for a missing or unreadable config."""
    from models.image_captioning.saving import folder_name, valid_name

    config_path = Path(model_dir) / CONFIG_FILENAME
    config = read_json(config_path, _CONFIG_MAX_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a saved model's config")
    return valid_name(config.get("name"), config_path) or folder_name(model_dir)


def answers_from_map(model_dir, images, method="greedy", output_dir=None, return_candidates=False,
                     exif_transpose=True, precision=None, max_file_bytes=DEFAULT_MAX_BYTES, **generate_kwargs):
    """``predict``'s results for ``images`` taken from map.json alone, or None when any input needs the model
    (not in map.json, made with other settings, file changed since, an input that cannot be expanded).

    ``model_dir`` is a saved model's folder (only its config.json and metadata.json are read); ``output_dir``
    as in ``predict`` (default `prediction.default_output_dir`: ``<model store>/.outputs/<name>``); ``method``
    a method's name with its ``generate_kwargs``, or a checked `custom_architectures.decoding.Decoding`;
    ``precision``: the one the model would be loaded in (`models.precision`: its results are keyed apart);
    ``max_file_bytes`` as in ``predict`` (None: no limit): a larger file is never answered from map.json (the
    caller's ``predict`` then refuses it), whether or not its neighbours need the model.
    """
    from models.precision import precision_identity

    request = as_decoding(method, generate_kwargs)
    try:
        name = saved_model_name(model_dir)
    except (OSError, ValueError, UnsafePathError) as e:
        logger.debug("no answer from map.json: %s", e)
        return None
    identity = precision_identity(recorded_identity(model_dir), precision)
    if identity is None:
        logger.debug("no answer from map.json: %s records no identity", model_dir)
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
