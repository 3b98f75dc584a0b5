"""Read PyTorch checkpoint files without torch and without running anything they contain.

Three formats, the ones ``torch.save`` / ``torch.jit.save`` write:

- the zip format (torch >= 1.6): ``<root>/data.pkl`` pickles the object, ``<root>/data/<key>`` holds one raw
  storage per key, ``<root>/byteorder`` says ``little`` (the default when absent) or ``big``;
- TorchScript archives (OpenAI's CLIP ``.pt``): the same zip layout, but ``data.pkl`` pickles the module tree as
  ``__torch__.*`` objects whose state is a dict of attributes, and ``code/`` holds each class's source, whose
  ``__parameters__`` / ``__buffers__`` lines say which tensor attributes ``state_dict()`` holds (a plain tensor
  attribute, e.g. an attention mask, is not in it);
- the legacy format (``_use_new_zipfile_serialization=False``): a sequence of pickles (magic number, protocol,
  sys info, the object, the storage keys), then each storage as an 8-byte little-endian element count followed
  by its raw little-endian bytes.

Every pickle goes through `RestrictedUnpickler`, whose ``find_class`` admits only what a state dict needs
(`ALLOWED_GLOBALS`: the tensor and parameter rebuilds, storage types by dtype, ``OrderedDict``, torch dtypes,
``torch.Size``, TorchScript's list tags) and refuses every other global with `CheckpointError` naming it.
TorchScript's ``__torch__.*`` classes become inert `ScriptObject` instances that only record their pickled
state: no ``__setstate__`` of the file runs, and its ``code/`` is read as text, never executed.

Tensors come back as numpy arrays, copied out of their storage with the pickled offset, size and stride (views
of one storage stay correct). bfloat16, which numpy lacks, is returned as float32 (exact: its bits shifted into
the high half). Reads are bounded: each record's size must match what the pickle declares, pickles and code
are capped, zip entries may not overlap, and one load allocates at most `MAX_FILE_MULTIPLE` times the file's
size plus `MAX_EXPANDED_BYTES` in all (`ReadBudget`: storages read and tensors copied out of them, so that
neither many tensors over one storage nor many entries over one record multiply a small file). Shared
containers are built once (a pickle's memo can make N nested ``[x, x]`` stand for 2^N references).

Example::

    state_dict = load_state_dict("ViT-B-32.pt")          # {name: np.ndarray}, TorchScript or not
    shapes = load_state_dict("coco_weights.pt", shapes_only=True)   # {name: TensorRecord}: .shape, .dtype
"""

import ast
import collections
import functools
import io
import os
import pickle
import re
import struct
import types
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from utils.file_utils import UnsafePathError, open_regular_file

MAX_PICKLE_BYTES = 256 * 1024 * 1024  # one data.pkl (OpenAI's ViT-L/14: ~0.1 MB)
MAX_CODE_BYTES = 64 * 1024 * 1024  # all TorchScript sources together
MAX_COMPRESSION_RATIO = 1000  # a compressed record may not claim more than this many times its stored bytes
MAX_EXPANDED_BYTES = 256 * 1024 * 1024  # a stride-0 (expanded) tensor may not copy out to more than this
#: one load's allocations (storages read + tensors copied) may reach this many times the file's size, plus
#: MAX_EXPANDED_BYTES: a state dict reads each storage once and copies at most the tensors that share one (GPT-2's
#: tied head: ~1.3x its file)
MAX_FILE_MULTIPLE = 3
MAX_MODULES = 100_000  # TorchScript modules visited for a state dict (a shared submodule is visited per path)
MAX_INDEX = 2**62  # sizes, strides and offsets beyond this are refused (numpy's index arithmetic is int64)
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: torch's storage type names -> numpy dtype ("bfloat16" is read as uint16 bits, returned as float32)
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16", "UntypedStorage": "u1",
}
#: torch dtype names that may appear as globals (e.g. a dtype attribute); loaded as inert `TorchDtype`
TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128", "double", "float", "half", "long", "int", "short")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, of the wrong kind, or does not match the expected architecture.

    Defined here, the lowest module of ``utils.convert`` (every converter imports it from
    `utils.convert.common`, which re-exports it)."""


class ReadBudget:
    """The bytes one load may still allocate from its file (`MAX_FILE_MULTIPLE`); `take` raises
    `CheckpointError` past it, naming what asked."""

    def __init__(self, file_size, source):
        self.left, self.source = MAX_FILE_MULTIPLE * file_size + MAX_EXPANDED_BYTES, source
        self.limit = self.left

    def take(self, nbytes, what):
        if nbytes > self.left:
            raise CheckpointError(f"{self.source}: {what} would take the bytes read from this file past "
                                  f"{self.limit} ({MAX_FILE_MULTIPLE} times its size + {MAX_EXPANDED_BYTES}): "
                                  "many tensors over one storage, or overlapping records; refused")
        self.left -= nbytes


class TorchDtype(str):
    """A torch dtype named in a pickle (``torch.float16``), kept as its name."""


class StorageType:
    """A storage type named in a pickle (``torch.HalfStorage``): its numpy dtype."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    @property
    def itemsize(self):
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class ScriptObject:
    """A TorchScript object (``__torch__.*``), inert: its pickled state is recorded, nothing of it runs."""

    qualified_name = ""

    def __setstate__(self, state):  # BUILD: the state is data, kept as it is
        self.state = state

    def __repr__(self):
        return f"<ScriptObject {self.qualified_name}>"


