"""The torch-free checkpoint reader (`utils.convert.torch_file`) against torch itself, and its refusals.

Every kind of file the project reads is written here with torch (the reference, in tests only) and read back
bit-identically: zip and legacy state dicts (fp32, fp16, bf16, int64, bool, shared storages, transposed and
sliced views, non-zero offsets, ``nn.Parameter``), TorchScript CLIP archives (a traced ViT in fp16 and a
traced ResNet in fp32, as OpenAI ships them) and a scripted module with buffers, a non-persistent buffer, a
plain tensor attribute and a None parameter. A file that names any other global, or a TorchScript module
that sets its own state with code, is refused and nothing of it runs.
"""

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from testing.clip_reference import TINY_CONFIGS, random_clip_state_dict, reference_model
from utils.convert import torch_file
from utils.convert.common import CheckpointError, load_torch_state_dict
from utils.convert.openai_clip import load_openai_clip, load_openai_state_dict
from utils.convert.torch_file import TensorRecord, load_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _mixed_state_dict():
    """Every dtype the converters meet, and every way tensors share and view storages."""
    torch.manual_seed(0)
    base = torch.randn(6, 10)
    flat = torch.arange(40, dtype=torch.float32)
    return {
        "fp32": base,
        "transposed": base.t(),  # the same storage, strided
        "sliced": base[1:4, 2:9:3],  # offset and strides
        "offset_view": flat[17:29].view(3, 4),  # non-zero storage offset, contiguous
        "flat": flat,
        "fp16": torch.randn(3, 4).half(),
        "bf16": torch.randn(5, 2).bfloat16(),
        "int64": torch.arange(7) * 3 - 5,
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
    }


class _Scripted(torch.nn.Module):
    """Parameters, a None bias, persistent and non-persistent buffers, a plain tensor attribute, an int."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2, bias=False)
        self.norm = torch.nn.BatchNorm1d(2)
        self.register_buffer("persistent", torch.arange(4))
        self.register_buffer("non_persistent", torch.ones(3), persistent=False)
        self.mask = torch.full((2, 2), -1.0)  # an attribute, not in state_dict()
        self.count = 5

    def forward(self, x):
        return self.norm(self.linear(x)) + self.non_persistent.sum() + self.mask.sum() + self.count


class _Evil(torch.nn.Module):
    """The issue's module: its ``__setstate__`` writes 6 bytes to the file named in its state."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.written = torch.zeros(6, dtype=torch.uint8)

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.path = state[0]
        self.weight = state[1]
        self.training = state[2]
        t = torch.from_file(self.path, True, 6, dtype=torch.uint8)
        self.written = t.fill_(80)


