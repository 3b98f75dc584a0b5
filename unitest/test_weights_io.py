"""utils/weights_io.py: aligned weights files, loaded as copy-on-write views of the file, bit-identical to Keras.

Every load here is compared bit for bit (``tobytes``) with Keras' own ``model.load_weights`` of the same file:
the fast path may change how bytes reach a variable, never which bytes. The memory-map safety promises are
checked as a user would hit them: a loaded model keeps its values when its folder is replaced (the library
renames new folders into place), and training a loaded model (writing its variables) never writes the file.
"""

import ctypes
import hashlib
import json
import os
import shutil
import sys

import h5py
import keras
import numpy as np
import pytest

from utils import weights_io
from utils.file_utils import replace_dir
from utils.weights_io import (
    ALIGNMENT,
    dataset_view,
    load_weights,
    load_weights_strict,
    save_weights,
    variables_to_be_loaded,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(seed=0):
    """Dense (random kernel, zero bias) -> LayerNorm (ones, zeros) -> Dense: 6 weights, every Keras kind."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, name="d1"),
                             keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])


def values(model):
    return [np.array(v.numpy()) for v in model.weights]


def assert_bit_identical(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert a.tobytes() == b.tobytes(), f"weight {i} differs (max abs diff {np.abs(a - b).max()})"


def datasets(path):
    """{name: (dtype, shape, file offset)} of every tensor of an h5 file (the variable index aside)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, (obj.dtype, obj.shape, obj.id.get_offset()))
                     if isinstance(obj, h5py.Dataset) and name != weights_io.INDEX_DATASET else None)
    return out


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def buffer_address(variable):
    """Where a Keras variable's values are in memory (its TensorFlow buffer, read without a copy through
    DLPack, as `save_weights` reads them to find their tensors)."""
    return weights_io._host_values(variable).ctypes.data


def file_mappings(path):
    """[(start, end)] of this process's memory maps of ``path`` (Linux /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def keras_loaded(path, seed=1):
    """A fresh model (other random weights) loaded by Keras itself: the reference of every comparison."""
    model = small_model(seed)
    model.load_weights(str(path))
    return model


def test_a_saved_file_loads_through_its_index_on_this_keras(tmp_path):
    """The fast path needs no Keras internals: a file `save_weights` wrote is indexed, and a model built
    again (another default name) loads through the index, every dataset used (Keras' own load returns None)."""
    model = small_model()
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)
    assert load_weights(small_model(seed=2), path) == set(datasets(path)), f"Keras {keras.__version__}"
    # rebuilt from its config (as a saved folder is loaded): its variables' paths lack the model's name
    with variables_to_be_loaded():
        rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert load_weights(rebuilt, path) == set(datasets(path))
    assert_bit_identical(values(rebuilt), values(model))


def test_saved_datasets_are_aligned_and_keras_reads_them(tmp_path):
    model = small_model()
    path = tmp_path / "m.weights.h5"
    assert save_weights(model, path) == {"float16": 0, "float32": 6}
    assert sorted(os.listdir(tmp_path)) == ["m.weights.h5"]  # Keras' intermediate file is gone
    entries = datasets(path)
    assert len(entries) == 6
    for name, (dtype, _, offset) in entries.items():
        assert dtype == np.float32 and offset is not None and offset % ALIGNMENT == 0, (name, offset)
    # the same groups and names as Keras' own file
    model.save_weights(str(tmp_path / "keras.weights.h5"))
    assert {k: v[:2] for k, v in datasets(tmp_path / "keras.weights.h5").items()} == {
        k: v[:2] for k, v in entries.items()}
    assert_bit_identical(values(keras_loaded(path)), values(model))  # plain Keras reads our file


def test_strict_load_is_bit_identical_to_keras_and_maps_the_file(tmp_path):
    model = small_model()
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)
    ours = small_model(seed=2)
    load_weights_strict(ours, path)
    assert_bit_identical(values(ours), values(keras_loaded(path)))
    assert_bit_identical(values(ours), values(model))
    # the aligned datasets are views of the mapped file (no copy), which is what makes the load fast
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    with h5py.File(path, "r") as f:
        view = dataset_view(mapped, f["layers/dense/vars/0"])
    assert np.shares_memory(view, mapped) and view.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(view, values(model)[0])