class Storage:
    """One storage of a checkpoint: ``numel`` elements of ``storage_type``; its bytes (a uint8 array) are read
    on first use (once, shared by every tensor viewing it) by ``read_bytes`` or set from the legacy format's
    tail. ``users`` counts the tensors on it: a tensor alone on its whole storage takes the buffer, uncopied."""

    def __init__(self, key, storage_type, numel, read_bytes=None, budget=None):
        self.key, self.storage_type, self.numel, self._read_bytes = key, storage_type, numel, read_bytes
        self._raw, self.base, self.offset, self.users, self.budget = None, None, 0, 0, budget

    def view(self, key, offset, numel):
        """A legacy storage view: ``numel`` elements from ``offset`` of this storage."""
        if offset < 0 or numel < 0 or offset + numel > self.numel:
            raise CheckpointError(f"storage view {key!r} ({offset}+{numel}) lies outside storage {self.key!r} "
                                  f"of {self.numel} elements")
        view = Storage(key, self.storage_type, numel, budget=self.budget)
        view.base, view.offset = self, offset
        return view

    def set_bytes(self, raw):
        self._raw = raw

    def take(self, nbytes, what):
        """Count ``nbytes`` allocated for ``what`` against the load's `ReadBudget` (if any)."""
        if self.budget is not None:
            self.budget.take(nbytes, what)

    def close(self, why):
        """No more reading: a later `raw` raises `CheckpointError` saying ``why``."""
        if self._raw is None:
            self._read_bytes = None
            self._closed = why

    def raw(self):
        """The storage's bytes, a uint8 array of exactly ``numel * itemsize``."""
        if self.base is not None:
            size = self.storage_type.itemsize
            return self.base.raw()[self.offset * size:(self.offset + self.numel) * size]
        if self._raw is None:
            if self._read_bytes is None:
                raise CheckpointError(f"storage {self.key!r}: {getattr(self, '_closed', 'no data in the file')}")
            self._raw = self._read_bytes()  # counted by the reader, after its own checks
        return self._raw