class _EvilInside(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.inner = _Evil(path)

    def forward(self, x):
        return self.inner(self.proj(x))


def _trace_clip(config_name, seed, half):
    from clip import tokenize

    reference = reference_model(random_clip_state_dict(TINY_CONFIGS[config_name], seed=seed))
    n_px = TINY_CONFIGS[config_name]["image_resolution"]
    with warnings.catch_warnings():  # tracer and torch.jit deprecation warnings
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(reference, (torch.randn(1, 3, n_px, n_px), tokenize(["a photo"])),
                                 check_trace=False)
    return traced.half() if half else traced


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("torch_files")
    paths = {"zip": directory / "zip.pt", "legacy": directory / "legacy.pt"}
    torch.save(_mixed_state_dict(), paths["zip"])
    torch.save(_mixed_state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, module in (("jit_vit_fp16", _trace_clip("tiny-ViT", 3, half=True)),
                             ("jit_resnet_fp32", _trace_clip("tiny-RN", 4, half=False)),
                             ("scripted", torch.jit.script(_Scripted()))):
            paths[name] = directory / f"{name}.pt"
            torch.jit.save(module, str(paths[name]))
    return paths


def _torch_reference(kind, path):
    if kind.startswith(("jit", "scripted")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path)).state_dict()
    return torch.load(path, weights_only=True)


def _as_numpy(tensor):
    """torch's tensor as the reader returns it: a contiguous array, bfloat16 widened to float32."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


def _assert_bit_identical(ours, reference):
    assert list(ours) == list(reference)  # the same keys, in torch's order
    for key, tensor in reference.items():
        expected = _as_numpy(tensor)
        got = ours[key]
        assert isinstance(got, np.ndarray) and got.flags.writeable, key
        assert got.dtype == expected.dtype and got.shape == expected.shape, (key, got.dtype, got.shape)
        assert got.tobytes() == expected.tobytes(), key


@pytest.mark.parametrize("kind", ["zip", "legacy", "jit_vit_fp16", "jit_resnet_fp32", "scripted"])
def test_bit_identical_to_torch(files, kind):
    _assert_bit_identical(load_state_dict(files[kind]), _torch_reference(kind, files[kind]))


def test_torchscript_names_are_the_state_dicts(files):
    keys = set(load_state_dict(files["scripted"]))
    assert {"persistent", "non_persistent", "linear.weight", "norm.running_mean"} <= keys
    assert "mask" not in keys and "linear.bias" not in keys and "count" not in keys
    clip_keys = set(load_openai_state_dict(files["jit_vit_fp16"]))
    assert {"visual.conv1.weight", "logit_scale", "token_embedding.weight"} <= clip_keys
    assert not any(k.endswith("attn_mask") for k in clip_keys)  # a plain attribute of OpenAI's blocks


def test_shared_storage_is_read_once_and_views_are_independent(files):
    ours = load_state_dict(files["zip"])
    np.testing.assert_array_equal(ours["transposed"], ours["fp32"].T)
    ours["fp32"][0, 0] = 123.0  # copies: writing one does not change the other
    assert ours["transposed"][0, 0] != 123.0


@pytest.mark.parametrize("kind", ["zip", "legacy", "jit_resnet_fp32"])
def test_shapes_only_reads_no_tensor_bytes(files, kind):
    records = load_torch_state_dict(files[kind], shapes_only=True)
    full = load_state_dict(files[kind])
    assert all(isinstance(r, TensorRecord) for r in records.values())
    assert {k: (r.shape, r.dtype) for k, r in records.items()} == {k: (a.shape, a.dtype) for k, a in full.items()}


def test_shapes_only_records_say_their_bytes_were_not_read(files):
    record = next(iter(load_torch_state_dict(files["zip"], shapes_only=True).values()))
    with pytest.raises(CheckpointError, match="shapes_only"):
        record.numpy()


def test_a_flipped_byte_fails_the_crc(files, tmp_path):
    """A corrupt download whose sizes are intact: the zip's CRC names the record."""
    with zipfile.ZipFile(files["zip"]) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 16)
    data = bytearray(files["zip"].read_bytes())
    name_length, extra_length = np.frombuffer(data[info.header_offset + 26:info.header_offset + 30], "<u2")
    position = info.header_offset + 30 + int(name_length) + int(extra_length) + 8  # in the local header's data
    data[position] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"record {info.filename} fails its CRC check"):
        load_torch_state_dict(path)


def test_clip_archives_convert_as_before(files):
    """The converted ResNet equals the one converted from torch's own reading of the archive."""
    from utils.convert.openai_clip import clip_from_state_dict

    ours = load_openai_clip(files["jit_resnet_fp32"])
    theirs = clip_from_state_dict(_torch_reference("jit", files["jit_resnet_fp32"]))
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ----------------------------------------------------------------------- refusals: nothing runs


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _replace_record(source, target, suffix, data, compress=zipfile.ZIP_STORED):
    """A copy of zip ``source`` whose record ending in ``suffix`` holds ``data``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data if info.filename.endswith(suffix) else src.read(info),
                         compress_type=compress if info.filename.endswith(suffix) else zipfile.ZIP_STORED)
    return target


@pytest.mark.parametrize("func, protocol, expected", [(os.system, 2, "posix.system"), (eval, 4, "builtins.eval"),
                                                      (eval, 2, "__builtin__.eval"), (exec, 4, "builtins.exec")])
@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_other_globals_are_refused_by_name(files, tmp_path, func, protocol, expected, form):
    marker = tmp_path / "marker"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
    payload = pickle.dumps({"weight": _Payload(func, command)}, protocol=protocol)
    if form == "zip":
        path = _replace_record(files["zip"], tmp_path / "evil.pt", "/data.pkl", payload)
    else:
        path = tmp_path / "evil.pt"
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        load_torch_state_dict(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_openai_clip(path)
    assert not marker.exists()


@pytest.mark.parametrize("module", [_Evil, _EvilInside])
def test_torchscript_setstate_never_runs(tmp_path, module, monkeypatch, tiny_files, capsys):
    """The issue's archive: reading it through every entry point creates no file and changes none."""
    import main
    from models.siamese.clip import CLIP

    created, existing = tmp_path / "created", tmp_path / "existing"
    existing.write_bytes(b"keep me intact")
    paths = {}
    for target in (created, existing):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths[target] = tmp_path / f"evil-{target.name}.pt"
            torch.jit.save(torch.jit.script(module(str(target))), str(paths[target]))
    assert not created.exists() and existing.read_bytes() == b"keep me intact"  # saving ran nothing
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))

    def convert_cli(evil):
        code = main.main(["convert", str(tiny_files["checkpoint"]), "--clip", str(evil), "--tokenizer",
                          str(tiny_files["tokenizer"]), "--name", "evil"])
        err = capsys.readouterr().err
        if code != 3:
            return f"exit {code}"
        raise CheckpointError(err)

    for evil in paths.values():
        for read in (load_openai_state_dict, load_openai_clip, CLIP.from_pretrained, convert_cli):
            try:
                outcome = read(evil)
            except CheckpointError as e:
                outcome = str(e)
            assert not created.exists(), f"{read.__name__} created {created}"
            assert existing.read_bytes() == b"keep me intact", f"{read.__name__} overwrote {existing}"
            assert "sets its state with code" in str(outcome), (read.__name__, str(outcome)[:300])