def test_a_keras_written_file_loads_identically_through_the_fast_path(tmp_path):
    """Keras' own file (datasets at unaligned offsets): copied aligned, same bits."""
    model = small_model()
    path = tmp_path / "keras.weights.h5"
    model.save_weights(str(path))
    offsets = [offset for _, _, offset in datasets(path).values()]
    assert any(offset % ALIGNMENT for offset in offsets), "Keras' file happens to be aligned: test means nothing"
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    with h5py.File(path, "r") as f:
        for name in datasets(path):
            view = dataset_view(mapped, f[name])
            assert view.ctypes.data % ALIGNMENT == 0  # an unaligned dataset is copied, never handed over as is
            np.testing.assert_array_equal(view, f[name][()])
    ours = small_model(seed=2)
    load_weights_strict(ours, path)
    assert_bit_identical(values(ours), values(keras_loaded(path)))


def test_float16_where_exact_halves_exact_tensors_and_loads_bit_identical(tmp_path):
    model = small_model()
    kernel = model.get_layer("d1").kernel
    kernel.assign(kernel.numpy().astype(np.float16).astype(np.float32))  # exact in float16
    inexact = model.get_layer("d2").kernel.numpy()
    assert not np.array_equal(inexact.astype(np.float16).astype(np.float32), inexact)
    path = tmp_path / "m.weights.h5"
    # float16: d1 kernel, d1 bias (zeros), ln gamma (ones), ln beta, d2 bias; float32: d2 kernel
    assert save_weights(model, path, float16_where_exact=True) == {"float16": 5, "float32": 1}
    entries = datasets(path)
    assert entries["layers/dense_1/vars/0"][0] == np.float32
    assert {name for name, (dtype, _, _) in entries.items() if dtype == np.float16} == set(entries) - {
        "layers/dense_1/vars/0"}
    assert all(offset % ALIGNMENT == 0 for _, _, offset in entries.values())
    ours = small_model(seed=2)
    load_weights_strict(ours, path)
    assert all(v.dtype == "float32" for v in ours.weights)
    assert_bit_identical(values(ours), values(model))
    assert_bit_identical(values(ours), values(keras_loaded(path)))


def test_a_real_backbone_round_trips_through_an_uninitialised_strict_load(tiny_clipcap, tmp_path):
    """The tiny ClipCap's backbone (GPT-2 and mapper: every custom layer's own variables) as `load_preset_model`
    rebuilds it: created uninitialised, loaded through the index: every weight bit-identical."""
    backbone = tiny_clipcap.backbone
    path = tmp_path / "model.weights.h5"
    save_weights(backbone, path)
    with variables_to_be_loaded():
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(backbone))
    assert load_weights(clone, path) == set(datasets(path))  # through the index, every tensor
    assert [v.path for v in clone.weights] == [v.path for v in backbone.weights]
    assert_bit_identical(values(clone), values(backbone))