class TensorRecord:
    """A tensor as pickled: its storage, offset, size and stride. ``shape`` and ``dtype`` cost nothing;
    `numpy` reads the storage (once) and copies the view out of it (a tensor alone on all of its storage
    takes the storage's buffer instead)."""

    def __init__(self, storage, offset, size, stride, byteorder="little"):
        self.storage, self.offset, self.shape, self.stride = storage, offset, size, stride
        self.byteorder = byteorder
        self._check_bounds()

    @property
    def dtype(self):
        dtype = self.storage.storage_type.dtype
        return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("=")

    def _check_bounds(self):
        numel = self.storage.numel
        if self.offset < 0 or any(n < 0 for n in self.shape) or any(s < 0 for s in self.stride):
            raise CheckpointError(f"tensor on storage {self.storage.key!r} has a negative offset, size or stride "
                                  f"(offset {self.offset}, size {self.shape}, stride {self.stride})")
        if max((self.offset, *self.shape, *self.stride)) >= MAX_INDEX:
            raise CheckpointError(f"tensor on storage {self.storage.key!r} has an offset, size or stride of 2**62 "
                                  f"or more (offset {self.offset}, size {self.shape}, stride {self.stride}); refused")
        if 0 in self.shape:
            return
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if last >= numel:
            raise CheckpointError(f"tensor of size {self.shape}, stride {self.stride} at offset {self.offset} "
                                  f"reaches past storage {self.storage.key!r} of {numel} elements")
        count = int(np.prod(self.shape, dtype=object))
        if count > numel and count * self.storage.storage_type.itemsize > MAX_EXPANDED_BYTES:
            raise CheckpointError(f"tensor of size {self.shape} expands storage {self.storage.key!r} of {numel} "
                                  f"elements to {count}: its copy would exceed {MAX_EXPANDED_BYTES} bytes; refused")

    def numpy(self):
        """The tensor as a new numpy array in native byte order (bfloat16: float32)."""
        storage_type = self.storage.storage_type
        is_bf16 = storage_type.dtype == "bfloat16"
        dtype = np.dtype("<u2" if is_bf16 else storage_type.dtype)
        if self.byteorder == "big":
            dtype = dtype.newbyteorder(">")
        flat = self.storage.raw().view(dtype)
        if self._owns_storage() and not is_bf16 and dtype.isnative:
            return flat.reshape(self.shape)  # the storage's own buffer: nothing else views it
        self.storage.take(int(np.prod(self.shape, dtype=object)) * (4 if is_bf16 else dtype.itemsize),
                          f"a copy of size {self.shape} from storage {self.storage.key!r}")
        if 0 in self.shape:
            array = np.zeros(self.shape, dtype.newbyteorder("="))
        else:
            view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.shape,
                                                   strides=[s * dtype.itemsize for s in self.stride],
                                                   writeable=False)
            array = np.array(view, dtype=dtype.newbyteorder("="))  # a copy, native order
        if is_bf16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def _owns_storage(self):
        """True when this tensor is the only one on its (root) storage and is all of it, in order."""
        storage, expected = self.storage, 1
        if storage.base is not None or storage.users != 1 or self.offset != 0:
            return False
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return expected == storage.numel

    def __repr__(self):
        return f"TensorRecord(shape={self.shape}, dtype={self.dtype})"


# ----------------------------------------------------------------------- what a pickle may name


def _ints(value, what):
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of integers, not {value!r}"[:200])
    return tuple(value)


