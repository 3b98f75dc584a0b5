"""Keras ``.weights.h5`` files written and read quickly: part of `ClipCap.load`'s time budget.

Keras' own ``model.load_weights`` reads each tensor with h5py into a new numpy array, converts it to a
TensorFlow tensor (another copy, slow for float16 -> float32) and assigns it to the variable. For a 124M
GPT-2 plus a CLIP encoder (~800 MB of float32) that was 3-4 s of a 5-6 s load, and writing fresh memory
is itself slow on a machine whose transparent huge pages stall on first use (measured here: 0.4-2.2 s for
600 MB, against 0.02 s for mapping the same bytes from the page cache).

Only public APIs: Keras' ``save_weights`` / ``load_weights`` and initializer classes, and h5py (the file is
an HDF5 file whose layout, one group per saved object with its tensors under ``vars/0``, ``vars/1``..., Keras
keeps readable across its releases). Nothing of Keras' private package: a Keras release can slow a load down, never
break it (`unitest/test_keras_public_api.py`).

- `save_weights` has Keras write its own file (``model.save_weights``, beside the target), then copies it
  with HDF5's object copy: the same groups, names and attributes, every dataset stored contiguously at a
  64-byte-aligned offset (HDF5's alignment property), optionally float16 where float16 is exact (OpenAI's
  CLIP weights are float16 values), and an index naming, for each variable, the dataset that holds its
  values (found by content: a variable and its dataset hold the same bytes, compared byte for byte after a
  sample of each narrowed the candidates, Keras' file read as a memory map; tensors of identical bytes are
  recorded as interchangeable). A layer that stores computed values (not its variables) leaves the file
  without index. Keras' public API writes only its own layout, unaligned, so the data is written twice:
  ``benchmarks/bench_weights_io.py`` times it against Keras' ``save_weights``.
- `load_weights` pairs variables and datasets through that index and hands an aligned, contiguous,
  uncompressed dataset to TensorFlow as a view of a private (copy-on-write) memory map of the file, through
  DLPack, without a copy: the variable's assignment shares that memory. Pages come from the page cache when
  first used; a write to a variable (training) copies its page, never the file. A file without a usable
  index (written by Keras itself, another model's, or edited: a tensor missing, mis-shaped or one too many
  in a layer's group) is loaded by Keras' ``model.load_weights``, whose checks and errors then apply.
- `variables_to_be_loaded`: inside, Keras' random initializers (their public classes) return uninitialised
  memory (``tf.raw_ops.Empty``) instead of drawing 200M random numbers that the load overwrites. Only for a
  model whose every weight is loaded next: `load_weights_strict` refuses a file that misses any.

Mapping, not reading, means the file must not be rewritten *in place* while a process uses the model
(a copy with ``cp`` over it, say): the library never does (it replaces folders by renaming new ones into
place, `utils.file_utils.replace_dir`, which leaves a mapped file intact).

Example::

    save_weights(model, "model.weights.h5")
    with variables_to_be_loaded():
        model = keras.saving.deserialize_keras_object(config)
    load_weights_strict(model, "model.weights.h5")
"""

import contextlib
import errno
import json
import os
import re
import shutil
import uuid

import numpy as np

from utils.file_utils import parse_json

#: the dataset of a file written by `save_weights` that maps each variable (`variable_keys`) to its dataset
#: (JSON bytes), with ``"#root"`` (the saved model's name) and ``"#alike"`` (groups of datasets holding
#: identical bytes, any of which serves); Keras ignores it.
INDEX_DATASET = "image_captioning_variable_index"
_ROOT, _ALIKE = "#root", "#alike"
#: a 124M GPT-2's index is ~15 kB: a larger one is refused before it is read
MAX_INDEX_BYTES = 16 << 20
#: alignment of the buffers handed to TensorFlow (Eigen's and XLA's requirement for CPU kernels)
ALIGNMENT = 64
#: dtypes read directly (native byte order); others are read by h5py (a copy)
_DIRECT_DTYPES = {np.dtype(t).newbyteorder("=") for t in ("float32", "float16", "float64", "int32", "int64", "int8")}


