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
import os
from pathlib import Path

import numpy as np

try:  # Keras 3's private saving and variable classes (TensorFlow backend)
    from keras.src.backend.tensorflow.core import Variable as _TFVariable
    from keras.src.initializers.random_initializers import RandomInitializer as _RandomInitializer
    from keras.src.saving import saving_lib as _saving_lib

    FAST_PATH = all(hasattr(_saving_lib, name) for name in ("H5IOStore", "_load_state", "safe_get_h5_dataset")) \
        and hasattr(_TFVariable, "_initialize_with_initializer")
except ImportError:  # another Keras layout: Keras' public load_weights and initializers (slower, same values)
    FAST_PATH = False

#: alignment of the buffers handed to TensorFlow (Eigen's and XLA's requirement for CPU kernels)
ALIGNMENT = 64
#: dtypes read directly (native byte order); others go through Keras' reader
_DIRECT_DTYPES = {np.dtype(t).newbyteorder("=") for t in ("float32", "float16", "float64", "int32", "int64")}


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

        def __getitem__(self, key):
            group = self._h5_entry_group
            if not hasattr(group, "id"):  # no such group in the file: Keras' own error
                return super().__getitem__(key)
            dataset = _saving_lib.safe_get_h5_dataset(group, key)  # Keras' checks (no links out of the file)
            array = dataset_view(self._mapped, dataset)
            return super().__getitem__(key) if array is None else _as_tensor(array)


def load_weights(model, path):
    """``model.load_weights(path)`` for a ``.weights.h5`` file, with the direct reads of the module docstring
    (Keras' own when `FAST_PATH` is False). Errors are Keras': ValueError for a mismatch."""
    path = os.fspath(path)
    if not FAST_PATH or not path.endswith(".weights.h5") or os.path.getsize(path) == 0:
        model.load_weights(path)
        return
    if not model.built:
        raise ValueError(f"the model must be built before its weights are loaded from {path}")
    store = _MappedStore(path)
    try:
        _saving_lib._load_state(model, weights_store=store, assets_store=None, inner_path="",
                                visited_saveables=set())
    finally:
        store.close()


def load_weights_strict(model, path):
    """`load_weights` (a missing or mis-shaped tensor is Keras' ValueError), and nothing left over: the file
    must hold exactly one tensor per weight of the model."""
    import h5py

    load_weights(model, path)
    with h5py.File(path, "r") as f:
        count = []
        f.visititems(lambda name, obj: count.append(name) if isinstance(obj, h5py.Dataset) else None)
    if len(count) != len(model.weights):
        raise ValueError(f"the file holds {len(count)} tensors, the model has {len(model.weights)} weights")


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


def save_weights(model, path, float16_where_exact=False):
    """``model.save_weights(path)`` with every dataset aligned (see the module docstring), and with
    ``float16_where_exact`` every float32 tensor that float16 represents exactly stored as float16 (half the
    file, bit-identical once loaded: Keras casts back to the variable's dtype). Returns {"float16": n,
    "float32": m} (and "other": k when other dtypes are stored), the tensors stored in each."""
    import h5py

    path = Path(path)
    full = path.parent / f".{path.name}.keras.weights.h5"  # Keras' file, rewritten into `path`, then removed
    model.save_weights(str(full))
    counts = {"float16": 0, "float32": 0}
    try:
        with h5py.File(full, "r") as src, h5py.File(path, "w", alignment_threshold=1,
                                                    alignment_interval=ALIGNMENT) as dst:
            dst.attrs.update(dict(src.attrs))

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    target = dst.require_group(name)
                else:
                    value = obj[()]
                    if (float16_where_exact and value.dtype == np.float32
                            and np.array_equal(value.astype(np.float16).astype(np.float32), value)):
                        value = value.astype(np.float16)
                    kind = value.dtype.name if value.dtype.name in ("float16", "float32") else "other"
                    counts[kind] = counts.get(kind, 0) + 1
                    target = dst.create_dataset(name, data=value)
                target.attrs.update(dict(obj.attrs))

            src.visititems(copy)
    finally:
        full.unlink(missing_ok=True)
    return counts