def _no_hooks(hooks):
    if hooks is not None and not (isinstance(hooks, Mapping) and not hooks):
        raise CheckpointError("a tensor carries backward hooks (code); refused")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2, as data: a `TensorRecord` (gradients, hooks and metadata dropped)."""
    if not isinstance(storage, Storage):
        raise CheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    if type(storage_offset) is not int:
        raise CheckpointError(f"tensor storage offset must be an integer, not {storage_offset!r}"[:200])
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
    _no_hooks(backward_hooks)
    record = TensorRecord(storage, storage_offset, size, stride)
    (storage.base or storage).users += 1
    return record


def _rebuild_tensor(storage, storage_offset, size, stride):
    """torch._utils._rebuild_tensor (older files)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an ``nn.Parameter`` is its tensor here."""
    if not isinstance(data, TensorRecord):
        raise CheckpointError(f"a parameter is rebuilt from {type(data).__name__}, not a tensor")
    _no_hooks(backward_hooks)
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter_with_state: the extra Python attributes (data) are dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _same_list(data, *tag):
    """torch.jit._pickle.build_intlist / restore_type_tag & co: the value itself."""
    return data


def _torch_size(values=()):
    return _ints(tuple(values), "Size")


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("refused _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin-1")


#: (module, name) -> what it loads as; every other global is refused
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _latin1_encode,
    **{("torch.jit._pickle", name): _same_list
       for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")},
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", "u1"),
    **{("torch", name): TorchDtype(name) for name in TORCH_DTYPES},
}
_SCRIPT_NAME = re.compile(r"__torch__(\.[A-Za-z_]\w*)*")


def _fresh(value):
    """A per-load copy of an allowed global: a pickle's BUILD sets attributes on what ``find_class`` returned,
    which must never reach `ALLOWED_GLOBALS` (a crafted file would change how later files in the process are
    read, e.g. a storage type's dtype)."""
    if isinstance(value, StorageType):
        return StorageType(value.name, value.dtype)
    if isinstance(value, TorchDtype):
        return TorchDtype(value)
    if isinstance(value, types.FunctionType):
        return functools.partial(value)  # its own attributes; the function's stay untouched
    return value  # collections.OrderedDict: a built-in type, whose attributes a BUILD cannot set


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that builds only `ALLOWED_GLOBALS` (and, with ``script_classes``, inert
    `ScriptObject` subclasses for ``__torch__.*`` names); persistent ids are resolved by ``storage_for``."""

    def __init__(self, file, storage_for, source, script_classes=False):
        super().__init__(file)
        self._storage_for, self._source, self._script = storage_for, source, script_classes
        self._classes = {}  # this file's __torch__ classes (one Python class per qualified name)

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return _fresh(ALLOWED_GLOBALS[(module, name)])
        if self._script and _SCRIPT_NAME.fullmatch(module) and name.isidentifier():
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        raise CheckpointError(
            f"{self._source}: refused to load the global {module}.{name} (a checkpoint may hold only tensors, "
            "storages and plain containers; nothing from the file was run)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise CheckpointError(f"{self._source}: unknown persistent id {str(pid)[:100]}")
        return self._storage_for(pid[1:])


def _unpickle(data, storage_for, source, script_classes=False, file=None):
    """Run `RestrictedUnpickler` over ``data`` (bytes) or the open ``file``; its errors as `CheckpointError`."""
    unpickler = RestrictedUnpickler(file if file is not None else io.BytesIO(data), storage_for, source,
                                    script_classes)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            struct.error, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {source} as a PyTorch checkpoint (truncated or corrupt download, "
                              f"or not a checkpoint): {type(e).__name__}: {str(e)[:200]}") from None


def _storage_type(value, source):
    if not isinstance(value, StorageType):
        raise CheckpointError(f"{source}: a storage of type {str(value)[:80]!r}, not a torch storage type")
    return value


def _count(value, what, source):
    if type(value) is not int or value < 0:
        raise CheckpointError(f"{source}: {what} {str(value)[:80]!r} is not a non-negative integer")
    return value


# ----------------------------------------------------------------------- the zip format (and TorchScript)


def _buffer(nbytes):
    """A new writable uint8 array of ``nbytes``, over a bytearray: numpy's own large allocations ask for huge
    pages, which under memory pressure made reading a 380 MB checkpoint 3-4x slower (kernel compaction)."""
    return np.frombuffer(bytearray(nbytes), np.uint8)


class _ZipCheckpoint:
    """One zip checkpoint: its root folder, records read with sizes checked against the pickle."""

    def __init__(self, archive, file, source, file_size):
        self.archive, self.file, self.source, self.file_size = archive, file, source, file_size
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{source} is a zip archive but not a PyTorch checkpoint (no <root>/data.pkl)")
        self.root = pickles[0][:-len("data.pkl")]
        self.names = set(archive.namelist())
        _check_no_overlap(archive, source)
        self.budget = ReadBudget(file_size, source)
        byteorder = self.read(self.root + "byteorder", max_bytes=16) if self.root + "byteorder" in self.names \
            else b"little"
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(f"{source}: unknown byte order {byteorder[:16]!r}")
        self.byteorder = byteorder.decode()
        self.storages = {}

    def is_torchscript(self):
        return self.root + "constants.pkl" in self.names or any(n.startswith(self.root + "code/")
                                                                 for n in self.names)

    def read(self, name, expected=None, max_bytes=None):
        """The bytes of record ``name``: exactly ``expected`` bytes, or at most ``max_bytes``."""
        return self.read_array(name, expected, max_bytes).tobytes()

    def read_array(self, name, expected=None, max_bytes=None):
        """Record ``name`` as a new uint8 array (see `read`); CRC-checked. An uncompressed record (what torch
        writes) is read straight into the array, one allocation; a compressed one through `zipfile`."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.source}: record {name} is missing (truncated or corrupt file)") from None
        if expected is not None and info.file_size != expected:
            raise CheckpointError(f"{self.source}: record {name} holds {info.file_size} bytes, its tensor needs "
                                  f"{expected} (truncated or corrupt file)")
        if max_bytes is not None and info.file_size > max_bytes:
            raise CheckpointError(f"{self.source}: record {name} of {info.file_size} bytes exceeds {max_bytes}")
        limit = self.file_size if info.compress_type == zipfile.ZIP_STORED else \
            MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
        if info.file_size > limit:
            raise CheckpointError(f"{self.source}: record {name} claims {info.file_size} bytes from "
                                  f"{info.compress_size} stored (truncated, corrupt or a zip bomb)")
        self.budget.take(info.file_size, f"record {name}")
        try:
            if info.compress_type == zipfile.ZIP_STORED and info.file_size == info.compress_size:
                data = self._read_stored(info)
            else:
                with self.archive.open(info) as f:
                    data = np.frombuffer(bytearray(f.read(info.file_size + 1)), np.uint8)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {self.source}: record {name}: {type(e).__name__}: {e} "
                                  "(truncated or corrupt download?)") from None
        if len(data) != info.file_size:
            raise CheckpointError(f"{self.source}: record {name} is truncated ({len(data)} of {info.file_size} "
                                  "bytes; truncated or corrupt download?)")
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(f"{self.source}: record {name} fails its CRC check (corrupt download?)")
        return data

    def _read_stored(self, info):
        """An uncompressed record's bytes, read from the file at its offset into a new uint8 array."""
        self.file.seek(info.header_offset)
        header = self.file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        self.file.seek(info.header_offset + 30 + name_length + extra_length)
        data = _buffer(info.file_size)
        read = self.file.readinto(memoryview(data))
        return data[:read]

    def storage_for(self, args):
        """persistent_load of ``("storage", type, key, location, numel)``: one `Storage` per key."""
        if len(args) != 4:
            raise CheckpointError(f"{self.source}: a storage id of {len(args)} fields, expected 4")
        storage_type, key, _location, numel = args
        storage_type = _storage_type(storage_type, self.source)
        if not isinstance(key, str) or not re.fullmatch(r"\w+", key):
            raise CheckpointError(f"{self.source}: storage key {str(key)[:80]!r} is not a record name")
        numel = _count(numel, f"the size of storage {key}", self.source)
        if key not in self.storages:
            name, nbytes = f"{self.root}data/{key}", numel * storage_type.itemsize
            if name not in self.names:
                raise CheckpointError(f"{self.source}: storage {key} ({name}) is missing (truncated or corrupt file)")
            if self.archive.getinfo(name).file_size != nbytes:
                self.read(name, expected=nbytes)  # raises, naming the record and both sizes
            self.storages[key] = Storage(key, storage_type, numel,
                                         lambda name=name, nbytes=nbytes: self.read_array(name, expected=nbytes),
                                         budget=self.budget)
        storage = self.storages[key]
        if storage.storage_type.dtype != storage_type.dtype or storage.numel != numel:
            raise CheckpointError(f"{self.source}: storage {key} is declared twice with different types or sizes")
        return storage

    def load(self):
        data = self.read(self.root + "data.pkl", max_bytes=MAX_PICKLE_BYTES)
        return _unpickle(data, self.storage_for, self.source, script_classes=self.is_torchscript())

    def declared_members(self):
        """{qualified class name: (is a Module, parameter names, buffer names)} from the ``code/`` sources,
        read as text (``__parameters__ = [...]`` / ``__buffers__ = [...]`` lines of each class)."""
        prefix, total, classes = self.root + "code/", 0, {}
        for name in sorted(n for n in self.names if n.startswith(prefix) and n.endswith(".py")):
            text = self.read(name, max_bytes=MAX_CODE_BYTES)
            total += len(text)
            if total > MAX_CODE_BYTES:
                raise CheckpointError(f"{self.source}: TorchScript sources exceed {MAX_CODE_BYTES} bytes")
            module = name[len(prefix):-len(".py")].replace("/", ".")
            classes.update(_declared_members(text.decode("utf-8", "replace"), module, self.source))
        return classes


