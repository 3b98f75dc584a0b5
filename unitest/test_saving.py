"""One Keras model, one saved format: `ClipCapBackbone` serialization, format-2 folders (ClipCap and CLIP),
and format-1 folders and format-2 folders of before GPT-2's `Linear` projections (written as the library wrote
them before) loading with identical captions."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from custom_architectures.transformers_arch.clip_cap_arch import (
    MAPPERS,
    ClipCapBackbone,
    build_mapper,
    mapper_config,
)
from custom_architectures.transformers_arch.gpt2_arch import GPT2
from models import __version__, check_jit_compile
from models.image_captioning import ClipCap
from models.siamese import CLIP
from testing.tiny_models import KINDS, random_embeddings, shared_tiny_files, shared_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = [str(ROOT / "demo" / name) for name in ("cat.jpg", "rocket.jpg", "coffee.jpg")]
# the mapper arguments of a format-1 config.json (flat at its top level), as the library wrote them
FORMAT1_MAPPER_KEYS = ("prefix_size", "prefix_length", "n_embd", "clip_length", "num_layers", "num_heads",
                       "mlp_ratio")
# a GPT-2 block projection's kernel in a Keras weights file (of a backbone: under gpt2/; of a GPT2 alone: h/...)
PROJECTION_KERNEL = re.compile(r"(^|/)h/[^/]+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/vars/0$")


def store_dense_layout(weights_path):
    """Rewrite a Keras weights file as the library wrote it when GPT-2's projections were ``keras.layers.Dense``:
    every projection kernel (in, out), the transpose of `custom_layers.linear.Linear`'s (out, in). Returns the
    names of the datasets rewritten."""
    with h5py.File(weights_path, "r+") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name)
                     if isinstance(obj, h5py.Dataset) and PROJECTION_KERNEL.search(name) else None)
        for name in names:
            value = np.ascontiguousarray(f[name][()].T)
            del f[name]
            f.create_dataset(name, data=value)
    return names


def tiny_backbone(kind, normalize_prefix=False, seed=0):
    keras.utils.set_random_seed(seed)
    kwargs = dict(prefix_size=8, prefix_length=3, n_embd=16)
    if kind == "transformer":
        kwargs.update(clip_length=2, num_layers=2, num_heads=2, mlp_ratio=2.0)
    gpt2 = GPT2(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return ClipCapBackbone(build_mapper(kind, **kwargs), gpt2, normalize_prefix=normalize_prefix)


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_backbone_serializes_its_children(kind, tmp_path):
    backbone = tiny_backbone(kind, normalize_prefix=kind == "transformer")
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(backbone)))  # JSON-able
    assert config["registered_name"] == "image_captioning>ClipCapBackbone"
    assert config["config"]["normalize_prefix"] == (kind == "transformer")
    backbone.save_weights(str(tmp_path / "model.weights.h5"))
    clone = keras.saving.deserialize_keras_object(config)
    clone.load_weights(str(tmp_path / "model.weights.h5"))
    assert clone.get_config() == backbone.get_config() and clone.describe() == backbone.describe()
    assert mapper_config(clone.mapper)["mapping_type"] == kind
    e = random_embeddings(2, 8, seed=1)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(clone(e, ids)), np.asarray(backbone(e, ids)))
    assert np.asarray(backbone(e, ids)).shape == (2, 3 + 4, 30)


def test_backbone_prefix_is_the_inference_policy():
    """x / ||x|| (no epsilon) then the mapper; the logits are GPT-2's on [prefix, tokens]."""
    backbone = tiny_backbone("mlp", normalize_prefix=True)
    e = random_embeddings(3, 8, seed=2)
    expected = np.asarray(backbone.mapper(e / np.linalg.norm(e, axis=-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(backbone.prefix(e)), expected, rtol=0, atol=1e-6)
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(np.asarray(backbone(e, ids)),
                                  np.asarray(backbone.gpt2(token_ids=ids, inputs_embeds=backbone.prefix(e))))
    assert np.isnan(np.asarray(backbone.prefix(np.zeros((1, 8), np.float32)))).all()  # no epsilon
    with pytest.raises(ValueError, match="16-d prefix embeddings, GPT-2 is 32 wide"):
        ClipCapBackbone(backbone.mapper, GPT2(vocab_size=30, n_positions=16, n_embd=32, n_layer=1, n_head=2))


@pytest.mark.parametrize("kind", KINDS)
def test_format2_folder(kind, tiny_models, tiny_checkpoints, tmp_path):
    model = tiny_models[kind]
    directory = Path(model.save(tmp_path / kind))
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "clipcap" and config["format_version"] == 2
    assert config["model"]["class_name"] == "ClipCapBackbone" and config["tokenizer"] == "tokenizer"
    metadata = json.loads((directory / "metadata.json").read_text())
    checkpoint = tiny_checkpoints[kind][1]
    assert metadata["format_version"] == 2 and metadata["library_version"] == __version__
    assert metadata["source"] == Path(checkpoint).name
    assert metadata["source_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert metadata["date"].endswith("+00:00")
    card = (directory / "README.md").read_text()
    assert f"mapper: {kind}, prefix length K={model.prefix_length}" in card and "ClipCap.load" in card
    loaded = ClipCap.load(directory)
    assert dict(loaded.config) == dict(model.config, name=kind)
    e = random_embeddings(2, model.prefix_size, seed=4)
    got = loaded.generate(e, method="beam", beam_size=2, max_length=8)
    want = model.generate(e, method="beam", beam_size=2, max_length=8)
    # tokens and texts identical; scores to the last bits only when both calls ran the same tier (under "auto" a
    # shape's first call runs uncompiled, a later one compiled: the shared model may have run this shape before)
    assert [[(c["tokens"], c["text"]) for c in r] for r in got] == [[(c["tokens"], c["text"]) for c in r] for r in want]
    np.testing.assert_allclose([c["score"] for r in got for c in r], [c["score"] for r in want for c in r], atol=1e-5)


def test_config_is_a_read_only_view(tiny_models):
    model = tiny_models["mlp"]
    with pytest.raises(TypeError):
        model.config["normalize_prefix"] = True
    assert model.mapper is model.backbone.mapper and model.gpt2 is model.backbone.gpt2


def test_both_loaders_check_a_folder_header_the_same_way(tmp_path):
    """`ClipCap.load` and `CLIP.load` read a folder's header through `read_saved_header`: no config.json is
    FileNotFoundError, another model's config a ValueError, a damaged one the loader's error naming the file."""
    from models.image_captioning.saving import ModelLoadError
    from utils.preset_utils import read_saved_header

    empty, other, damaged = (tmp_path / name for name in ("empty", "other", "damaged"))
    for folder in (empty, other, damaged):
        folder.mkdir()
    (other / "config.json").write_text(json.dumps({"architecture": "something_else", "format_version": 2}))
    (damaged / "config.json").write_text("{not json")
    for load, what in ((ClipCap.load, "ClipCap"), (CLIP.load, "CLIP")):
        with pytest.raises(FileNotFoundError, match=f"not a saved {what} model"):
            load(str(empty))
        with pytest.raises(ValueError, match=f"does not describe a {what} model: 'something_else'"):
            load(str(other))
        with pytest.raises(Exception, match="config.json is not a readable config"):
            load(str(damaged))
    with pytest.raises(ModelLoadError, match="not a readable config"):
        read_saved_header(damaged, "clipcap", ModelLoadError, "ClipCap")
    assert read_saved_header(other, "something_else", ModelLoadError)["format_version"] == 2


def test_clip_is_saved_in_float32_aligned_and_indexed(tmp_path_factory, tmp_path):
    """float32 (OpenAI's float16 values, widened once at conversion: nothing is converted at load), every
    tensor at a 64-byte-aligned offset, and the variable index the fast load pairs by."""
    from utils.weights_io import ALIGNMENT, INDEX_DATASET

    files = shared_tiny_files(tmp_path_factory)
    clip = CLIP.from_pretrained(files["clip"])
    saved = Path(clip.save(tmp_path / "clip"))
    metadata = json.loads((saved / "metadata.json").read_text())
    counts = metadata["weights_dtype"]
    with h5py.File(saved / "model.weights.h5", "r") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        tensors = [d for d in datasets if d.name != "/" + INDEX_DATASET]
        assert len(tensors) == len(datasets) - 1
        assert all(d.id.get_offset() % ALIGNMENT == 0 for d in tensors)
        dtypes = [d.dtype for d in tensors]
    assert counts["float16"] == 0 and counts["float32"] == dtypes.count(np.float32) == len(dtypes)
    assert len(dtypes) == len(clip.model.weights)
    assert metadata["source"] == "tiny_clip.pt" and len(metadata["source_sha256"]) == 64
    loaded = CLIP.load(saved)
    for a, b in zip(clip.model.weights, loaded.model.weights, strict=True):
        assert b.dtype == "float32"
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # lossless


def _write_format1_clip(clip, directory):
    """A CLIP folder exactly as the library wrote it before format 2."""
    directory.mkdir(parents=True)
    config = {"format_version": 1, "architecture": "openai_clip", "clip": clip.model.config, "tokenizer": None}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    named = {f"visual/{v.path}": v for v in clip.model.visual.weights}
    named["logit_scale"] = clip.model.logit_scale
    with h5py.File(directory / "weights.h5", "w") as f:
        for key, variable in named.items():
            f.create_dataset(key, data=np.asarray(variable.numpy()))


def _write_format1(model, directory):
    """A ClipCap folder exactly as the library wrote it before format 2 (config.json with the mapper's
    arguments at the top level, mapper.weights.h5 + gpt2.weights.h5, tokenizer/, clip/)."""
    directory.mkdir(parents=True)
    c = model.config
    config = {"mapping_type": c["mapping_type"], **{k: c[k] for k in FORMAT1_MAPPER_KEYS if k in c},
              "normalize_prefix": c["normalize_prefix"], "gpt2": c["gpt2"], "checkpoint": c["checkpoint"],
              "name": c["name"], "format_version": 1, "architecture": "clipcap",
              "clip": "clip" if model.clip is not None else None, "tokenizer": "tokenizer"}
    model.mapper.save_weights(str(directory / "mapper.weights.h5"))
    model.gpt2.save_weights(str(directory / "gpt2.weights.h5"))
    assert len(store_dense_layout(directory / "gpt2.weights.h5")) == 4 * model.gpt2.n_layer  # format 1's GPT-2 was Dense
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    if model.clip is not None:
        _write_format1_clip(model.clip, directory / "clip")
    (directory / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_format1_folders_still_load_with_identical_captions(kind, tmp_path_factory, tmp_path):
    model = ClipCap.load(shared_tiny_model(tmp_path_factory, kind))
    old = tmp_path / "old"
    _write_format1(model, old)
    with pytest.MonkeyPatch.context() as m:  # no format-2 writer may be used: the folder is read as it is
        m.setattr("utils.preset_utils.write_preset", None)
        loaded = ClipCap.load(old)
    assert loaded.clip is not None and loaded.name == model.name
    assert {k: v for k, v in loaded.config.items() if k != "name"} == {
        k: v for k, v in model.config.items() if k not in ("name", "checkpoint_sha256", "clip_name")} | {
        "checkpoint_sha256": None, "clip_name": None}
    for a, b in zip(model.backbone.weights, loaded.backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.clip.model.weights, loaded.clip.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    expected = model.generate(model.encode_images(DEMO), method="beam", beam_size=3, max_length=12, num_captions=2)
    got = loaded.generate(loaded.encode_images(DEMO), method="beam", beam_size=3, max_length=12, num_captions=2)
    assert got == expected  # tokens, texts and scores
    assert loaded.caption(DEMO) == model.caption(DEMO)
    # saving it again writes format 2, which loads to the same captions
    again = ClipCap.load(loaded.save(tmp_path / "new"))
    assert json.loads((tmp_path / "new" / "config.json").read_text())["format_version"] == 2
    assert again.caption(DEMO) == model.caption(DEMO)


def _write_before_linear(folder, directory):
    """A copy of the saved format-2 ``folder`` as the library wrote it before GPT-2's projections were `Linear`:
    the GPT-2 config without ``weights_layout``, the projection kernels (in, out) in model.weights.h5 (its
    variable index as it was: it names the datasets, which now have other shapes than the model's)."""
    shutil.copytree(folder, directory)
    config = json.loads((directory / "config.json").read_text())
    gpt2_config = config["model"]["config"]["gpt2"]["config"]
    assert gpt2_config.pop("weights_layout") == "out_in"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return store_dense_layout(directory / "model.weights.h5")


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_a_folder_saved_before_linear_projections_loads_the_same_weights(kind, tmp_path_factory, tmp_path):
    """A format-2 folder whose GPT-2 kernels are stored (in, out) (its config has no ``weights_layout``) loads
    transposed: the same weights (``attn.c_proj``, square, included: no shape could tell), captions and identity;
    saved again, it is written (out, in) with ``weights_layout`` and loads through the mapped path."""
    from models.image_captioning.identity import compute_identity

    folder = shared_tiny_model(tmp_path_factory, kind)
    model = ClipCap.load(folder)
    assert len(_write_before_linear(folder, tmp_path / "old")) == 4 * model.gpt2.n_layer
    loaded = ClipCap.load(tmp_path / "old")
    assert [w.path for w in loaded.backbone.weights] == [w.path for w in model.backbone.weights]
    for a, b in zip(model.backbone.weights, loaded.backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert loaded.identity == model.identity  # recorded in metadata.json
    assert compute_identity(loaded) == compute_identity(model)  # and from the weights: layout-independent
    embeddings = model.encode_images(DEMO)
    assert loaded.generate(embeddings, method="beam", beam_size=3, max_length=12) == model.generate(
        embeddings, method="beam", beam_size=3, max_length=12)
    again = tmp_path / "again"
    loaded.save(again)
    assert json.loads((again / "config.json").read_text())["model"]["config"]["gpt2"]["config"]["weights_layout"] == "out_in"
    with h5py.File(again / "model.weights.h5", "r") as f:
        assert f["gpt2/h/gpt2_block/attn/c_attn/vars/0"].shape == (3 * model.gpt2.n_embd, model.gpt2.n_embd)
    reloaded = ClipCap.load(again)
    for a, b in zip(model.backbone.weights, reloaded.backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_kernel_layout_is_one_of_two():
    with pytest.raises(ValueError, match="kernel layout 'io'"):
        GPT2(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2, weights_layout="io")


def test_jit_compile_takes_the_same_values_in_both(tiny_models, tmp_path_factory):
    assert [check_jit_compile(v) for v in (True, False, "auto", np.bool_(True))] == [True, False, "auto", True]
    for bad in ("yes", 1, None, "Auto"):
        with pytest.raises(ValueError, match="jit_compile must be True, False or 'auto'"):
            check_jit_compile(bad)
    model = tiny_models["mlp"]
    with pytest.raises(ValueError, match="jit_compile"):
        ClipCap(model.backbone, model.tokenizer, jit_compile="xla")
    clip = CLIP.from_pretrained(shared_tiny_files(tmp_path_factory)["clip"], visual_only=True, jit_compile=False)
    assert clip.jit_compile is False
    with pytest.raises(ValueError, match="jit_compile"):
        CLIP(clip.model, jit_compile="on")


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_a_folder_written_by_the_format1_code_captions_as_it_did(kind):
    """unitest/data/format1/: tiny models saved by the library's format-1 code itself (commit 7fcf12b), with the
    captions that code gave (expected.json). Loaded by today's code: the same tokens and texts, scores within
    float32 rounding (the attention is computed by one kernel now, in another order)."""
    data = ROOT / "unitest" / "data" / "format1"
    expected = json.loads((data / "expected.json").read_text())
    images = [str(ROOT / "demo" / name) for name in expected["images"]]
    model = ClipCap.load(data / kind)
    assert model.name == f"old_{kind}" and json.loads((data / kind / "config.json").read_text())["format_version"] == 1
    embeddings = model.encode_images(images)
    got = {"greedy": model.generate(embeddings, max_length=12),
           "beam": model.generate(embeddings, method="beam", beam_size=3, num_captions=2, max_length=12)}
    for method, results in got.items():
        want = expected["captions"][kind][method]
        assert [[c["tokens"] for c in r] for r in results] == [[c["tokens"] for c in r] for r in want], method
        assert [[c["text"] for c in r] for r in results] == [[c["text"] for c in r] for r in want], method
        np.testing.assert_allclose([c["score"] for r in results for c in r], [c["score"] for r in want for c in r],
                                   atol=1e-5, err_msg=method)
