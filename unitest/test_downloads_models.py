"""Whole official models by name (models/image_captioning/presets.py, pretrained.py; models/siamese/presets.py)
against a local HTTP server on 127.0.0.1 (no network).

Covered: offline errors naming every missing file and its place; the names and ``download --list``;
download -> verify -> convert -> caption, then reuse; a checkpoint that cannot be converted is deleted;
``CLIP.from_pretrained`` and ``ClipCap.load`` resolving names; ``main.py download`` cut mid-file; a checkpoint
that is not the model its name promises (downloaded or placed by hand). gdown itself cannot be exercised
offline against Google Drive: the Drive-hosted official checkpoints are tested through the mirror only.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.image_captioning import presets
from models.image_captioning.clip_cap import ClipCap
from models.image_captioning.presets import ModelSpec
from models.image_captioning.pretrained import fetch_checkpoint, get_pretrained
from models.siamese import presets as siamese_presets
from models.siamese.presets import fetch_clip
from testing import tiny_models
from unitest import download_server
from unitest.download_server import cached_files, leftovers, serve_tiny, sha, torch_bytes
from utils import downloads
from utils.download_manifest import read_manifest
from utils.downloads import DownloadError, OfflineError
from utils.model_store import is_saved_model

#: the fixtures, bound here so that pytest finds them (clean_env is autouse)
server, clean_env, tiny_files = download_server.server, download_server.clean_env, download_server.tiny_files

ROOT = Path(__file__).resolve().parents[1]


def test_offline_error_names_file_and_place(server, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    with pytest.raises(OfflineError) as info:
        downloads.fetch(presets.MODELS["coco"].checkpoint, root=tmp_path, progress=False)
    message = str(info.value)
    assert "IMAGE_CAPTIONING_OFFLINE=1" in message
    assert "1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX" in message
    assert str(tmp_path / "downloads" / "coco_weights.pt") in message
    with pytest.raises(OfflineError, match="ViT-B-32.pt"):
        fetch_clip("ViT-B/32", root=tmp_path, progress=False)
    # a whole model: every missing file in one message, the tokenizer's too (with an empty HF cache)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(OfflineError) as info:
        get_pretrained(ClipCap, "coco_transformer", root=tmp_path, progress=False)
    message = str(info.value)
    for path in ("coco_transformer_weights.pt", "RN50x4.pt", "gpt2-tokenizer"):
        assert str(tmp_path / "downloads" / path) in message
    for local in ("vocab.json", "merges.txt"):  # both tokenizer files, each with its place
        assert str(tmp_path / "downloads" / "gpt2-tokenizer" / local) in message
    assert server.requests == []


def test_a_failed_offline_attempt_leaves_no_lock_files(server, tmp_path, monkeypatch):
    """`caption --model coco` offline fails with the list of missing files, and leaves the store as it was: no
    ``<store>/coco.lock``, no ``downloads/*.lock`` (each lock file is deleted by its holder on release)."""
    import huggingface_hub.constants

    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(OfflineError):
        get_pretrained(ClipCap, "coco", root=tmp_path / "store", progress=False)
    assert [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".lock")] == []



def test_names_and_listing(tmp_path):
    assert presets.resolve_model("coco_transformer").clip == "RN50x4"
    with pytest.raises(KeyError, match="known ClipCap models: coco, conceptual, coco_transformer"):
        presets.resolve_model("cocoa")
    text = "\n".join(presets.describe_sources(tmp_path))
    for needle in ("coco_weights.pt", "conceptual_weights.pt", "coco_transformer_weights.pt", "RN50x4.pt",
                   "gpt2-vocab.json", "14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", "1GYPToCqFREwi285wPLhuVExlz7DDUDfJ",
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af (pinned)",
                   "no published SHA-256: size and SHA-256 are recorded at its first download"):
        assert needle in text


# ------------------------------------------------------------------------- download -> convert -> caption


def test_download_convert_caption_then_reuse(server, tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files)
    model = get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    assert sorted(name for name, _ in server.requests) == sorted(server.files)
    assert is_saved_model(tmp_path / "tiny") and model.name == "tiny"
    captions = model.caption([str(tiny_models.DEMO_DIR / "cat.jpg")], max_length=8)
    assert isinstance(captions[0], str) and captions[0]
    # converted once: the next call loads the saved model, no download, no torch conversion
    server.requests.clear()
    again = get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    assert server.requests == []
    assert again.caption([str(tiny_models.DEMO_DIR / "cat.jpg")], max_length=8) == captions


def test_truncated_checkpoint_is_refused_at_download_and_deleted(server, tiny_files, tmp_path, monkeypatch):
    """Half a zip: its records' CRCs are checked before anything is published or recorded (the conversion
    deleting an unconvertible download is `test_an_unconvertible_download_is_deleted_and_forgotten_...`)."""
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files, corrupt_checkpoint=True)
    with pytest.raises(DownloadError, match="tiny_clipcap.pt .* is corrupt .* zip .*damaged.* it was deleted"):
        get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    assert not (tmp_path / "downloads" / "tiny_clipcap.pt").exists()
    assert "tiny_clipcap.pt" not in read_manifest(tmp_path)
    assert not (tmp_path / "tiny").exists() and not list(tmp_path.glob(".tiny.*"))


def test_an_unconvertible_download_is_deleted_and_forgotten_by_the_manifest(server, tiny_files, tmp_path,
                                                                            monkeypatch):
    """A first download that passes the download check (shapes only) but cannot be converted is deleted, and
    the SHA-256 its download recorded goes with it: the next, good download is accepted (not refused as
    "not the expected file" until someone edits manifest.json)."""
    import io

    import torch

    from utils.convert.common import CheckpointError

    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files)
    good = server.files["tiny_clipcap.pt"]
    state = torch.load(io.BytesIO(good), weights_only=True)
    del state["gpt.transformer.h.1.mlp.c_fc.bias"]  # every identity entry the same; conversion fails
    buffer = io.BytesIO()
    torch.save(state, buffer)
    server.files["tiny_clipcap.pt"] = buffer.getvalue()
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias.*was deleted, and its record in the download "
                                              r"manifest removed"):
        get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    assert not (tmp_path / "downloads" / "tiny_clipcap.pt").exists()
    assert "tiny_clipcap.pt" not in read_manifest(tmp_path)
    assert "tiny_clip.pt" not in read_manifest(tmp_path)  # pinned in code: never recorded
    server.files["tiny_clipcap.pt"] = good
    model = get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    assert model.name == "tiny" and read_manifest(tmp_path)["tiny_clipcap.pt"]["sha256"] == sha(good)


def test_names_resolve_in_clip_and_clipcap_entry_points(server, tiny_files, tmp_path, monkeypatch):
    """`CLIP.from_pretrained(<CLIP name>)` and `ClipCap.load(<official name>)` download on first use."""
    from models.siamese.clip import CLIP

    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files)
    monkeypatch.setitem(siamese_presets.CLIP_SOURCES, "tiny-clip", spec.clip)
    monkeypatch.setitem(presets.MODELS, "tiny", spec)
    clip = CLIP.from_pretrained("tiny-clip", visual_only=True)
    assert clip.embed_dim == tiny_models.EMBED_DIM
    assert (tmp_path / "home" / "downloads" / "tiny_clip.pt").is_file()
    model = ClipCap.load("tiny")  # downloaded, converted, saved in the store
    assert model.name == "tiny" and is_saved_model(tmp_path / "home" / "tiny")
    server.requests.clear()
    again = ClipCap.load("tiny")  # now simply loaded
    assert server.requests == []
    image = [str(tiny_models.DEMO_DIR / "cat.jpg")]
    assert again.caption(image, max_length=8) == model.caption(image, max_length=8)
    with pytest.raises(FileNotFoundError, match="nor an OpenAI CLIP name"):
        CLIP.from_pretrained("ViT-B/33")


def test_cli_download_cut_mid_file_exits_3_and_resumes(server, tmp_path):
    """`main.py download coco` from a mirror whose chunked response drops mid-file: exit 3, no traceback,
    the .part kept; the next run resumes it (and then refuses the tiny file, which is not the COCO model)."""
    server.files["coco_weights.pt"] = data = torch_bytes(20000)
    server.chunked, server.cut_after = True, 30000
    env = dict(os.environ, IMAGE_CAPTIONING_HOME=str(tmp_path / "home"), IMAGE_CAPTIONING_MIRROR=server.base)
    env.pop(downloads.OFFLINE_ENV, None)
    run = subprocess.run([sys.executable, "main.py", "download", "coco", "--no-convert"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr and "IncompleteRead" in run.stderr and "run again to resume" in run.stderr
    part = tmp_path / "home" / "downloads" / "coco_weights.pt.part"
    assert part.stat().st_size == 30000
    server.chunked = False
    run = subprocess.run([sys.executable, "main.py", "download", "coco", "--no-convert"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert server.requests[-1] == ("coco_weights.pt", "bytes=30000-")
    assert "not a ClipCap checkpoint" in run.stderr and "was deleted" in run.stderr
    assert not (tmp_path / "home" / "downloads" / "coco_weights.pt").exists() and not part.exists()
    assert len(data) > 30000


# ----------------------------------------------------------------------------- the checkpoint's identity


def test_official_specs_state_their_checkpoints():
    gpt2 = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}
    for name in ("coco", "conceptual"):
        assert presets.MODELS[name].expect == {"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512,
                                                 **gpt2}
    assert presets.MODELS["coco_transformer"].expect == {
        "mapping_type": "transformer", "prefix_length": 40, "clip_length": 40, "num_layers": 8, "prefix_size": 640,
        **gpt2}


TINY_MLP = {"mapping_type": "mlp", "prefix_length": tiny_models.PREFIX_LENGTH, "prefix_size": tiny_models.EMBED_DIM,
            "n_embd": tiny_models.GPT["n_embd"], "n_layer": tiny_models.GPT["n_layer"]}


def test_mirror_serving_another_checkpoint_is_refused(server, tiny_files, tmp_path, monkeypatch):
    """A mirror serves a transformer-mapper ClipCap as the MLP model's checkpoint: refused (expected vs found),
    nothing kept, nothing converted; the right file is then accepted (also without Content-Length)."""
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files)
    spec = ModelSpec("tiny", spec.checkpoint, clip=spec.clip, expect=TINY_MLP)
    wrong = tiny_models.build_tiny_clipcap(tmp_path / "wrong.pt", tiny_files["tokenizer"], kind="transformer")
    server.files["tiny_clipcap.pt"] = wrong.read_bytes()
    from utils.convert.common import CheckpointError

    with pytest.raises(CheckpointError) as info:
        get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
    message = str(info.value)
    assert "not the checkpoint of 'tiny'" in message and "expected mapping_type='mlp'" in message
    assert "found mapping_type='transformer'" in message and "was deleted" in message
    assert "tiny_clipcap.pt" not in cached_files(tmp_path) and leftovers(tmp_path) == []
    assert not (tmp_path / "tiny").exists() and "tiny_clipcap.pt" not in read_manifest(tmp_path)
    # the right checkpoint, from a server without Content-Length: identity-checked, published, recorded
    server.files["tiny_clipcap.pt"] = tiny_files["checkpoint"].read_bytes()
    server.no_length = True
    path = fetch_checkpoint(spec, root=tmp_path, progress=False)
    assert path.read_bytes() == server.files["tiny_clipcap.pt"]
    assert read_manifest(tmp_path)["tiny_clipcap.pt"]["sha256"] == sha(path.read_bytes())


def test_real_spec_refuses_a_tiny_checkpoint_as_coco(server, tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    server.files["coco_weights.pt"] = tiny_files["checkpoint"].read_bytes()
    from utils.convert.common import CheckpointError

    with pytest.raises(CheckpointError, match="expected prefix_length=10, prefix_size=512, n_embd=768, n_layer=12"):
        fetch_checkpoint("coco", root=tmp_path, progress=False)
    assert cached_files(tmp_path) == []


def test_cached_checkpoint_of_another_model_is_refused_and_kept(tiny_files, tmp_path):
    """A hand-placed file under an official name is checked too, and never deleted (it is the user's)."""
    from utils.convert.common import CheckpointError

    cached = tmp_path / "downloads" / "coco_weights.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tiny_files["checkpoint"].read_bytes())
    with pytest.raises(CheckpointError, match="not the checkpoint of 'coco'.*was kept: delete or replace it"):
        fetch_checkpoint("coco", root=tmp_path, progress=False)
    assert cached.exists()


def test_concurrent_first_uses_convert_once_and_both_get_the_model(server, tiny_files, tmp_path, monkeypatch):
    """Two first uses at once (threads here; the lock is a file lock, so processes alike): one downloads and
    converts, the other waits for it and loads its folder; without the lock the second conversion would find
    the folder taken and fail."""
    import threading

    from models.image_captioning import pretrained

    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = serve_tiny(server, tiny_files)
    conversions, started = [], threading.Event()
    convert = pretrained.convert_model

    def slow_convert(*args, **kwargs):
        conversions.append(threading.current_thread().name)
        started.set()
        threading.Event().wait(1.0)  # the other thread arrives while this one converts
        return convert(*args, **kwargs)

    monkeypatch.setattr(pretrained, "convert_model", slow_convert)
    results, errors = {}, []

    def first_use(label):
        try:
            results[label] = get_pretrained(ClipCap, spec, root=tmp_path, progress=False)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=first_use, args=(label,), name=label) for label in ("a", "b")]
    threads[0].start()
    assert started.wait(600)
    threads[1].start()
    for t in threads:
        t.join(600)
    assert errors == [] and sorted(results) == ["a", "b"]
    assert conversions == ["a"]
    assert is_saved_model(tmp_path / "tiny") and results["b"].name == "tiny"