_CLASS_LINE = re.compile(r"class (\w+)\((.*)\):\s*$")
_MEMBER_LINE = re.compile(r"\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


def _check_no_overlap(archive, source):
    """`CheckpointError` unless every entry of the zip ``archive`` is named once and its stored bytes end before
    the next entry's header (and the central directory): entries that share bytes would let one stored record
    be read as many (`zipfile` checks this only in its own ``open``, which stored records bypass here)."""
    infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{source}: zip entries named twice ({', '.join(twice[:3])}); corrupt or crafted file")
    ends = [i.header_offset for i in infos[1:]] + [archive.start_dir]
    for info, end in zip(infos, ends):
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        try:
            name_length = len(info.orig_filename.encode(encoding))
        except UnicodeEncodeError:
            name_length = len(info.orig_filename.encode("utf-8"))
        if info.header_offset + 30 + name_length + info.compress_size > end:
            raise CheckpointError(f"{source}: zip entry {info.filename} overlaps the next entry (entries sharing "
                                  "their bytes: corrupt or crafted file)")


def _declared_members(text, module, source):
    """The classes of one TorchScript source file: ``{qualified name: (is_module, params, buffers)}``."""
    classes, current = {}, None
    for line in text.splitlines():
        if match := _CLASS_LINE.match(line):
            current = f"{module}.{match.group(1)}"
            classes[current] = [match.group(2).strip() == "Module", [], []]
        elif current and (match := _MEMBER_LINE.match(line)):
            try:
                names = ast.literal_eval(match.group(2))  # a list of string literals; evaluates nothing else
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                names = None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CheckpointError(f"{source}: cannot read {match.group(1)} of TorchScript class {current}")
            classes[current][1 if match.group(1) == "__parameters__" else 2] = names
        elif line and not line[0].isspace():
            current = None
    return {k: tuple(v) for k, v in classes.items()}


def script_state_dict(root, declared, source):
    """What ``torch.jit.load(...).state_dict()`` gives, from the inert module tree: each module's declared
    parameters then buffers (None entries skipped), then its submodules', named by attribute path."""
    out, visits = collections.OrderedDict(), [0]

    def visit(obj, prefix):
        visits[0] += 1
        if visits[0] > MAX_MODULES:
            raise CheckpointError(f"{source}: more than {MAX_MODULES} TorchScript modules (submodules shared "
                                  "along many paths?); refused")
        members = declared.get(obj.qualified_name)
        if members is None:
            raise CheckpointError(f"{source}: TorchScript class {obj.qualified_name} has no source in code/")
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: TorchScript module {prefix.rstrip('.') or '<root>'} "
                                  f"({obj.qualified_name}) sets its state with code; refused")
        _, parameters, buffers = members
        for name in (*parameters, *buffers):
            value = state.get(name)
            if isinstance(value, TensorRecord):
                out[prefix + name] = value
            elif value is not None:
                raise CheckpointError(f"{source}: {prefix}{name} is declared a tensor but holds "
                                      f"{type(value).__name__}")
        for name, value in state.items():
            if isinstance(value, ScriptObject) and declared.get(value.qualified_name, (False,))[0]:
                visit(value, f"{prefix}{name}.")

    if not isinstance(root, ScriptObject):
        raise CheckpointError(f"{source}: a TorchScript archive whose data.pkl holds {type(root).__name__}, "
                              "not a module")
    visit(root, "")
    return out


