"""Keras ``.weights.h5`` files written and read quickly: part of `ClipCap.load`'s time budget.

Keras' own ``model.load_weights`` reads each tensor with h5py into a new numpy array, converts it to a
TensorFlow tensor (another copy, slow for float16 -> float32) and assigns it to the variable. For a 124M
GPT-2 plus a CLIP encoder (~800 MB of float32) that was 3-4 s of a 5-6 s load, and writing fresh memory
is itself slow on a machine whose transparent huge pages stall on first use (measured here: 0.4-2.2 s for
600 MB, against 0.02 s for mapping the same bytes from the page cache).

- `save_weights` writes Keras' file (same groups, same names, readable by ``model.load_weights``) with
  every dataset stored contiguously at a 64-byte-aligned offset (HDF5's alignment property), optionally
  float16 where float16 is exact (OpenAI's CLIP weights are float16 values).
- `load_weights` pairs file entries and variables exactly as Keras does (its ``_load_state`` walk and each
  layer's ``load_own_variables``, so every Keras check, a layer expecting N variables and receiving M, a
  shape mismatch, still raises), but an aligned, contiguous, uncompressed dataset is handed to TensorFlow
  as a view of a private (copy-on-write) memory map of the file, through DLPack, without a copy: the
  variable's assignment shares that memory. Pages come from the page cache when first used; a write to a
  variable (training) copies its page, never the file. Other datasets (a file written by Keras itself,
  unaligned; chunked, compressed, external, bfloat16) are copied or read by Keras' reader.
- `variables_to_be_loaded`: inside, a Keras variable with a random initializer is created with
  uninitialised memory (``tf.raw_ops.Empty``) instead of drawing 200M random numbers (or filling zeros)
  that the load overwrites. Only for a model whose every weight is loaded next: `load_weights_strict`
  refuses a file that misses any.

Mapping, not reading, means the file must not be rewritten *in place* while a process uses the model
(a copy with ``cp`` over it, say): the library never does (it replaces folders by renaming new ones into
place, `utils.file_utils.replace_dir`, which leaves a mapped file intact).

Keras' private saving module is used; `FAST_PATH` says whether it was found (a test fails if it was not,
so a Keras upgrade cannot silently bring the slow load back).

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

import numpy as np

from utils.file_utils import parse_json

try:  # Keras 3's private saving and variable classes (TensorFlow backend)
    from keras.src.backend.tensorflow.core import Variable as _TFVariable
    from keras.src.initializers.random_initializers import RandomInitializer as _RandomInitializer
    from keras.src.saving import saving_lib as _saving_lib

    FAST_PATH = all(hasattr(_saving_lib, name) for name in ("H5IOStore", "_load_state", "safe_get_h5_dataset")) \
        and hasattr(_TFVariable, "_initialize_with_initializer")
except ImportError:  # another Keras layout: Keras' public load_weights and initializers (slower, same values)
    FAST_PATH = False

#: the dataset of a file written by `save_weights` that maps each variable (`variable_keys`) to its dataset
#: (JSON bytes), recorded from Keras' own walk at saving: the load pairs variables and tensors by it, without
#: walking the layers again. Keras ignores it.
INDEX_DATASET = "image_captioning_variable_index"
#: a 124M GPT-2's index is ~15 kB: a larger one is refused before it is read
MAX_INDEX_BYTES = 16 << 20
#: alignment of the buffers handed to TensorFlow (Eigen's and XLA's requirement for CPU kernels)
ALIGNMENT = 64
#: dtypes read directly (native byte order); others go through Keras' reader
_DIRECT_DTYPES = {np.dtype(t).newbyteorder("=") for t in ("float32", "float16", "float64", "int32", "int64", "int8")}


def aligned_empty(shape, dtype, alignment=ALIGNMENT):
    """An uninitialised C-contiguous numpy array whose data starts on an ``alignment``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def dataset_view(mapped, dataset):
    """An aligned numpy array with the values of the h5py ``dataset``: a view of ``mapped`` (the file's
    bytes, a numpy memory map) when the dataset is stored there aligned, else an aligned copy; None when the
    dataset is not a plain contiguous block of a directly readable dtype (Keras' reader then decides)."""
    dtype = dataset.dtype
    if (dtype not in _DIRECT_DTYPES or dtype.byteorder == ">" or dataset.chunks is not None
            or dataset.compression is not None or dataset.external or dataset.is_virtual
            or dataset.attrs.get("dtype") == "bfloat16"):
        return None
    offset = dataset.id.get_offset()
    shape = dataset.shape
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset is None or dataset.id.get_storage_size() != nbytes or offset + nbytes > len(mapped):
        return None  # not stored as one block of exactly its size inside the file
    view = mapped[offset : offset + nbytes].view(dtype).reshape(shape)
    if view.ctypes.data % ALIGNMENT == 0:
        return view
    copy = aligned_empty(shape, dtype)
    np.copyto(copy, view)
    return copy


def _as_tensor(array):
    """A TensorFlow tensor sharing ``array``'s memory (DLPack; float16 becomes a float32 copy)."""
    import tensorflow as tf

    tensor = tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.cast(tensor, tf.float32) if array.dtype == np.float16 else tensor