def test_loaded_values_survive_the_file_being_replaced(tmp_path):
    """The library replaces a saved model by renaming a new file / folder over it (never writes in place):
    a model already loaded (mapped from the old file) keeps its values."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.weights.h5"
    original = small_model()
    save_weights(original, path)
    ours = small_model(seed=2)
    load_weights(ours, path)
    other = small_model(seed=3)
    save_weights(other, tmp_path / "new.weights.h5")
    os.replace(tmp_path / "new.weights.h5", path)  # a new file renamed over the mapped one
    assert_bit_identical(values(ours), values(original))
    again = small_model(seed=4)
    load_weights(again, path)  # the new file's values for a new load
    assert_bit_identical(values(again), values(other))
    # a folder replaced by `replace_dir` (the old one renamed aside and deleted, as `ClipCap.save` does)
    replace_dir(folder, lambda staging: save_weights(small_model(seed=5), staging / "m.weights.h5"),
                is_ours=lambda _: True)
    assert_bit_identical(values(again), values(other))
    assert_bit_identical(values(ours), values(original))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_variables_are_the_mapped_file_itself(tmp_path):
    """The point of the fast path: after a load, the variables' buffers lie inside a memory map of the file
    (no copy made); a later assignment gives a variable its own buffer. Fails if the load silently copies."""
    path = tmp_path / "m.weights.h5"
    save_weights(small_model(), path)
    model = small_model(seed=2)
    load_weights_strict(model, path)
    ranges = file_mappings(path)
    assert ranges, "the weights file is not mapped"
    inside = [any(lo <= buffer_address(v) < hi for lo, hi in ranges) for v in model.weights]
    assert all(inside), inside
    kernel = model.get_layer("d1").kernel
    kernel.assign(np.zeros((5, 7), np.float32))
    assert not any(lo <= buffer_address(kernel) < hi for lo, hi in ranges)


def test_writing_a_loaded_variable_never_writes_the_file(tmp_path):
    """Copy-on-write: assigning (or updating in place, as an optimizer does) a loaded variable changes
    neither the file nor another model loaded from it."""
    model = small_model()
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)  # float32: loaded as views of the map (float16 tensors are cast: copies)
    digest, mtime = sha256(path), os.stat(path).st_mtime_ns
    a, b = small_model(seed=2), small_model(seed=3)
    load_weights_strict(a, path)
    load_weights_strict(b, path)
    for v in a.weights:
        v.assign_add(np.ones(v.shape, np.float32))
        v.assign(v * 3.0)
    a.get_layer("d1").kernel.assign(np.zeros((5, 7), np.float32))
    assert np.all(a.get_layer("d1").kernel.numpy() == 0)
    assert sha256(path) == digest and os.stat(path).st_mtime_ns == mtime
    assert_bit_identical(values(b), values(model))
    c = small_model(seed=4)
    load_weights_strict(c, path)
    assert_bit_identical(values(c), values(model))
    # whatever writes straight into a mapped buffer (TensorFlow copies before its in-place updates today)
    # changes this process's private copy of the page, never the file nor another load's values
    bias = c.get_layer("d1").bias
    ctypes.memset(buffer_address(bias), 0x7F, 7 * 4)
    assert bias.numpy().tobytes() == np.full(7, 0x7F7F7F7F, np.uint32).tobytes()  # the write happened here
    assert sha256(path) == digest
    assert_bit_identical(values(b), values(model))


def _edited_copy(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


def _add_extra_layer(f):
    f.create_group("layers/extra/vars")["0"] = np.zeros(3, np.float32)


def _reshape(f):
    del f["layers/dense/vars/1"]
    f["layers/dense/vars/1"] = np.zeros(6, np.float32)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("layers/dense/vars/1"), r"'d1' expected 2 variables, but received 1"),
    (lambda f: f["layers/dense/vars"].__setitem__("2", np.zeros(7, np.float32)),
     r"'d1' expected 2 variables, but received 3"),
    (_add_extra_layer, r"1 tensor\(s\) the model has no weight for: layers/extra/vars/0"),
    (_reshape, r"shape.*\(7,\).*\(6,\).*d1/bias"),
], ids=["missing", "extra_in_a_layer", "extra_layer", "mis_shaped"])
def test_mismatched_files_are_refused_naming_what_differs(edit, message, tmp_path):
    path = tmp_path / "m.weights.h5"
    save_weights(small_model(), path)
    bad = _edited_copy(path, tmp_path / "bad.weights.h5", edit)
    with pytest.raises(ValueError, match=message):
        load_weights_strict(small_model(seed=2), bad)


def test_an_unexpected_tensor_is_named(tmp_path):
    path = tmp_path / "m.weights.h5"
    save_weights(small_model(), path)
    bad = _edited_copy(path, tmp_path / "bad.weights.h5", _add_extra_layer)
    with pytest.raises(ValueError, match="layers/extra"):
        load_weights_strict(small_model(seed=2), bad)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_raises_instead_of_crashing(fraction, tmp_path):
    path = tmp_path / "m.weights.h5"
    save_weights(small_model(), path)
    data = path.read_bytes()
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises((OSError, ValueError)):
        load_weights_strict(small_model(seed=2), bad)


class CountingNormal(keras.initializers.RandomNormal):
    """A random initializer that counts its draws (`variables_to_be_loaded` must skip them)."""

    calls = 0

    def __call__(self, shape, dtype=None):
        type(self).calls += 1
        return super().__call__(shape, dtype)


def test_variables_to_be_loaded_skips_random_draws_keeps_constants_and_restores_keras():
    random_classes = (keras.initializers.RandomNormal, keras.initializers.RandomUniform,
                      keras.initializers.TruncatedNormal, keras.initializers.VarianceScaling,
                      keras.initializers.Orthogonal)
    originals = [cls.__call__ for cls in random_classes]
    CountingNormal.calls = 0
    with variables_to_be_loaded():
        assert all(cls.__call__ is not original for cls, original in zip(random_classes, originals, strict=True))
        assert keras.initializers.GlorotUniform.__call__ is keras.initializers.VarianceScaling.__call__
        layer = keras.layers.Dense(4, kernel_initializer=CountingNormal(), bias_initializer="ones")
        layer.build((None, 3))
        glorot = keras.layers.Dense(5)  # Keras' default: GlorotUniform
        glorot.build((None, 3))
        norm = keras.layers.LayerNormalization()
        norm.build((None, 4))
    assert CountingNormal.calls == 1  # its own __call__ ran; the draw it asked of RandomNormal did not
    assert layer.kernel.shape == (3, 4) and glorot.kernel.shape == (3, 5)
    np.testing.assert_array_equal(layer.bias.numpy(), np.ones(4, np.float32))
    np.testing.assert_array_equal(norm.gamma.numpy(), np.ones(4, np.float32))
    np.testing.assert_array_equal(norm.beta.numpy(), np.zeros(4, np.float32))
    assert [cls.__call__ for cls in random_classes] == originals
    # outside, random initializers draw again (and equally for the same seed)
    a = keras.initializers.RandomNormal(seed=3)((3, 4))
    np.testing.assert_array_equal(a, keras.initializers.RandomNormal(seed=3)((3, 4)))
    assert float(np.std(a)) > 0


def test_variables_to_be_loaded_restores_keras_after_an_exception():
    original = keras.initializers.RandomNormal.__call__
    with pytest.raises(RuntimeError, match="boom"), variables_to_be_loaded():
        raise RuntimeError("boom")
    assert keras.initializers.RandomNormal.__call__ is original


def test_the_index_pairs_variables_like_keras_and_a_wrong_index_falls_back_to_keras_walk(tmp_path):
    """The index written by save_weights names, for each variable (path#occurrence), a dataset Keras wrote its
    bytes to (tensors of identical bytes, here a zero bias and beta, are interchangeable); the load through
    it equals Keras' load. An index that does not describe the model (another model's file) is not used:
    Keras' own load pairs the tensors (and its errors apply)."""
    model = small_model()
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)
    with h5py.File(path, "r") as f:
        index = json.loads(bytes(f[weights_io.INDEX_DATASET][()]).decode())
    assert index.pop("#root") == model.name
    # d1's bias and the LayerNorm's beta: zeros of one shape (d2's bias has another)
    assert sorted(map(sorted, index.pop("#alike"))) == [["layers/dense/vars/1", "layers/layer_normalization/vars/1"]]
    assert sorted(index) == sorted(weights_io.variable_keys(model.weights))
    assert sorted(index.values()) == sorted(datasets(path))  # one tensor each, every tensor named
    loaded, reference = small_model(seed=5), small_model(seed=6)
    assert weights_io.load_weights(loaded, path) == set(index.values())  # through the index
    reference.load_weights(str(path))
    for a, b in zip(loaded.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with h5py.File(path, "a") as f:  # an index naming other variables: ignored, Keras pairs them
        del f[weights_io.INDEX_DATASET]
        data = json.dumps({f"other/{k}": v for k, v in index.items()}).encode()
        f.create_dataset(weights_io.INDEX_DATASET, data=np.frombuffer(data, np.uint8))
    walked = small_model(seed=7)
    load_weights_strict(walked, path)
    for a, b in zip(walked.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _tower(prefix, functional=False):
    """Dense -> LayerNorm, as a Sequential or a functional model (Keras names their groups by class)."""
    layers = [keras.layers.Dense(4, name=f"{prefix}_dense"), keras.layers.LayerNormalization(name=f"{prefix}_ln")]
    if not functional:
        return keras.Sequential([keras.Input((4,)), *layers], name=prefix)
    inputs = keras.Input((4,))
    return keras.Model(inputs, layers[1](layers[0](inputs)), name=prefix)


def test_a_part_takes_its_own_tensors_of_identical_bytes(tmp_path):
    """Two towers whose LayerNorms (ones, zeros) and zero biases hold identical bytes: the index may pair a
    variable of one tower with the other's tensor (same bytes); a part loaded alone takes its own tensors."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    # the Sequential's weights come first, its group ("layers/sequential") sorts after the other's
    second, first = _tower("second"), _tower("first", functional=True)
    model = keras.Model(inputs, [second(inputs), first(inputs)], name="towers")
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)
    with h5py.File(path, "r") as f:
        index = json.loads(bytes(f[weights_io.INDEX_DATASET][()]).decode())
    assert any(k.startswith("second/") and v.startswith("layers/functional/") for k, v in index.items()
               if not k.startswith("#")), index  # a crossing, else this test means nothing
    alone = _tower("second")
    in_second = lambda name: name.startswith("layers/sequential/")  # noqa: E731
    used = weights_io.load_weights_part(alone, path, in_second)
    assert used == {name for name in datasets(path) if in_second(name)}
    assert_bit_identical(values(alone), values(second))
    with pytest.raises(ValueError, match="does not describe this part"):  # another model's part
        weights_io.load_weights_part(_tower("third"), path, in_second)


_FULL_DISK_CHILD = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
import keras
from utils.weights_io import save_weights

model = keras.Sequential([keras.Input((300,)), keras.layers.Dense(300), keras.layers.Dense(300)])
out = {}
for case, path in (("full", sys.argv[2]), ("limit", sys.argv[3])):
    if case == "limit":  # the file-size limit is hit half-way, as a disk filling up while writing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        save_weights(model, path)
        out[case] = None
    except BaseException as e:
        out[case] = [type(e).__name__, getattr(e, "errno", None), str(e)]
print("RESULT" + json.dumps(out))
"""


def test_a_weights_file_that_cannot_be_written_gets_a_clear_os_error(tmp_path):
    """A full disk (``/dev/full``: every write fails with ENOSPC) and a limit reached half-way (RLIMIT_FSIZE:
    EFBIG, where closing the half-written file fails again with HDF5's "Can't decrement id ref count", which
    used to be the whole message): an OSError with the error number, naming the file and the cause. Run in a
    child process (the file-size limit would stay for the session)."""
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    full = tmp_path / "full.weights.h5"
    os.symlink("/dev/full", full)
    limit = tmp_path / "limit.weights.h5"
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(ROOT), str(full), str(limit)],
                            capture_output=True, text=True, timeout=300)
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT")]
    assert line, result.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    kind, code, message = out["full"]
    assert (kind, code) == ("OSError", 28) and message.startswith(f"[Errno 28] cannot write the weights file {full}: "
                                                                   "no space left on device"), message
    assert "\n" not in message
    kind, code, message = out["limit"]
    assert (kind, code) == ("OSError", 27) and str(limit) in message and "Can't decrement" not in message, message