# ----------------------------------------------------------------------- the legacy format


class _BoundedReader:
    """The file as the unpickler reads it, each read capped at what the file holds (a pickle's length field
    must not make the reader allocate more than the file's size)."""

    def __init__(self, file, size):
        self.file, self.size = file, size

    def _left(self, n):
        left = max(self.size - self.file.tell(), 0)
        return left if n is None or n < 0 else min(n, left)

    def read(self, n=-1):
        return self.file.read(self._left(n))

    def readline(self, n=-1):
        return self.file.readline(self._left(n))

    def readinto(self, buffer):
        return self.file.readinto(memoryview(buffer)[:self._left(len(buffer))])


class _LegacyCheckpoint:
    """A legacy (non-zip) checkpoint read from an open file: pickles, then the storages' bytes."""

    def __init__(self, file, source, file_size):
        self.file, self.source, self.file_size = file, source, file_size
        self.budget = ReadBudget(file_size, source)
        self.storages = {}  # root key -> Storage
        self.views = {}

    def storage_for(self, args):
        """persistent_load of ``("storage", type, root_key, location, numel, view_metadata)``."""
        if len(args) != 5:
            raise CheckpointError(f"{self.source}: a storage id of {len(args)} fields, expected 5")
        storage_type, key, _location, numel, view = args
        storage_type = _storage_type(storage_type, self.source)
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str):
            raise CheckpointError(f"{self.source}: storage key {str(key)[:80]!r} is not a string")
        numel = _count(numel, f"the size of storage {key}", self.source)
        if numel * storage_type.itemsize > self.file_size:
            raise CheckpointError(f"{self.source}: storage {key} of {numel} elements is larger than the file "
                                  "(truncated or corrupt)")
        storage = self.storages.setdefault(key, Storage(key, storage_type, numel, budget=self.budget))
        if storage.storage_type.dtype != storage_type.dtype or storage.numel != numel:
            raise CheckpointError(f"{self.source}: storage {key} is declared twice with different types or sizes")
        if view is None:
            return storage
        if not isinstance(view, tuple) or len(view) != 3:
            raise CheckpointError(f"{self.source}: storage view {str(view)[:80]!r} is not (key, offset, size)")
        view_key, offset, size = view
        if view_key not in self.views:
            self.views[view_key] = storage.view(view_key, _count(offset, "a view offset", self.source),
                                                _count(size, "a view size", self.source))
        return self.views[view_key]

    def _header(self, what, expected=None):
        value = _unpickle(None, self._no_storage, self.source, file=_BoundedReader(self.file, self.file_size))
        if expected is not None and value != expected:
            raise CheckpointError(f"cannot read {self.source} as a PyTorch checkpoint: bad {what} "
                                  "(not a checkpoint, or truncated or corrupt)")
        return value

    def _no_storage(self, args):
        raise CheckpointError(f"{self.source}: a storage outside the checkpoint's object")

    def load(self, read_data=True):
        self._header("magic number", LEGACY_MAGIC_NUMBER)
        self._header("protocol version", LEGACY_PROTOCOL_VERSION)
        sys_info = self._header("sys info")
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError(f"{self.source}: a legacy checkpoint written on a big-endian machine; "
                                  "not supported")
        obj = _unpickle(None, self.storage_for, self.source, file=_BoundedReader(self.file, self.file_size))
        keys = self._header("storage keys")
        if not isinstance(keys, list) or set(map(str, keys)) != set(self.storages) or len(keys) != len(set(keys)):
            raise CheckpointError(f"{self.source}: the storage key list does not match the tensors' storages")
        for key in keys:
            self._read_storage(self.storages[str(key)], read_data)
        return obj

    def _read_storage(self, storage, read_data):
        head = self.file.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{self.source}: storage {storage.key} is missing (truncated file)")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise CheckpointError(f"{self.source}: storage {storage.key} holds {numel} elements, its tensors "
                                  f"declare {storage.numel} (corrupt file)")
        nbytes = numel * storage.storage_type.itemsize
        available = self.file_size - self.file.tell()
        if available < nbytes:
            raise CheckpointError(f"{self.source}: storage {storage.key} is truncated ({max(available, 0)} of "
                                  f"{nbytes} bytes; truncated or corrupt download?)")
        if read_data:
            storage.take(nbytes, f"storage {storage.key!r}")
            data = _buffer(nbytes)
            if self.file.readinto(memoryview(data)) != nbytes:
                raise CheckpointError(f"{self.source}: storage {storage.key} is truncated (corrupt download?)")
            storage.set_bytes(data)
        else:
            storage.close("read with shapes_only=True: its bytes were not read")
            self.file.seek(nbytes, os.SEEK_CUR)