if FAST_PATH:

    class _MappedStore(_saving_lib.H5IOStore):
        """Keras' h5 store whose entries are views of a private memory map of the file (`dataset_view`)."""

        def __init__(self, path):
            super().__init__(path, mode="r")
            self._mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: the file is never written
            self.used = set()  # the datasets read (their h5 names without the leading "/")

        def __getitem__(self, key):
            group = self._h5_entry_group
            if not hasattr(group, "id"):  # no such group in the file: Keras' own error
                return super().__getitem__(key)
            dataset = _saving_lib.safe_get_h5_dataset(group, key)  # Keras' checks (no links out of the file)
            self.used.add(dataset.name.lstrip("/"))
            array = dataset_view(self._mapped, dataset)
            return super().__getitem__(key) if array is None else _as_tensor(array)


    class _WritingStore(_saving_lib.H5IOStore):
        """Keras' h5 store writing aligned datasets (HDF5's alignment property), optionally float16 where
        exact, and recording which dataset holds which variable (``index``: id(variable) -> dataset)."""

        def __init__(self, path, float16_where_exact):
            self.float16_where_exact = float16_where_exact
            self.index, self.counts = {}, {"float16": 0, "float32": 0}
            super().__init__(path, mode="w")

        def _get_h5_file(self, path_or_io, mode=None):
            import h5py

            return h5py.File(path_or_io, mode or self.mode, alignment_threshold=1, alignment_interval=ALIGNMENT)

        def __setitem__(self, key, value):
            variable = value if hasattr(value, "path") else None  # a layer may store a computed array
            array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            if (self.float16_where_exact and array.dtype == np.float32
                    and np.array_equal(array.astype(np.float16).astype(np.float32), array)):
                array = array.astype(np.float16)
            kind = array.dtype.name if array.dtype.name in ("float16", "float32") else "other"
            self.counts[kind] = self.counts.get(kind, 0) + 1
            super().__setitem__(key, array)
            if variable is not None:  # (the id of a temporary array could be reused by another object)
                self.index[id(variable)] = f"{self._h5_entry_path}/vars/{key}" if self._h5_entry_path \
                    else f"vars/{key}"


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
    """The variable-path -> dataset index a file written by `save_weights` holds (None without one)."""
    if INDEX_DATASET not in f:
        return None
    if f[INDEX_DATASET].size > MAX_INDEX_BYTES:
        raise ValueError(f"{f.filename}: the variable index holds {f[INDEX_DATASET].size} bytes, more than "
                         f"{MAX_INDEX_BYTES}: not a file this library wrote")
    index = parse_json(bytes(np.asarray(f[INDEX_DATASET][()], np.uint8)), f"{f.filename}: {INDEX_DATASET}")
    return index if isinstance(index, dict) else None


def _load_indexed(model, path, f, index):
    """Assign every variable of ``model`` its dataset through ``index``; returns the datasets used, or None
    (nothing assigned) when the index does not describe exactly this model's variables (then Keras' walk
    pairs them)."""
    import h5py

    variables = model.weights
    keys = variable_keys(variables)
    if set(keys) != set(index) or len(set(index.values())) != len(index):
        return None
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: the file is never written
    for key, variable in zip(keys, variables, strict=True):
        dataset = f.get(index[key], getlink=False)
        if not isinstance(dataset, h5py.Dataset):
            raise ValueError(f"{path}: the index names {index[key]!r} for {key}, which is not a tensor of the file")
        if tuple(dataset.shape) != tuple(variable.shape):
            raise ValueError(f"{path}: {index[key]} has shape {tuple(dataset.shape)}, the model's {key} has "
                             f"{tuple(variable.shape)}")
        array = dataset_view(mapped, dataset)
        variable.assign(dataset[()] if array is None else _as_tensor(array))
    return {name.lstrip("/") for name in index.values()}


def load_weights(model, path):
    """``model.load_weights(path)`` for a ``.weights.h5`` file, quickly (module docstring): through the
    variable index of a file `save_weights` wrote, else Keras' walk with mapped reads (Keras' own load when
    `FAST_PATH` is False). A missing or mis-shaped tensor is a ValueError naming it. Returns the names of the
    datasets read (None after Keras' own load)."""
    import h5py

    path = os.fspath(path)
    if not FAST_PATH or not path.endswith(".weights.h5") or os.path.getsize(path) == 0:
        model.load_weights(path)
        return None
    if not model.built:
        raise ValueError(f"the model must be built before its weights are loaded from {path}")
    with h5py.File(path, "r") as f:
        index = _read_index(f)
        used = None if index is None else _load_indexed(model, path, f, index)
        if used is not None:
            return used
    store = _MappedStore(path)
    try:
        _saving_lib._load_state(model, weights_store=store, assets_store=None, inner_path="",
                                visited_saveables=set())
    finally:
        store.close()
    return store.used