# ------------------------------------------------------------------ saving without hashing; files of earlier releases

DATA = os.path.join(ROOT, "unitest", "data", "weights_io")


def _towers(seed=0):
    """The two towers of `test_a_part_takes_its_own_tensors_of_identical_bytes` (LayerNorm ones / zeros and
    zero biases in both: identical tensors across the parts) as one model."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    second, first = _tower("second"), _tower("first", functional=True)
    return keras.Model(inputs, [second(inputs), first(inputs)], name="towers"), second


@pytest.mark.parametrize("name", ["towers_c0b8577.weights.h5", "towers_c0b8577_float16.weights.h5"])
def test_files_written_by_the_hashing_release_still_load_through_their_index(name):
    """Files written by c0b8577's `save_weights` (Keras' file copied aligned, paired by SHA-256; made with
    that revision's ``utils/weights_io.py`` from `_towers` (seed 0), plain and ``float16_where_exact``) load
    through their index, whole and by part, bit-identical to Keras' own load of the same file."""
    path = os.path.join(DATA, name)
    model, _ = _towers(seed=3)
    assert load_weights(model, path) == set(datasets(path))  # the index, not Keras' walk
    reference, reference_second = _towers(seed=4)
    reference.load_weights(path)
    assert_bit_identical(values(model), values(reference))
    alone = _tower("second")
    in_second = lambda dataset: dataset.startswith("layers/sequential/")  # noqa: E731
    assert weights_io.load_weights_part(alone, path, in_second) == {d for d in datasets(path) if in_second(d)}
    assert_bit_identical(values(alone), values(reference_second))