# ----------------------------------------------------------------------- bad files: clear errors


def test_storage_record_shorter_than_its_tensor(files, tmp_path):
    with zipfile.ZipFile(files["zip"]) as archive:
        name = next(n for n in archive.namelist() if "/data/" in n)
        short = archive.read(name)[:-4]
    path = _replace_record(files["zip"], tmp_path / "short.pt", name, short)
    with pytest.raises(CheckpointError, match=f"record {name} holds {len(short)} bytes"):
        load_torch_state_dict(path)
    with pytest.raises(CheckpointError, match=f"record {name} holds"):
        load_torch_state_dict(path, shapes_only=True)


class _FakeStorage:
    def __init__(self, numel):
        self.numel = numel


class _FakeTensor:
    """Pickles as torch pickles a tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _FakeStorage) else None


def _crafted_checkpoint(path, tensor, record, compress=zipfile.ZIP_STORED):
    """A zip checkpoint ``{"w": tensor}`` (a `_FakeTensor`) whose storage record ``0`` holds ``record``."""
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"w": tensor})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", record, compress_type=compress)
        archive.writestr("archive/version", "3\n")
    return path


def test_crafted_checkpoint_reads(tmp_path):
    path = _crafted_checkpoint(tmp_path / "ok.pt", _FakeTensor(_FakeStorage(6), 1, (2, 2), (1, 2)),
                               np.arange(6, dtype="<f4").tobytes())
    np.testing.assert_array_equal(load_state_dict(path)["w"], [[1, 3], [2, 4]])
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["w"].numpy(), [[1, 3], [2, 4]])


def test_compressed_record_claiming_too_much_is_refused(tmp_path):
    """A deflated record of 1 GiB of zeros (1 MiB stored) for a tensor that declares it: refused from the
    sizes in the zip's directory, nothing inflated."""
    numel = 2**28
    path = _crafted_checkpoint(tmp_path / "bomb.pt", _FakeTensor(_FakeStorage(numel), 0, (numel,), (1,)),
                               bytes(4 * numel), compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 4 * 1024 * 1024
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_torch_state_dict(path)


def test_expanded_tensor_too_large_to_copy(tmp_path):
    """A stride-0 view of 2**40 elements over one float: refused before anything is allocated."""
    path = _crafted_checkpoint(tmp_path / "expanded.pt", _FakeTensor(_FakeStorage(1), 0, (2**20, 2**20), (0, 0)),
                               np.ones(1, "<f4").tobytes())
    with pytest.raises(CheckpointError, match="expands storage"):
        load_torch_state_dict(path)


def test_legacy_length_field_beyond_the_file(tmp_path):
    """A legacy file whose first pickle claims 4 GiB of bytes: an error, not a 4 GiB read."""
    path = tmp_path / "claims.pt"
    path.write_bytes(b"\x80\x02B" + (2**32 - 1).to_bytes(4, "little") + b"tiny")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torch_state_dict(path)


def test_deep_nesting_is_an_error(tmp_path):
    path = tmp_path / "deep.pt"
    path.write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")  # [[[...]]] 100,000 deep
    with pytest.raises(CheckpointError, match="nested too deeply|not a state dict|magic"):
        load_torch_state_dict(path)
    with zipfile.ZipFile(tmp_path / "deep_zip.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_torch_state_dict(tmp_path / "deep_zip.pt")


@pytest.mark.parametrize("offset, size, stride", [(0, (3, 3), (3, 1)), (5, (2,), (1,)), (0, (2, 2), (1, -1))])
def test_tensor_past_its_storage(tmp_path, offset, size, stride):
    path = _crafted_checkpoint(tmp_path / "past.pt", _FakeTensor(_FakeStorage(6), offset, size, stride),
                               np.arange(6, dtype="<f4").tobytes())
    with pytest.raises(CheckpointError, match="reaches past storage|negative"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("kind", ["zip", "legacy", "jit_vit_fp16"])
def test_truncated(files, tmp_path, kind):
    data = files[kind].read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        path = tmp_path / f"cut-{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_torch_state_dict(path)


def test_missing_empty_fifo_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_state_dict(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_torch_state_dict(tmp_path / "empty.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_torch_state_dict(tmp_path / "fifo.pt")
    (tmp_path / "page.pt").write_bytes(b"<html>404</html>" * 20)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_torch_state_dict(tmp_path / "page.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(tmp_path / "other.zip")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_torch_state_dict(tmp_path / "list.pt")


def test_big_endian_archive(files, tmp_path):
    """``byteorder: big``: the storages are read big-endian (torch writes them so on such machines)."""
    itemsize = {r.storage.key: r.storage.storage_type.itemsize
                for r in load_state_dict(files["zip"], shapes_only=True).values()}
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(files["zip"]) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                size = itemsize[info.filename.rsplit("/", 1)[1]]
                data = np.frombuffer(data, np.uint8).reshape(-1, size)[:, ::-1].tobytes()
            dst.writestr(info.filename, data)
    _assert_bit_identical(load_state_dict(path), torch.load(files["zip"], weights_only=True))


# ----------------------------------------------------------------------- no torch at all


def test_converters_work_with_torch_unimportable(files, tiny_files, tmp_path):
    """convert (ClipCap + a TorchScript CLIP) and every reader, in a process where ``import torch`` fails."""
    out_dir = tmp_path / "converted"
    script = (
        "import sys, json; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import numpy as np\n"
        "from utils.convert.torch_file import load_state_dict\n"
        "from models.image_captioning.clip_cap import ClipCap\n"
        "from models.image_captioning.pretrained import convert_model\n"
        "import hashlib\n"
        f"sums = {{k: {{n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in load_state_dict(p).items()}}\n"
        f"        for k, p in {({k: str(v) for k, v in files.items()})!r}.items()}}\n"
        f"convert_model(ClipCap, {str(tiny_files['checkpoint'])!r}, {str(files['jit_vit_fp16'])!r},\n"
        f"              {str(tiny_files['tokenizer'])!r}, {str(out_dir)!r}, name='no_torch')\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps(sums))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sums = json.loads(result.stdout.strip().splitlines()[-1])
    for kind, path in files.items():
        reference = _torch_reference(kind, path)
        expected = {n: hashlib.sha256(_as_numpy(t).tobytes()).hexdigest() for n, t in reference.items()}
        assert sums[kind] == expected, kind
    assert (out_dir / "config.json").is_file()


def test_a_crafted_file_cannot_change_how_later_files_are_read(files, tmp_path):
    """A pickle BUILD on an allowed global (a storage type, a rebuild function) changes only that file's copy:
    the next checkpoint in the same process reads as before."""
    from utils.convert import torch_file

    payload = (b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00<f2sb"
               b"ctorch._utils\n_rebuild_tensor_v2\n}X\x07\x00\x00\x00changedK\x01sb\x86.")
    path = _replace_record(files["zip"], tmp_path / "crafted.pt", "/data.pkl", payload)
    expected = load_torch_state_dict(files["zip"])
    with pytest.raises(CheckpointError):
        load_torch_state_dict(path)  # not a state dict
    assert torch_file.ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == "<f4"
    assert not hasattr(torch_file.ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")], "changed")
    again = load_torch_state_dict(files["zip"])
    assert list(again) == list(expected)
    for key in expected:
        assert np.array_equal(np.asarray(again[key]), np.asarray(expected[key]), equal_nan=True)


def _zip_of(path, data_pkl, records=()):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for name, data in records:
            archive.writestr(f"archive/data/{name}", data)
    return path


def test_a_shared_container_is_built_once(tmp_path):
    """A pickle's memo lets N nested ``[x, x]`` stand for 2^N references (a 500-byte file would keep a CPU busy
    for ever at depth 60): each container is converted once and stays shared, as unpickling made it."""
    body = b"]q\x00"  # memo 0: []
    for depth in range(1, 21):  # memo d = [memo d-1, memo d-1]
        body += b"(h" + bytes([depth - 1]) + b"h" + bytes([depth - 1]) + b"lq" + bytes([depth])
    path = _zip_of(tmp_path / "nested.pt", b"\x80\x02" + body + b"0}X\x01\x00\x00\x00xh\x14s.")  # {"x": memo 20}
    obj = torch_file.read_checkpoint(path)
    assert obj["x"][0] is obj["x"][1] and obj["x"][0][0] is obj["x"][0][1]
    with pytest.raises(CheckpointError, match="entry 'x' is a str -> list"):
        load_torch_state_dict(path)  # and it is not a state dict


def test_many_tensors_over_one_storage_stop_at_the_loads_budget(tmp_path):
    """Each tensor a 128 MB stride-0 view of one float (each alone under MAX_EXPANDED_BYTES): a 1 KB file may
    not make the reader allocate 128 MB per tensor without end."""
    n = 2**25
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({f"t{i}": _FakeTensor(_FakeStorage(1), 0, (n,), (0,)) for i in range(3)})
    path = _zip_of(tmp_path / "views.pt", buffer.getvalue(), [("0", np.ones(1, "<f4").tobytes())])
    assert path.stat().st_size < 2048
    with pytest.raises(CheckpointError, match="past .*many tensors over one storage"):
        load_torch_state_dict(path)
    assert set(load_torch_state_dict(path, shapes_only=True)) == {"t0", "t1", "t2"}  # shapes cost nothing


def test_zip_entries_sharing_one_record_are_refused(tmp_path):
    """Two directory entries pointing at one stored record (each within the file's size alone): refused."""
    source = _crafted_checkpoint(tmp_path / "ok.pt", _FakeTensor(_FakeStorage(4), 0, (4,), (1,)),
                                 np.arange(4, dtype="<f4").tobytes())
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        start = archive.start_dir
    raw = source.read_bytes()
    record = next(i for i in infos if i.filename == "archive/data/0")
    central = b""
    for info in [*infos, record]:  # the record listed twice, under a second name
        name = (info.filename if info is not record or central.count(b"archive/data/0") == 0
                else "archive/data/1").encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, info.CRC, info.compress_size,
                               info.file_size, len(name), 0, 0, 0, 0, 0, info.header_offset) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(infos) + 1, len(infos) + 1, len(central), start, 0)
    path = tmp_path / "overlap.pt"
    path.write_bytes(raw[:start] + central + end)
    with pytest.raises(CheckpointError, match="overlaps the next entry"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("size, stride", [((1,), (2**70,)), ((2**62, 2**62, 0), (1, 1, 1))])
def test_sizes_and_strides_beyond_int64_are_refused(tmp_path, size, stride):
    path = _crafted_checkpoint(tmp_path / "big.pt", _FakeTensor(_FakeStorage(2), 0, size, stride),
                               np.zeros(2, "<f4").tobytes())
    with pytest.raises(CheckpointError, match="2\\*\\*62 or more"):
        load_torch_state_dict(path)


def test_a_value_that_is_not_a_tensor_is_named(tmp_path):
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"w": _FakeTensor(_FakeStorage(1), 0, (1,), (1,)), "step": 3, 7: "x"})
    path = _zip_of(tmp_path / "mixed.pt", buffer.getvalue(), [("0", np.ones(1, "<f4").tobytes())])
    with pytest.raises(CheckpointError, match="entry 'step' is a str -> int|entry '7' is a int -> str"):
        load_torch_state_dict(path)