def aligned_empty(shape, dtype, alignment=ALIGNMENT):
    """An uninitialised C-contiguous numpy array whose data starts on an ``alignment``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _stored_block(mapped, dataset):
    """The h5py ``dataset``'s values as a read-only view of ``mapped`` (its file's bytes) when it is stored
    there as one plain contiguous block of a directly readable dtype, at any offset; else None."""
    dtype = dataset.dtype
    if (dtype not in _DIRECT_DTYPES or dtype.byteorder == ">" or dataset.chunks is not None
            or dataset.compression is not None or dataset.external or dataset.is_virtual
            or dataset.attrs.get("dtype") == "bfloat16"):
        return None
    offset = dataset.id.get_offset()
    nbytes = int(np.prod(dataset.shape, dtype=np.int64)) * dtype.itemsize
    if offset is None or dataset.id.get_storage_size() != nbytes or offset + nbytes > len(mapped):
        return None
    return mapped[offset : offset + nbytes].view(dtype).reshape(dataset.shape)


def dataset_view(mapped, dataset):
    """An aligned numpy array with the values of the h5py ``dataset``: a view of ``mapped`` (the file's
    bytes, a numpy memory map) when the dataset is stored there aligned, else an aligned copy; None when the
    dataset is not a plain contiguous block of a directly readable dtype (Keras' reader then decides)."""
    view = _stored_block(mapped, dataset)
    if view is None:
        return None  # not stored as one plain block of exactly its size inside the file
    if view.ctypes.data % ALIGNMENT == 0:
        return view
    copy = aligned_empty(view.shape, view.dtype)
    np.copyto(copy, view)
    return copy


def _as_tensor(array):
    """A TensorFlow tensor sharing ``array``'s memory (DLPack; float16 becomes a float32 copy)."""
    import tensorflow as tf

    tensor = tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.cast(tensor, tf.float32) if array.dtype == np.float16 else tensor


def variable_keys(variables):
    """One key per variable: ``"<path>#<k>"``, the k-th variable of that path in ``model.weights`` order (a
    path repeats where sub-layers were built outside their parent's name scope, as the mapper's are)."""
    seen = {}
    keys = []
    for variable in variables:
        k = seen.get(variable.path, 0)
        seen[variable.path] = k + 1
        keys.append(f"{variable.path}#{k}")
    return keys


def _read_index(f):
    """(index {variable key: dataset}, saved model's name, {dataset: its alike group}) of a file written by
    `save_weights`; (None, None, {}) without one."""
    if INDEX_DATASET not in f:
        return None, None, {}
    if f[INDEX_DATASET].size > MAX_INDEX_BYTES:
        raise ValueError(f"{f.filename}: the variable index holds {f[INDEX_DATASET].size} bytes, more than "
                         f"{MAX_INDEX_BYTES}: not a file this library wrote")
    index = parse_json(bytes(np.asarray(f[INDEX_DATASET][()], np.uint8)), f"{f.filename}: {INDEX_DATASET}")
    if not isinstance(index, dict):
        return None, None, {}
    root, alike = index.pop(_ROOT, None), index.pop(_ALIKE, [])
    twins = {name: group for group in alike if isinstance(group, list) for name in group}
    return index, root, twins


def _keys_in(index, model, root):
    """(`variable_keys` of ``model``, the index) as they pair: as written, else both without their model's
    name (a model built again gets another default name, ``sequential_1`` for ``sequential``, and a model
    deserialized from its config builds its layers outside its own name scope); (None, None) when the
    names collide once stripped."""
    keys = variable_keys(model.weights)
    if set(keys) <= set(index):
        return keys, index

    def strip(key, name):
        return key[len(name) + 1:] if name and key.startswith(f"{name}/") else key

    stripped = {strip(key, root): name for key, name in index.items()}
    keys = [strip(key, model.name) for key in keys]
    if len(stripped) != len(index) or len(set(keys)) != len(keys):
        return None, None
    return keys, stripped


def _pair(keys, index, twins, available):
    """{key: dataset} for every key, each dataset of ``available`` used once: the indexed one, else one of
    identical bytes (``twins``) that no other key takes; None when a key cannot be paired."""
    chosen, pending = {}, []
    for key in keys:
        name = index.get(key)
        if name is None:
            return None
        if name in available and name not in chosen.values():
            chosen[key] = name
        else:
            pending.append(key)
    taken = set(chosen.values())
    for key in pending:
        name = next((n for n in twins.get(index[key], ()) if n in available and n not in taken), None)
        if name is None:
            return None
        chosen[key] = name
        taken.add(name)
    return chosen


def _tensor_names(f, in_part=lambda name: True):
    """The names of the file's tensors (the variable index aside) for which ``in_part`` is true."""
    import h5py

    names = []
    f.visititems(lambda name, obj: names.append(name)
                 if isinstance(obj, h5py.Dataset) and name != INDEX_DATASET and in_part(name) else None)
    return names


def _index_of_part(index, twins, available):
    """The index entries of one part of the saved model (the datasets ``available``, or one of identical
    bytes among them), numbered again within the part: a path can repeat across the parts (CLIP's image and
    text towers both hold ``transformer.resblocks.0/ln_1/gamma``, ``#0`` and ``#1`` in the whole model), and
    the part, built alone, numbers its own variables from ``#0`` in the same order."""
    def in_part(name):
        return name in available or any(twin in available for twin in twins.get(name, ()))

    def order(key):
        path, _, k = key.rpartition("#")
        return path, int(k) if k.isdigit() else -1

    part, seen = {}, {}
    for key in sorted(index, key=order):
        if in_part(index[key]):
            path = key.rpartition("#")[0]
            part[f"{path}#{seen.get(path, 0)}"] = index[key]
            seen[path] = seen.get(path, 0) + 1
    return part


def keras_layout(model):
    """{index in ``model.weights``: the dataset name Keras' ``save_weights`` gives that variable}, found by Keras
    itself: ``model.save_weights`` into a scratch file while every layer's ``save_own_variables`` (the public
    hook Keras calls with each layer's group) is wrapped to store, in place of a value, which variable it is
    (one integer). No tensor is written: milliseconds. None when Keras does not walk the model so (a layer that
    stores computed values, not its variables; a Keras without the hooks): the caller then reads no index."""
    import tempfile

    import h5py

    try:
        layers = list(model._flatten_layers(include_self=True, recursive=True))
    except (AttributeError, TypeError):
        return None
    positions = {id(v): i for i, v in enumerate(model.weights)}
    computed = []

    def recorder(original):
        def save_own_variables(store):
            captured = {}
            original(captured)
            for key, value in captured.items():
                position = positions.get(id(value))
                if position is None:
                    computed.append(key)
                store[key] = np.array([-1 if position is None else position], np.int64)
        return save_own_variables

    wrapped = []
    try:
        for layer in layers:
            if "save_own_variables" not in vars(layer):
                object.__setattr__(layer, "save_own_variables", recorder(layer.save_own_variables))
                wrapped.append(layer)
        with tempfile.TemporaryDirectory(prefix="keras-layout-") as scratch:
            scratch_file = os.path.join(scratch, "layout.weights.h5")
            model.save_weights(scratch_file)
            names = []
            with h5py.File(scratch_file, "r") as f:
                f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                found = [(f[name].shape, f[name].dtype.kind, name) for name in names]
                layout = {int(f[name][0]): name for shape, kind, name in found if shape == (1,) and kind == "i"}
        if len(layout) != len(names):
            return None  # a dataset that is not a variable's position: Keras walks this model otherwise
    except Exception:  # any failure of this shortcut (a Keras that walks otherwise): Keras' own load decides
        return None
    finally:
        for layer in wrapped:
            object.__delattr__(layer, "save_own_variables")
    if computed or -1 in layout or set(layout) != set(range(len(model.weights))):
        return None
    return layout


def _verified_names(claimed, layout, twins, f):
    """The dataset of each variable (in ``model.weights`` order) as Keras' own layout names it (``layout``,
    `keras_layout`; below the part's folder in the file, found from the index), when the index's ``claimed``
    datasets agree with it: each the very dataset, or one the index lists as holding identical bytes
    (``twins``) whose bytes are compared and are. None otherwise: an index that swaps two same-shaped
    variables, or names a "twin" of other bytes, is not used."""
    if layout is None or len(layout) != len(claimed):
        return None
    prefix = next((name[: len(name) - len(layout[i])] for i, name in enumerate(claimed)
                   if name == layout[i] or name.endswith("/" + layout[i])), None)
    if prefix is None:
        return None
    expected = [prefix + layout[i] for i in range(len(claimed))]
    for name, own in zip(claimed, expected, strict=True):
        if name == own:
            continue
        if own not in f or name not in twins.get(own, ()) or not _same_dataset_bytes(f[name], f[own]):
            return None
    return expected


def _same_dataset_bytes(a, b):
    """Whether two h5py datasets hold the same shape, dtype and bytes (read a bounded chunk at a time)."""
    import h5py

    if not (isinstance(a, h5py.Dataset) and isinstance(b, h5py.Dataset)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.ndim == 0:
        return _same_bytes(np.asarray(a[()]), np.asarray(b[()]))
    rows = max(1, _COMPARE_CHUNK // max(1, a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))))
    return all(_same_bytes(a[i : i + rows], b[i : i + rows]) for i in range(0, a.shape[0], rows))


def _load_indexed(model, path, f, in_part=lambda name: True):
    """Assign every variable of ``model`` its dataset through the file's index (restricted to the datasets
    ``in_part``); returns the names of the datasets used, or None (nothing assigned) when the index does not
    describe this model in this file: a variable it does not name, a dataset missing or of another shape, a
    layer's group holding tensors the index does not pair."""
    index, root, twins = _read_index(f)
    if index is None:
        return None
    names = _tensor_names(f, in_part)
    index = _index_of_part(index, twins, set(names))
    keys, index = _keys_in(index, model, root)
    chosen = None if keys is None else _pair(keys, index, twins, set(names))
    if chosen is None:
        return None
    variables = model.weights
    expected = _verified_names([chosen[key] for key in keys], keras_layout(model), twins, f)
    if expected is None:
        return None  # the index says otherwise than Keras' own layout: Keras' load (or the caller) decides
    datasets = [f[name] for name in expected]
    if any(tuple(d.shape) != tuple(v.shape) for d, v in zip(datasets, variables, strict=True)):
        return None
    used = set(expected)
    groups = {name.rpartition("/")[0] for name in used}
    if any(name not in used and name.rpartition("/")[0] in groups for name in names):
        return None  # a layer's group holds a tensor more than the model's variables: the layer decides
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: the file is never written
    for variable, dataset in zip(variables, datasets, strict=True):
        array = dataset_view(mapped, dataset)
        variable.assign(dataset[()] if array is None else _as_tensor(array))
    return used


def load_weights(model, path):
    """``model.load_weights(path)`` for a ``.weights.h5`` file, quickly (module docstring): through the
    variable index of a file `save_weights` wrote, with mapped reads; otherwise Keras' own load (its errors:
    a missing or mis-shaped tensor is a ValueError naming it). Returns the names of the datasets read (None
    after Keras' own load)."""
    import h5py

    path = os.fspath(path)
    if not model.built:
        raise ValueError(f"the model must be built before its weights are loaded from {path}")
    if path.endswith(".weights.h5") and os.path.getsize(path) > 0:
        with h5py.File(path, "r") as f:
            used = _load_indexed(model, path, f)
        if used is not None:
            return used
    try:
        model.load_weights(path)
    except ValueError as e:  # Keras lists what it could not load over several lines: one line, all of it
        raise ValueError(" ".join(str(e).split())) from e
    return None


def load_weights_strict(model, path):
    """`load_weights` (a missing or mis-shaped tensor is a ValueError), and nothing left over: the file must
    hold exactly one tensor per weight of the model (the variable index aside)."""
    import h5py

    used = load_weights(model, path)
    with h5py.File(path, "r") as f:
        names = _tensor_names(f)
    unexpected = sorted(set(names) - used) if used is not None else []
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise ValueError(f"the file holds {len(unexpected)} tensor(s) the model has no weight for: {shown}")
    if len(names) != len(model.weights):
        raise ValueError(f"the file holds {len(names)} tensors, the model has {len(model.weights)} weights")


def load_weights_part(model, path, in_part):
    """Load ``model`` (one part of a larger saved model, e.g. a CLIP without its text tower, or that tower
    alone) from the datasets of a `save_weights` file for which ``in_part(name)`` is true, strictly: every
    weight of ``model`` from there, every tensor of that part used (the other tensors are not read).

    Through the file's variable index (tensors of identical bytes are interchangeable: a part takes its own);
    a file without an index that describes ``model`` is a ValueError, as is a missing, mis-shaped or
    left-over tensor. Returns the names read."""
    import h5py

    path = os.fspath(path)
    with h5py.File(path, "r") as f:
        names = _tensor_names(f, in_part)
        used = _load_indexed(model, path, f, in_part)
    if used is None:
        raise ValueError(f"{path}: the file's variable index does not describe this part of the model "
                         f"({len(model.weights)} weights, {len(names)} tensors in the part)")
    unexpected = sorted(set(names) - used)
    if unexpected or len(used) != len(model.weights):
        raise ValueError(f"{path}: the part read does not match the model: {len(used)} tensors read for "
                         f"{len(model.weights)} weights, {len(unexpected)} left over ({unexpected[:5]})")
    return used


def _random_initializers():
    """Keras' random initializer classes (public names); their subclasses (Glorot, He, LeCun...) inherit
    their ``__call__``."""
    import keras

    return (keras.initializers.RandomNormal, keras.initializers.RandomUniform, keras.initializers.TruncatedNormal,
            keras.initializers.VarianceScaling, keras.initializers.Orthogonal)


@contextlib.contextmanager
def variables_to_be_loaded():
    """Inside, a Keras variable whose initializer is random is created uninitialised (its memory is never
    written: the load that follows replaces it); see the module docstring. Variables with other
    initializers (constants, seed-generator states) are created as usual. Not thread-safe: it replaces the
    ``__call__`` of Keras' random initializer classes for the duration of the block."""
    import keras
    import tensorflow as tf

    def uninitialised(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        return tf.raw_ops.Empty(shape=tuple(shape), dtype=tf.as_dtype(dtype), init=False)

    originals = {cls: cls.__dict__["__call__"] for cls in _random_initializers()}
    try:
        for cls in originals:
            cls.__call__ = uninitialised
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


_HDF5_WRITE_FAILURE = re.compile(r"errno = (\d+), error message = '([^']*)'")


@contextlib.contextmanager
def _clear_write_errors(path):
    """Turn HDF5's failed-write errors (an ``OSError`` or ``RuntimeError`` whose text is a multi-line HDF5 report,
    e.g. "Can't decrement id ref count (file write failed: ...)" on a full disk) into an ``OSError`` with the
    system error number, naming the file and the cause ("no space left on device", with the bytes free)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        match = _HDF5_WRITE_FAILURE.search(str(e))
        if match is None:
            raise
        code, reason = int(match.group(1)), match.group(2)
        message = f"cannot write the weights file {path}: {reason}"
        if code == errno.ENOSPC:
            message = f"cannot write the weights file {path}: no space left on device"
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
                message += f" ({free} bytes free on its file system)"
        elif code == errno.EFBIG:
            message += " (over the file-size limit of this process or file system)"
        raise OSError(code, message) from e


class _DLPackTensor:
    """A TensorFlow tensor seen by numpy through DLPack: its buffer, not a copy (``tensor.numpy()`` copies)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        import tensorflow as tf

        return tf.experimental.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return (1, 0)  # the CPU (callers check the tensor's device)


def _host_values(variable):
    """A Keras variable's values as a numpy array: a view of a CPU tensor's buffer (copying 800 MB of fresh
    memory costs seconds on some machines), else a copy (another device, a dtype numpy's DLPack lacks)."""
    value = variable.value
    tensor = value.read_value() if hasattr(value, "read_value") else value
    if "GPU" not in getattr(tensor, "device", "") and "TPU" not in getattr(tensor, "device", ""):
        with contextlib.suppress(Exception):  # TypeError / BufferError / RuntimeError: copied below
            return np.from_dlpack(_DLPackTensor(tensor))
    return np.asarray(variable.numpy())


#: elements sampled (evenly spaced) to tell tensors apart before their bytes are compared
_SAMPLES = 64
#: bytes compared at a time (a bounded temporary)
_COMPARE_CHUNK = 1 << 20


def _bytes_of(array):
    """``array``'s bytes as a flat view of 8-byte words where its size allows (fewer, faster comparisons), else
    of bytes; a copy only when it is not C-contiguous."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return flat.view(np.uint64) if flat.size % 8 == 0 and flat.ctypes.data % 8 == 0 else flat


def _sample_key(array):
    """What tells most tensors apart at almost no cost: shape, dtype and `_SAMPLES` evenly spaced elements'
    bytes (a memory-mapped dataset reads only their pages). Equal keys are confirmed by `_same_bytes`."""
    flat = array.reshape(-1)
    picked = flat[:: max(1, flat.size // _SAMPLES)]
    return tuple(array.shape), array.dtype.str, np.ascontiguousarray(picked).tobytes()


def _same_bytes(a, b):
    """Whether two arrays of one shape and dtype hold the same bytes (NaNs compared as bits), chunk by chunk."""
    if a.nbytes != b.nbytes:
        return False
    a, b = _bytes_of(a), _bytes_of(b)
    if a.dtype != b.dtype:  # (one of them not 8-byte aligned)
        a, b = a.view(np.uint8), b.view(np.uint8)
    step = _COMPARE_CHUNK // a.itemsize
    return all(np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, a.size, step))


def _classes_of_identical_bytes(arrays):
    """The datasets ``arrays`` ({name: array}) grouped by identical bytes (same shape and dtype): {`_sample_key`:
    [[names of one content], ...]}, names sorted. Only tensors whose samples agree are compared in full."""
    classes = {}
    for name in sorted(arrays):
        candidates = classes.setdefault(_sample_key(arrays[name]), [])
        same = next((names for names in candidates if _same_bytes(arrays[names[0]], arrays[name])), None)
        if same is None:
            candidates.append([name])
        else:
            same.append(name)
    return classes


def _copy_aligned(source, mapped, target, float16_where_exact):
    """Copy every group, dataset and attribute of the h5 file ``source`` (whose bytes are ``mapped``) into
    ``target`` (aligned by its file properties), float32 tensors float16 where exact. Datasets are copied by
    HDF5 itself (``H5Ocopy``, file to file: no numpy copy), a converted one from its values.
    Returns (counts, {dataset name: its values}): views of ``mapped`` where a dataset is a plain block (no
    copy in memory), used to pair the variables."""
    import h5py

    counts, arrays = {"float16": 0, "float32": 0}, {}
    target.attrs.update(source.attrs)

    def copy(name, obj):
        if isinstance(obj, h5py.Group):
            target.require_group(name).attrs.update(obj.attrs)
            return
        array = _stored_block(mapped, obj)
        arrays[name] = array = np.asarray(obj[()]) if array is None else array
        if (float16_where_exact and array.dtype == np.float32
                and np.array_equal(array.astype(np.float16).astype(np.float32), array)):
            target.create_dataset(name, data=array.astype(np.float16)).attrs.update(obj.attrs)
            kind = "float16"
        else:
            source.copy(obj, target, name=name)
            kind = array.dtype.name if array.dtype.name in ("float16", "float32") else "other"
        counts[kind] = counts.get(kind, 0) + 1

    source.visititems(copy)
    return counts, arrays


def _content_index(model, arrays):
    """The variable index (`INDEX_DATASET`'s JSON) pairing each variable of ``model`` with a dataset of the
    same shape, dtype and bytes (``arrays``: {dataset name: values}), and the groups of datasets of
    identical bytes (their names sorted; variables of one content take them in that order); None when a
    variable's values are in no dataset, or a dataset holds no variable's (a layer that stores computed
    values). Bytes are compared, not hashed: a tensor is read once more, at memory speed."""
    classes = _classes_of_identical_bytes(arrays)
    alike = [list(names) for candidates in classes.values() for names in candidates if len(names) > 1]
    index = {}
    for key, variable in zip(variable_keys(model.weights), model.weights, strict=True):
        values = _host_values(variable)
        names = next((names for names in classes.get(_sample_key(values), ())
                      if names and _same_bytes(arrays[names[0]], values)), None)
        if not names:
            return None
        index[key] = names.pop(0)
    if any(names for candidates in classes.values() for names in candidates):
        return None
    return {**index, _ROOT: model.name, _ALIKE: alike}


def save_weights(model, path, float16_where_exact=False):
    """``model.save_weights(path)`` with every dataset aligned (see the module docstring) and an index of
    the datasets by variable (`INDEX_DATASET`), and with ``float16_where_exact`` every float32 tensor that
    float16 represents exactly stored as float16 (half the file, bit-identical once loaded: Keras casts back
    to the variable's dtype). Keras' own ``load_weights`` reads the file as any of its files. Returns
    {"float16": n, "float32": m} (and "other": k when other dtypes are stored), the tensors stored in each."""
    import h5py

    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"a weights file name must end in .weights.h5, got {path}")
    directory, name = os.path.split(os.path.abspath(path))
    keras_file = os.path.join(directory, f".{name}.keras-{os.getpid()}-{uuid.uuid4().hex[:8]}.weights.h5")
    try:
        with _clear_write_errors(path):
            model.save_weights(keras_file)  # Keras' layout, by Keras
            mapped = np.memmap(keras_file, dtype=np.uint8, mode="r")  # (read-only: Keras' file is only read)
            with h5py.File(keras_file, "r") as source, h5py.File(
                    path, "w", alignment_threshold=1, alignment_interval=ALIGNMENT) as target:
                counts, arrays = _copy_aligned(source, mapped, target, float16_where_exact)
                index = _content_index(model, arrays)
                if index is not None:  # else: loaded by Keras' own load
                    data = json.dumps(index, separators=(",", ":")).encode()
                    target.create_dataset(INDEX_DATASET, data=np.frombuffer(data, np.uint8))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(keras_file)
    return counts