def _sha256_index(model, path):
    """The variable index as c0b8577 computed it (the reference of the format): datasets and variables paired
    by the SHA-256 of their bytes (and shape), datasets of identical bytes taken in name order."""
    def digest(array):
        array = np.ascontiguousarray(array)
        return array.shape, hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest()

    with h5py.File(path, "r") as f:
        stored = {name: digest(f[name][()]) for name in datasets(path)}
    by_content = {}
    for name in sorted(stored):
        by_content.setdefault(stored[name], []).append(name)
    alike = [list(names) for names in by_content.values() if len(names) > 1]
    index = {key: by_content[digest(v.numpy())].pop(0)
             for key, v in zip(weights_io.variable_keys(model.weights), model.weights, strict=True)}
    return {**index, "#root": model.name, "#alike": alike}


def test_saving_pairs_by_bytes_without_hashing_and_writes_the_hashing_release_index(tmp_path, monkeypatch):
    """`save_weights` compares bytes (a sample first, then the whole tensor) instead of hashing every tensor
    twice with SHA-256 (3x Keras' save time for a 100M-parameter model): no ``hashlib.sha256`` call. Its
    index is the one the SHA-256 pairing wrote (the same pairs, the same groups of identical tensors)."""
    model, _ = _towers()
    path = tmp_path / "m.weights.h5"

    def no_hashing(*args, **kwargs):
        raise AssertionError("save_weights hashed a tensor")

    with monkeypatch.context() as patched:
        patched.setattr(hashlib, "sha256", no_hashing)
        save_weights(model, path)
    with h5py.File(path, "r") as f:
        index = json.loads(bytes(f[weights_io.INDEX_DATASET][()]).decode())
    assert index == _sha256_index(model, path)