# ----------------------------------------------------------------------- entry points


def _open_checked(path):
    """Open a checkpoint file for reading; `CheckpointError` for missing, special or empty files."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        f = open_regular_file(path, max_bytes=None)
    except UnsafePathError as e:
        raise CheckpointError(f"checkpoint {e}") from None
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        f.close()
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    return f, size


def read_checkpoint(path, shapes_only=False):
    """The object a checkpoint file holds, its tensors as `TensorRecord` (materialise with ``.numpy()``).

    A TorchScript archive gives its module's ``state_dict()`` (names as torch gives them); other files give
    what was saved. With ``shapes_only`` the storages are checked but not read (legacy files: skipped over).
    """
    path = os.fspath(path)
    try:
        return _read_checkpoint(path, shapes_only)
    except RecursionError:  # containers or modules nested deeper than Python recurses
        raise CheckpointError(f"{path}: objects nested too deeply; not a state dict") from None


def _read_checkpoint(path, shapes_only):
    f, size = _open_checked(path)
    with f:
        if zipfile.is_zipfile(f):
            f.seek(0)
            try:
                archive = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt "
                                      f"download): {e}") from None
            with archive:
                checkpoint = _ZipCheckpoint(archive, f, path, size)
                obj = checkpoint.load()
                for record in _records(obj):
                    record.byteorder = checkpoint.byteorder
                if checkpoint.is_torchscript():
                    obj = script_state_dict(obj, checkpoint.declared_members(), path)
                if not shapes_only:
                    obj = _materialise(obj)
                for storage in checkpoint.storages.values():
                    storage.close("read with shapes_only=True: its bytes were not read")
            return obj
        f.seek(0)
        head = f.read(512)
        f.seek(0)
        if head[257:262] == b"ustar":
            raise CheckpointError(f"{path} is a PyTorch checkpoint in the tar format of torch < 0.4; "
                                  "not supported (load and re-save it with a recent torch)")
        if not head.startswith(b"\x80"):
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt download, "
                                  "or not a checkpoint): neither a zip archive nor a pickle")
        obj = _LegacyCheckpoint(f, path, size).load(read_data=not shapes_only)
        return obj if shapes_only else _materialise(obj)


def _records(obj):
    """Every `TensorRecord` in a loaded object (containers and TorchScript states walked)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, TensorRecord):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, ScriptObject):
            stack.append(getattr(item, "state", None))


