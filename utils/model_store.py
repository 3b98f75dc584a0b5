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
import re
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


#: the entries a saved model folder may hold, by architecture: what `ClipCap.save` / `CLIP.save` write (format 2)
#: and what format 1 wrote; a folder holding anything else is not replaced (`saved_model_problem`)
SAVED_FILES = {
    "clipcap": frozenset({"config.json", "model.weights.h5", "metadata.json", "README.md",  # format 2
                          "mapper.weights.h5", "gpt2.weights.h5"}),                       # format 1
    "openai_clip": frozenset({"config.json", "model.weights.h5", "metadata.json", "README.md",
                              "bpe_simple_vocab_16e6.txt.gz", "weights.h5"}),
}
#: the sub-folders: ClipCap's ``tokenizer/`` (its `TOKENIZER_FILES`) and ``clip/`` (a saved CLIP)
SAVED_DIRS = {"clipcap": frozenset({"tokenizer", "clip"}), "openai_clip": frozenset()}
#: what a GPT-2 tokenizer's ``save_pretrained`` writes (this library's and transformers')
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"})
#: temporaries of this library that a killed writer may leave inside a folder: an `atomic_write`'s
#: (``.<name>.~w<pid>-<rnd>.tmp``), the replacement marker, `utils.weights_io.save_weights`' copy of Keras' file
_OWN_TEMPORARIES = re.compile(r"\..+\.~w\d+-[A-Za-z0-9_]+\.tmp|\.image_captioning\.partial"
                              r"|\.model\.weights\.h5\.keras-\d+-[0-9a-f]+\.weights\.h5")
#: legacy results in a store folder (`legacy_outputs_dir`): moved out before a save replaces it
_LEGACY_OUTPUT_FILE = re.compile(r"map\.json(\.lock|\.unsaved-.+\.json)?")
_MAX_ENTRIES = 1000


def is_model_folder(directory, architecture="clipcap") -> bool:
    """Whether ``directory`` looks like a saved ``architecture`` model: a real folder whose config.json (a
    regular file) is a saved config (`saved_config_problem`). What recognises a model; whether it may be
    replaced is `is_saved_model`'s stricter question."""
    return _config_problem(Path(directory), architecture) is None


def _config_problem(directory, architecture):
    if directory.is_symlink() or not directory.is_dir():
        return f"{directory} is not a folder"
    try:
        config = read_json(directory / CONFIG_FILENAME, 1 << 20)
    except (UnsafePathError, OSError, ValueError) as e:
        return f"{directory / CONFIG_FILENAME} is not a readable config ({e})"
    return saved_config_problem(config, architecture, directory / CONFIG_FILENAME)


def saved_config_problem(config, architecture, path="config.json"):
    """Why ``config`` (a parsed config.json) is not one that this library saves for ``architecture``, or None:
    format 2 (``format_version`` 2 and a serialized ``model`` object) or format 1 (ClipCap: ``mapping_type``
    and a ``gpt2`` object; CLIP: a ``clip`` object)."""
    if not isinstance(config, dict) or config.get("architecture") != architecture:
        return f"{path} does not name the architecture {architecture!r}"
    version = config.get("format_version")
    if version == 2 and isinstance(config.get("model"), dict):
        return None
    if version == 1 and (isinstance(config.get("clip"), dict) if architecture == "openai_clip"
                         else isinstance(config.get("gpt2"), dict) and isinstance(config.get("mapping_type"), str)):
        return None
    return f"{path} is not a saved {architecture} config (no format_version 2 with a 'model' object, nor format 1)"


def _entries(directory):
    with os.scandir(directory) as it:
        entries = []
        for entry in it:
            entries.append(entry)
            if len(entries) > _MAX_ENTRIES:
                raise OSError(f"{directory} holds more than {_MAX_ENTRIES} entries")
        return entries


def _unknown_entries(directory, files, dirs, in_store=False):
    """The entries of ``directory`` (paths, for the message) that the format does not write: a name not in
    ``files`` / ``dirs`` nor one of our temporaries, a link, a file where a folder belongs or the reverse."""
    unknown = []
    for entry in _entries(directory):
        name = entry.name
        if entry.is_symlink():
            unknown.append(f"{entry.path} (a symbolic link)")
        elif entry.is_dir(follow_symlinks=False):
            if name == "tokenizer" and "tokenizer" in dirs:
                unknown += _unknown_entries(entry.path, TOKENIZER_FILES, frozenset())
            elif name == "clip" and "clip" in dirs:
                problem = _config_problem(Path(entry.path), "openai_clip")
                if problem is None:
                    unknown += _unknown_entries(entry.path, SAVED_FILES["openai_clip"], frozenset())
                else:
                    unknown.append(f"{entry.path} ({problem})")
            elif name == LEGACY_OUTPUTS_DIRNAME and in_store:  # moved out first (`saving.keep_legacy_outputs`)
                unknown += [e.path for e in _entries(entry.path)
                            if e.is_symlink() or not e.is_file(follow_symlinks=False)
                            or not _LEGACY_OUTPUT_FILE.fullmatch(e.name)]
            else:
                unknown.append(f"{entry.path}/")
        elif not entry.is_file(follow_symlinks=False):
            unknown.append(f"{entry.path} (not a regular file)")
        elif name not in files and not _OWN_TEMPORARIES.fullmatch(name):
            unknown.append(entry.path)
    return unknown


def saved_model_problem(directory, architecture="clipcap"):
    """Why ``directory`` may not be replaced as a saved ``architecture`` model, or None when it may: it must be
    a real folder whose config.json is a saved config (`saved_config_problem`) and whose every entry is one
    the format writes (`SAVED_FILES`, `SAVED_DIRS`, the tokenizer's files, a nested saved CLIP, this
    library's temporaries; in the model store, the legacy ``outputs/map.json``): a user's notes, results or
    links inside it make it not ours, so nothing of theirs is ever deleted by a save."""
    directory = Path(directory)
    problem = _config_problem(directory, architecture)
    if problem is not None:
        return problem
    try:
        in_store = Path(os.path.abspath(directory)).parent == Path(os.path.abspath(home_dir()))
        unknown = _unknown_entries(directory, SAVED_FILES[architecture], SAVED_DIRS[architecture], in_store)
    except OSError as e:
        return f"{directory} cannot be listed ({e})"
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        return f"{directory} holds entries a saved model does not: {shown}"
    return None


def is_saved_model(directory, architecture="clipcap") -> bool:
    """Whether ``directory`` is a model this library saved, and nothing else: a real folder whose config.json
    is a saved ``architecture`` config ("clipcap"; a saved CLIP: "openai_clip") and which holds only what the
    format writes (`saved_model_problem`). Only such folders are ever replaced (``is_ours``); a folder that
    also holds a user's files is refused, naming them (`why_not_ours`)."""
    return saved_model_problem(directory, architecture) is None


is_saved_model.why_not_ours = saved_model_problem  # what `utils.file_utils.check_replaceable` reports


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
