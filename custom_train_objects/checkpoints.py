"""The trainer's checkpoint folders: ``<output_dir>/checkpoints/ckpt-<9-digit step>/``.

Each holds ``model.weights.h5`` (Keras ``save_weights`` of the `ClipCapBackbone` being trained: the same
weights file as a saved model), ``training_state.npz`` (what that file lacks, in order: every optimizer
variable, then the dropout seed generators' states, so that a resumed run continues bit for bit) and
``state.json`` (epoch, batch position, step, losses, hyper-parameters; written by the trainer). Folders of
the previous layout (``variables.npz``: every mapper, GPT-2 and optimizer variable by group) are still
recognised and resumed from.

Every file and the folder itself are fsync'ed before the trainer publishes a checkpoint (`sync_checkpoint`): a
power cut after the rename never leaves a complete-looking checkpoint whose files are empty or short. A
checkpoint that cannot be read all the same (a truncated file, a disk error) raises `DamagedCheckpoint`, a
ValueError, from `restore_variables`; the trainer then resumes from the previous one.
"""

import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

STATE_FILENAME = "state.json"
WEIGHTS_FILENAME = "model.weights.h5"
TRAINING_STATE_FILENAME = "training_state.npz"
VARIABLES_FILENAME = "variables.npz"  # the previous layout
CHECKPOINT_NAME = re.compile(r"ckpt-\d{9}")
_LAYOUTS = ((WEIGHTS_FILENAME, TRAINING_STATE_FILENAME), (VARIABLES_FILENAME,))
# what reading a damaged (truncated, zeroed, half-written) .npz or .h5 raises
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError)


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files cannot be read (truncated, emptied, corrupted): not resumable."""


def damaged(path, error):
    """The `DamagedCheckpoint` for ``path`` (a checkpoint's file) that failed to read with ``error``."""
    return DamagedCheckpoint(f"cannot resume from {path} ({type(error).__name__}: {error}): damaged, or another "
                             "model's")


def is_checkpoint(directory) -> bool:
    """Whether ``directory`` is a checkpoint the trainer wrote (a real folder with state.json and its
    weights, either layout): the only folders it ever replaces or deletes under ``checkpoints/``."""
    directory = Path(directory)
    return (not directory.is_symlink() and directory.is_dir() and (directory / STATE_FILENAME).is_file()
            and any(all((directory / f).is_file() for f in layout) for layout in _LAYOUTS))


def list_checkpoints(root):
    """The checkpoint folders under ``root`` (``ckpt-<9 digits>``, `is_checkpoint`), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and is_checkpoint(p))


def training_state(backbone, optimizer):
    """What ``model.weights.h5`` does not hold, in order: the optimizer's variables, then the backbone's
    non-weight variables (the dropout seed generators' states)."""
    weights = {id(w) for w in backbone.weights}
    return list(optimizer.variables) + [v for v in backbone.variables if id(v) not in weights]


def write_variables(staging, backbone, optimizer):
    """Write ``model.weights.h5`` and ``training_state.npz`` into ``staging``; returns {key: shape}."""
    import keras

    backbone.save_weights(str(Path(staging) / WEIGHTS_FILENAME))
    arrays = {f"{i:05d}": np.asarray(keras.ops.convert_to_numpy(v.value))
              for i, v in enumerate(training_state(backbone, optimizer))}
    np.savez(Path(staging) / TRAINING_STATE_FILENAME, **arrays)
    return {k: list(a.shape) for k, a in arrays.items()}


def sync_checkpoint(staging):
    """fsync every file of the staging folder ``staging`` and the folder itself: call before publishing it."""
    from utils.file_utils import fsync_tree

    fsync_tree(staging)


def sync_folder(folder):
    """fsync the folder ``folder`` (its entries: a checkpoint just renamed into it, or one removed)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite_variables(variables, limit=5):
    """The paths of (at most ``limit`` of) ``variables`` holding a NaN or an infinity: what the trainer checks
    before it writes a checkpoint or a model, and after it restores one (host side, once per write)."""
    import keras

    bad = []
    for v in variables:
        value = np.asarray(keras.ops.convert_to_numpy(v.value if hasattr(v, "value") else v))
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad.append(getattr(v, "path", getattr(v, "name", "?")))
            if len(bad) >= limit:
                break
    return bad


def restore_variables(directory, backbone, optimizer, legacy_groups):
    """Assign every variable from a checkpoint (either layout; ``legacy_groups``: {"mapper": variables,
    "gpt2": ..., "optimizer": ...} for ``variables.npz``). ValueError naming what does not match."""
    directory = Path(directory)
    if (directory / VARIABLES_FILENAME).is_file():
        stored_path = directory / VARIABLES_FILENAME
        expected = {f"{g}/{i:05d}": v for g, vs in legacy_groups.items() for i, v in enumerate(vs)}
    else:
        try:
            backbone.load_weights(str(directory / WEIGHTS_FILENAME))
        except _READ_ERRORS as e:
            raise damaged(directory / WEIGHTS_FILENAME, e) from e
        stored_path = directory / TRAINING_STATE_FILENAME
        expected = {f"{i:05d}": v for i, v in enumerate(training_state(backbone, optimizer))}
    try:
        with np.load(stored_path, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except _READ_ERRORS as e:  # truncated: BadZipFile; emptied: EOFError; a bad member: zlib.error, ValueError
        raise damaged(stored_path, e) from e
    if set(stored) != set(expected):
        raise ValueError(f"{stored_path} does not match this model/optimizer: "
                         f"missing {sorted(set(expected) - set(stored))[:5]}, "
                         f"unexpected {sorted(set(stored) - set(expected))[:5]}")
    for key, variable in expected.items():
        if tuple(stored[key].shape) != tuple(variable.shape):
            raise ValueError(f"{stored_path}: {key} ({variable.path}) is {stored[key].shape}, "
                             f"expected {tuple(variable.shape)}")
        variable.assign(stored[key])