def _materialise(obj, done=None):
    """``obj`` with each `TensorRecord` in a (nested) dict / list / tuple replaced by its numpy array. Each
    record and each container is converted once (``done``, by id): a tensor pickled once and referenced twice
    stays one array, as in torch, and a container referenced twice is not rebuilt twice (nested ``[x, x]`` in a
    pickle's memo would otherwise cost 2^depth)."""
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, TensorRecord):
        value = obj.numpy()
    elif isinstance(obj, dict):
        value = type(obj)((k, _materialise(v, done)) for k, v in obj.items())
    elif isinstance(obj, list):
        value = [_materialise(v, done) for v in obj]
    elif isinstance(obj, tuple):
        value = tuple(_materialise(v, done) for v in obj)
    else:
        return obj
    done[id(obj)] = value
    return value


def load_state_dict(path, shapes_only=False):
    """A checkpoint's state dict: ``{name: np.ndarray}`` (``shapes_only``: ``{name: TensorRecord}``).

    Accepts a bare state dict, the common wrappers ``{"state_dict": ...}`` / ``{"model": ...}`` and TorchScript
    archives. `CheckpointError` for missing, special, empty, truncated or non-checkpoint files, and for any
    global beyond `ALLOWED_GLOBALS` (named).
    """
    obj = read_checkpoint(path, shapes_only=shapes_only)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a state dict")
    kind = TensorRecord if shapes_only else np.ndarray
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, kind):
            raise CheckpointError(f"{os.fspath(path)}: entry {str(key)[:80]!r} is a {type(key).__name__} -> "
                                  f"{type(value).__name__}; a state dict maps names (str) to tensors")
    return dict(obj)