def load_weights_strict(model, path):
    """`load_weights` (a missing or mis-shaped tensor is a ValueError), and nothing left over: the file must
    hold exactly one tensor per weight of the model (the variable index aside)."""
    import h5py

    used = load_weights(model, path)
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name)
                     if isinstance(obj, h5py.Dataset) and name != INDEX_DATASET else None)
    unexpected = sorted(set(names) - used) if used is not None else []
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise ValueError(f"the file holds {len(unexpected)} tensor(s) the model has no weight for: {shown}")
    if len(names) != len(model.weights):
        raise ValueError(f"the file holds {len(names)} tensors, the model has {len(model.weights)} weights")


def load_weights_part(model, path, in_part, inner_path=""):
    """Load ``model`` (one part of a larger saved model, e.g. a CLIP without its text tower, or that tower
    alone) from the datasets of a `save_weights` file for which ``in_part(name)`` is true, strictly: every
    weight of ``model`` from there, every tensor of that part used (the other tensors are not read).

    Through the file's variable index restricted to the part when it describes exactly ``model``'s variables,
    else Keras' walk from ``inner_path`` (where ``model`` sits in the saved model: "layers/text_transformer")
    with mapped reads. A missing, mis-shaped or left-over tensor is a ValueError. Returns the names read."""
    import h5py

    path = os.fspath(path)
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name)
                     if isinstance(obj, h5py.Dataset) and name != INDEX_DATASET and in_part(name) else None)
        index = _read_index(f)
        part = None if index is None else {k: v for k, v in index.items() if in_part(v.lstrip("/"))}
        used = None if part is None else _load_indexed(model, path, f, part)
    if used is None:
        if not FAST_PATH:
            raise ValueError(f"{path}: loading a part of a saved model needs Keras' saving module (not found)")
        store = _MappedStore(path)
        try:
            _saving_lib._load_state(model, weights_store=store, assets_store=None, inner_path=inner_path,
                                    visited_saveables=set())
        finally:
            store.close()
        used = store.used
    unexpected = sorted(set(names) - used)
    if unexpected or len(used) != len(model.weights) or not used <= set(names):
        raise ValueError(f"{path}: the part read does not match the model: {len(used)} tensors read for "
                         f"{len(model.weights)} weights, {len(unexpected)} left over ({unexpected[:5]})")
    return used


@contextlib.contextmanager
def variables_to_be_loaded():
    """Inside, a Keras variable whose initializer is random is created uninitialised (its memory is never
    written: the load that follows replaces it); see the module docstring. Variables with other
    initializers (constants, seed-generator states) are created as usual. Not thread-safe: it replaces a
    Keras method for the duration of the block."""
    if not FAST_PATH:
        yield
        return
    import tensorflow as tf

    original = _TFVariable._initialize_with_initializer

    def initialize(self, initializer):
        if isinstance(initializer, _RandomInitializer):
            self._initialize(lambda: tf.raw_ops.Empty(shape=self._shape, dtype=self._dtype, init=False))
        else:
            original(self, initializer)

    _TFVariable._initialize_with_initializer = initialize
    try:
        yield
    finally:
        _TFVariable._initialize_with_initializer = original


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


def save_weights(model, path, float16_where_exact=False):
    """``model.save_weights(path)`` with every dataset aligned (see the module docstring) and an index of
    the datasets by variable (`INDEX_DATASET`), and with ``float16_where_exact`` every float32 tensor that
    float16 represents exactly stored as float16 (half the file, bit-identical once loaded: Keras casts back
    to the variable's dtype). Keras' own ``load_weights`` reads the file as any of its files. Returns
    {"float16": n, "float32": m} (and "other": k when other dtypes are stored), the tensors stored in each."""
    import h5py

    path = os.fspath(path)
    if not FAST_PATH:  # Keras' own file: no alignment, no index (loaded through Keras' walk)
        with _clear_write_errors(path):
            model.save_weights(path)
        with h5py.File(path, "r") as f:
            counts = {}
            f.visititems(lambda _, obj: counts.__setitem__(obj.dtype.name, counts.get(obj.dtype.name, 0) + 1)
                         if isinstance(obj, h5py.Dataset) else None)
        return {"float16": counts.pop("float16", 0), "float32": counts.pop("float32", 0),
                **({"other": sum(counts.values())} if counts else {})}
    if not path.endswith(".weights.h5"):
        raise ValueError(f"a weights file name must end in .weights.h5, got {path}")
    with _clear_write_errors(path):
        store = _WritingStore(path, float16_where_exact)
        try:
            _saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                                    visited_saveables=set())
            keys = variable_keys(model.weights)
            if all(id(v) in store.index for v in model.weights):  # else: loaded by Keras' walk
                index = {key: store.index[id(v)] for key, v in zip(keys, model.weights, strict=True)}
                data = json.dumps(index, separators=(",", ":")).encode()
                store.h5_file.create_dataset(INDEX_DATASET, data=np.frombuffer(data, np.uint8))
        except BaseException:
            with contextlib.suppress(Exception):  # closing a file whose write failed fails again ("Can't
                store.close()                     # decrement id ref count"): the first error is the one
            raise
        store.close()
    return store.counts
