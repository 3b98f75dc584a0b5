"""A ClipCap's identity: one SHA-256 of everything that decides its captions, the key of its cached results.

Captions stored in map.json and in ``batch``'s records are keyed by the model's identity, never by its name:
two models saved in folders of the same name (``runs/a/model``, ``runs/b/model``) have the same name and
different identities. The name stays in the records, for display.

What the identity covers (`compute_identity`, from the model in memory):

- the backbone's Keras config (mapper, GPT-2, ``normalize_prefix``; not the layer names, which Keras numbers
  per process, nor GPT-2's ``weights_layout``, how a file stores them) and every weight (shape, dtype, bytes),
  GPT-2's block projections in the (in, out) layout they had before they were `custom_layers.linear.Linear`
  (kernel (out, in) in memory, `_dense_layout`): the same weights keep the identity they had, whatever their
  layout in memory;
- the GPT-2 tokenizer (its whole ``tokenizer.json`` serialization: vocabulary, merges, added tokens,
  decoder);
- the CLIP image encoder (its Keras config, which holds the input resolution, and every weight), or its
  absence;
- the stop token, when it is not ``.`` (the default every English model has: their identities stay those
  computed before the stop token was recorded).

Where it comes from:

- saved (``ClipCap.save``, hence ``convert``, ``download`` and the trainer, which all save through it): computed
  from the model in memory while it is written (one pass over the weights in memory, no file read back) and
  recorded in ``metadata.json`` (`IDENTITY_KEY`);
- loaded: read from ``metadata.json`` (`recorded_identity`, which reads no weights: what
  `cached_answers` and ``batch`` use without loading the model), and trusted only while the files it was
  computed from are unchanged: the save records their fingerprint (`FILES_KEY`: size, modification and change
  times, inode of each, `files_fingerprint`); a file edited, replaced or added since (a weights file or
  tokenizer changed by hand, a folder copied) makes it computed from the loaded model instead (cached
  answers then load the model). A folder saved before fingerprints were recorded is trusted as before. A
  folder saved before identities were
  recorded (or of format 1), or a load given another ``clip=``, gets it computed once from the loaded model
  when first needed (its cached answers then need the model loaded: `cached_answers` answers nothing for it,
  and ``batch`` loads it once in the launching process); the folder is not written to;
- built in memory and never saved (``ClipCap.from_pretrained`` without a name, a model assembled by hand):
  computed from its weights each time it is asked (`ClipCap.identity`), since they may change.

A recorded identity stands for the weights as loaded or saved: replacing ``backbone``, ``tokenizer``,
``clip`` or ``normalize_prefix`` drops it (`ClipCap.identity` notices), and the trainer drops it when it writes
trained values into the model. Whoever changes the weights of a loaded model in place otherwise (its own
optimizer, ``set_weights``) calls ``model.forget_identity()``.
"""

import hashlib
import json

import numpy as np

from utils.tokenizer import DEFAULT_STOP_TOKEN

#: the metadata.json entry holding a saved folder's identity
IDENTITY_KEY = "identity"
_PREFIX = "sha256:"
_VERSION = b"clipcap-identity-1\n"


def _update_json(digest, label, value):
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    digest.update(f"{label} {len(text)}\n".encode())
    digest.update(text.encode())


#: config entries that do not change a caption: layer names (Keras numbers those of layers built in one
#: process: ``clip_cap_mlp``, ``clip_cap_mlp_1``...) and GPT-2's ``weights_layout`` (how a file stores the kernels)
_NOT_HASHED = ("name", "weights_layout")


def _without_names(value):
    """A serialized Keras config without its `_NOT_HASHED` entries (layer names, weights layout)."""
    if isinstance(value, dict):
        return {k: _without_names(v) for k, v in value.items() if k not in _NOT_HASHED}
    if isinstance(value, list | tuple):
        return [_without_names(v) for v in value]
    return value


def _dense_layout(model):
    """The ids of ``model``'s variables hashed transposed: the kernels of its GPT-2's float projections
    (`custom_layers.linear.Linear`, (out, in)), hashed (in, out) as when they were ``keras.layers.Dense``."""
    gpt2 = getattr(model, "gpt2", None)
    return {id(layer.kernel) for layer in gpt2.float_projections()} if gpt2 is not None else set()


def _update_array(digest, array, rows=256):
    """``array``'s bytes (C order), fed in blocks of ``rows`` rows: a transposed view is copied a block at a
    time, never whole. A dtype Python's buffers do not know (bfloat16, from ml_dtypes) is fed as its raw bits."""
    if array.dtype.kind == "V" or type(array.dtype).__module__.startswith("ml_dtypes"):
        array = array.view(f"u{array.dtype.itemsize}")
    if array.flags.c_contiguous:
        digest.update(memoryview(array).cast("B"))
        return
    for start in range(0, array.shape[0], rows):
        digest.update(memoryview(np.ascontiguousarray(array[start:start + rows])).cast("B"))


