"""How a command's ``--model`` value becomes a model: a folder, a saved name in the store, or an official name
(downloaded and converted once). Beside the models, so that `utils.cli` (light, shared by every command)
never imports a model.

Example::

    from models.cli_models import model_or_exit_code
    model, code = model_or_exit_code(args.model)     # (ClipCap, None) or (None, 2 | 3) with the error printed
"""

import contextlib
import logging
import os

from utils.cli import EXIT_MODEL, EXIT_USAGE, MODEL_ERRORS, fail


class UnknownModelError(KeyError):
    """--model names neither a directory, nor a saved model in the store, nor a downloadable model."""


def resolve_model_dir(name_or_dir, download=True):
    """The saved model a ``--model`` value names: a directory as given (``.`` too), a saved name in the model
    store (`utils.model_store.model_dir`), or an official name (downloaded and converted once when
    ``download``, else returned as the name); `UnknownModelError` if it is none of them."""
    from utils.model_store import home_dir, is_model_folder, model_dir, recover_model_dir, saved_model_dir

    with contextlib.suppress(ValueError):
        recover_model_dir(model_dir(name_or_dir))  # a save killed half-way: finished or rolled back first
    if os.path.isdir(name_or_dir):
        return os.path.abspath(name_or_dir)  # also what every worker of a distributed job reads
    try:
        directory = model_dir(name_or_dir)  # a path that is no folder, or a plain name in the store
    except ValueError:  # neither a path nor a plain name ("", "a b"): it can only be unknown
        directory = None
    if directory is not None and is_model_folder(directory):  # recognised, even holding user files
        return str(directory)
    from models.image_captioning.presets import MODELS

    if name_or_dir in MODELS:
        if not download:
            return name_or_dir
        from models.image_captioning.clip_cap import ClipCap
        from models.image_captioning.pretrained import get_pretrained

        get_pretrained(ClipCap, name_or_dir)
        return str(saved_model_dir(name_or_dir))
    raise UnknownModelError(f"unknown model {name_or_dir!r}: not a directory, not a saved model in "
                            f"{home_dir()}, and not one of {', '.join(MODELS)}")


def load_model(name_or_dir, precision=None):
    """A `ClipCap` from a ``--model`` value (see `resolve_model_dir`), in ``precision`` (`models.precision`);
    official names are downloaded and converted on first use by ``ClipCap.load``."""
    target = resolve_model_dir(name_or_dir, download=False)
    logging.getLogger(__name__).info("loading model %s", name_or_dir)
    from models.image_captioning.clip_cap import ClipCap

    return ClipCap.load(target, precision=precision)


def model_or_exit_code(name_or_dir, load=load_model):
    """``(load(name_or_dir), None)``, or ``(None, exit code)`` with the error printed: 2 for an unknown
    name, 3 for a model that cannot be downloaded, converted or loaded."""
    try:
        return load(name_or_dir), None
    except UnknownModelError as e:
        return None, fail(e.args[0], EXIT_USAGE)
    except MODEL_ERRORS as e:
        return None, fail(f"cannot load model {name_or_dir!r}: {e}", EXIT_MODEL)