def test_tensors_that_differ_only_between_sampled_elements_are_told_apart(tmp_path):
    """Two kernels equal at every sampled element (one element in 64) but one, and a third equal to the first:
    each variable is paired with a dataset of exactly its bytes (the sample only narrows the candidates), the
    equal ones recorded as interchangeable; the load equals Keras'."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), *(keras.layers.Dense(64, use_bias=False, name=f"d{i}")
                                                    for i in range(3))])
    base = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    other = base.copy()
    other.reshape(-1)[1] += 1.0  # not a sampled element (every 64th)
    for layer, kernel in zip(model.layers, (base, other, base), strict=True):
        layer.kernel.assign(kernel)
    assert weights_io._sample_key(base) == weights_io._sample_key(other)
    path = tmp_path / "m.weights.h5"
    save_weights(model, path)
    with h5py.File(path, "r") as f:
        index = json.loads(bytes(f[weights_io.INDEX_DATASET][()]).decode())
    assert index == _sha256_index(model, path)
    assert len(index["#alike"]) == 1 and len(index["#alike"][0]) == 2
    loaded = keras.Sequential([keras.Input((64,)), *(keras.layers.Dense(64, use_bias=False, name=f"d{i}")
                                                     for i in range(3))])
    assert load_weights(loaded, path) == set(datasets(path))
    assert_bit_identical(values(loaded), [base, other, base])