def _update_keras_model(digest, label, model):
    """Its Keras config (less `_NOT_HASHED`), then each weight's shape, dtype and bytes, in the model's order
    (`_dense_layout`'s kernels transposed)."""
    import keras

    _update_json(digest, f"{label}.config", _without_names(keras.saving.serialize_keras_object(model)))
    transposed = _dense_layout(model)
    for i, variable in enumerate(model.weights):
        array = np.asarray(keras.ops.convert_to_numpy(variable))
        array = array.T if id(variable) in transposed else np.ascontiguousarray(array)
        digest.update(f"{label}.weight {i} {array.dtype.str} {array.shape}\n".encode())
        _update_array(digest, array)


def _tokenizer_text(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps({"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}, sort_keys=True)


def compute_identity(model) -> str:
    """``"sha256:<hex>"`` of ``model`` (a `ClipCap`) as it is in memory; see the module docstring."""
    digest = hashlib.sha256(_VERSION)
    _update_keras_model(digest, "backbone", model.backbone)
    _update_json(digest, "tokenizer", _tokenizer_text(model.tokenizer))
    clip = getattr(model, "clip", None)
    if clip is None:
        _update_json(digest, "clip", None)
    else:
        if hasattr(clip, "load_text"):  # a text encoder left for later counts as loaded (re-ranking uses it)
            clip.load_text()
        _update_keras_model(digest, "clip", clip.model)
    stop_token = getattr(model, "stop_token", DEFAULT_STOP_TOKEN)
    if stop_token != DEFAULT_STOP_TOKEN:
        _update_json(digest, "stop_token", stop_token)
    return _PREFIX + digest.hexdigest()


#: the metadata.json entry holding the fingerprint (`files_fingerprint`) of the files the identity stands for
FILES_KEY = "identity_files"
#: top-level entries of a saved folder that no caption depends on: not fingerprinted
_NOT_FINGERPRINTED = frozenset({"metadata.json", "README.md", "outputs"})
_MAX_FINGERPRINT_FILES = 1000


def files_fingerprint(directory):
    """``{relative path: [size, st_mtime_ns]}`` of every regular file under a saved folder
    (its config, weights, tokenizer and CLIP files: everything its identity is computed from), less
    `_NOT_FINGERPRINTED` and this library's temporaries (names starting with "."); None when the folder holds
    a link or a special file, or more than `_MAX_FINGERPRINT_FILES` files. Stat calls only, no file read: a
    file written or replaced has another modification time, while a copy that keeps times (``cp -a``,
    ``shutil.copytree``, a container layer) keeps the fingerprint and its identity (change times and inodes
    would not: every copied model would then load to be answered). A file rewritten with its time set back
    on purpose is not noticed."""
    import os

    directory = os.fspath(directory)
    found = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            entries = sorted(os.scandir(os.path.join(directory, relative)), key=lambda e: e.name)
        except OSError:
            return None
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            if entry.name.startswith(".") or (not relative and entry.name in _NOT_FINGERPRINTED):
                continue
            if entry.is_symlink():
                return None
            if entry.is_dir(follow_symlinks=False):
                pending.append(name)
                continue
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or len(found) >= _MAX_FINGERPRINT_FILES:
                return None
            found[name] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(found.items()))


def recorded_identity(model_dir):
    """The identity recorded in a saved folder's ``metadata.json``, or None (none recorded, no readable
    metadata, or a file it stands for changed since it was recorded). Reads no weights.

    A folder saved with a fingerprint of its files (`FILES_KEY`, `files_fingerprint`) has its identity trusted
    only while every file is the one saved (same size and modification time; no file added or removed): a
    weights file, tokenizer or config edited or replaced gets None, so the identity is
    computed from the loaded model. A folder saved before fingerprints were recorded is trusted as it was
    (save it again to record one)."""
    import logging

    from utils.file_utils import UnsafePathError
    from utils.preset_utils import read_metadata

    try:
        metadata = read_metadata(model_dir, ValueError)
    except (OSError, ValueError, UnsafePathError):
        return None
    value = metadata.get(IDENTITY_KEY)
    if not (isinstance(value, str) and value.startswith(_PREFIX)):
        return None
    if FILES_KEY in metadata:
        recorded = metadata[FILES_KEY]
        current = files_fingerprint(model_dir)
        if current is None or not isinstance(recorded, dict) or recorded != current:
            logging.getLogger(__name__).info("%s: its files changed since its identity was recorded: computed "
                                             "from the loaded model instead", model_dir)
            return None
    return value
