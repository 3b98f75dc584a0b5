"""The model store: where converted models, downloads and results live, and which folder a model name means.

The store is ``$IMAGE_CAPTIONING_HOME``, else ``pretrained_models/`` in the repository. It holds
``downloads/`` (raw files and their ``manifest.json``, see `utils.downloads`), ``<name>/`` per saved model
(config.json naming its ``architecture``) and ``.outputs/<name>/`` for the results made with a model of that
name (`outputs_dir`: never inside a model's folder, which a save replaces whole; a hidden name, which no
model name can be). This module imports no model
and no framework: the CLI, the transport and the models all ask it the same questions.

Example::

    from utils.model_store import model_dir, is_saved_model
    model_dir("coco")            # <store>/coco   (a plain name; "..", "a b", "" are refused)
    model_dir("runs/my_model")   # runs/my_model  (a path stays a path)
    is_saved_model(model_dir("coco"))
"""

import os
from pathlib import Path

from utils.file_utils import (
    UnsafePathError,
    check_model_name,
    read_json,
    recover_replacements,
)

HOME_ENV = "IMAGE_CAPTIONING_HOME"
CONFIG_FILENAME = "config.json"


def home_dir() -> Path:
    """The model store: ``$IMAGE_CAPTIONING_HOME`` or ``pretrained_models/`` in the repository."""
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "pretrained_models"


def saved_model_dir(name, root=None) -> Path:
    """``<model store>/<name>``; ValueError unless ``name`` is a plain name (`check_model_name`), so a name can
    never point outside the store ("", "..", "/abs", "a/b" are refused)."""
    return Path(root or home_dir()) / check_model_name(name)


OUTPUTS_DIRNAME = ".outputs"  # not a model name (`check_model_name`: names start with a letter or digit)
LEGACY_OUTPUTS_DIRNAME = "outputs"  # results went to <store>/<name>/outputs/ before: inside the model's folder


def outputs_dir(name, root=None) -> Path:
    """``<model store>/.outputs/<name>``: where results made with a model named ``name`` go by default.
    Outside ``<store>/<name>`` (a save or ``convert --overwrite`` replaces that folder whole)."""
    return Path(root or home_dir()) / OUTPUTS_DIRNAME / check_model_name(name)


def legacy_outputs_dir(name, root=None) -> Path:
    """``<model store>/<name>/outputs``: where earlier versions wrote those results (moved by
    `models.image_captioning.prediction.migrate_legacy_outputs`)."""
    return saved_model_dir(name, root) / LEGACY_OUTPUTS_DIRNAME


def model_dir(name_or_directory, root=None) -> Path:
    """The folder a model argument means: the one resolution of "a name or a directory".

    A ``Path`` (any ``os.PathLike``), a string with a separator or an absolute one, or an existing folder of
    the working directory is a directory, taken as given; any other string is a model name, which must be
    plain ("", ".", ".." and names with separators are refused, ValueError) and lives in the store
    (`saved_model_dir`).
    """
    if isinstance(name_or_directory, os.PathLike):
        return Path(name_or_directory)
    text = str(name_or_directory)
    separators = [s for s in (os.sep, os.altsep) if s]
    if any(s in text for s in separators) or Path(text).is_absolute():
        return Path(text)
    if text not in ("", ".", "..") and Path(text).is_dir():
        return Path(text)
    return saved_model_dir(text, root)  # ValueError for anything but a plain name


def is_saved_model(directory, architecture="clipcap") -> bool:
    """Whether ``directory`` is a model this library saved: a real folder whose config.json (a regular file)
    names ``architecture`` ("clipcap"; a saved CLIP: "openai_clip"). Only such folders are ever replaced."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        config = read_json(directory / CONFIG_FILENAME, 1 << 20)
    except (UnsafePathError, OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("architecture") == architecture


def recover_model_dir(directory) -> Path:
    """``directory``, after finishing or rolling back a replacement of it that a killed run left half-done
    (`utils.file_utils.recover_replacements`: a complete new copy is published, else the previous copy is put
    back) and removing the temporaries of dead writers beside it. Called wherever a model folder is resolved
    or loaded, so a kill -9 during a save never leaves "unknown model" behind."""
    directory = Path(directory)
    absolute = Path(os.path.abspath(directory))  # "." and "runs/x/.." name their folder too
    if absolute.name:
        recover_replacements(absolute.parent, absolute.name)
    return directory
