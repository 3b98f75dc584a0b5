"""Saved folders are read and replaced safely: a save never deletes a user's files, a recorded identity stands
only for the files it was computed from, the weights file's index is checked against Keras' own layout,
config.json's entries never lead out of the folder nor build a model larger than its weights, and a damaged
CLIP tokenizer entry or vocabulary is an error naming the file."""

import gzip
import json
import shutil

import h5py
import numpy as np
import pytest

from models.image_captioning import ClipCap
from models.image_captioning.identity import compute_identity, recorded_identity
from models.image_captioning.saving import ModelLoadError
from models.siamese import CLIP
from utils.convert.common import CheckpointError
from utils.file_utils import UnsafePathError
from utils.model_store import is_saved_model

INDEX = "image_captioning_variable_index"


@pytest.fixture
def saved(tiny_clipcap, tmp_path):
    """A fresh save of the tiny model (with its CLIP), in the test's own folder."""
    directory = tmp_path / "model"
    tiny_clipcap.save(directory)
    return directory


def _edit_config(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------ 1. replacing a folder


def test_overwrite_replaces_a_saved_folder_but_refuses_one_holding_user_files(tiny_clipcap, saved, tmp_path):
    tiny_clipcap.save(saved, overwrite=True)  # a folder of ours only: replaced
    assert is_saved_model(saved)
    (saved / "my_notes.txt").write_text("mine")
    (saved / "my_results").mkdir()
    (saved / "tokenizer" / "extra.txt").write_text("mine too")
    assert not is_saved_model(saved)
    with pytest.raises(UnsafePathError, match="my_notes.txt"):
        tiny_clipcap.save(saved, overwrite=True)
    assert (saved / "my_notes.txt").read_text() == "mine" and (saved / "tokenizer" / "extra.txt").exists()
    # a folder whose config.json merely names the architecture is not a saved model
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"architecture": "clipcap"}))
    (project / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafePathError):
        tiny_clipcap.save(project, overwrite=True)
    assert (project / "thesis.tex").read_text() == "years of work"


def test_clip_overwrite_refuses_a_folder_holding_user_files(tiny_clipcap, tmp_path):
    directory = tmp_path / "clip"
    tiny_clipcap.clip.save(directory)
    tiny_clipcap.clip.save(directory, overwrite=True)
    (directory / "notes.md").write_text("mine")
    with pytest.raises(UnsafePathError, match="notes.md"):
        tiny_clipcap.clip.save(directory, overwrite=True)
    assert (directory / "notes.md").exists()


# --------------------------------------------------------------------------- 2. recorded identity


def test_recorded_identity_is_dropped_when_the_weights_change(tiny_clipcap, saved):
    original = recorded_identity(saved)
    assert original == tiny_clipcap.identity
    with h5py.File(saved / "model.weights.h5", "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and n != INDEX else None)
        for name in names:
            if f[name].dtype.kind == "f":
                f[name][...] = f[name][...] * -1.7
    assert recorded_identity(saved) is None  # no longer trusted: computed from the loaded model
    model = ClipCap.load(saved)
    assert model.identity == compute_identity(model) != original


def test_recorded_identity_is_dropped_when_the_tokenizer_changes(saved):
    assert recorded_identity(saved) is not None
    path = saved / "tokenizer" / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # same tokenizer, rewritten: another file
    assert recorded_identity(saved) is None


# ------------------------------------------------------------------------------- 3. weights index


def test_an_index_swapping_two_variables_is_not_trusted(tiny_clipcap, saved):
    with h5py.File(saved / "model.weights.h5", "r+") as f:
        index = json.loads(bytes(np.asarray(f[INDEX][()], np.uint8)))
        keys = [k for k in index if not k.startswith("#")]
        a = next(k for k in keys if "c_fc/kernel" in k)
        b = next(k for k in keys if k != a and f[index[k]].shape == f[index[a]].shape
                 and not np.array_equal(f[index[k]][()], f[index[a]][()]))
        index[a], index[b] = index[b], index[a]
        del f[INDEX]
        f.create_dataset(INDEX, data=np.frombuffer(json.dumps(index).encode(), np.uint8))
    model = ClipCap.load(saved)
    for expected, loaded in zip(tiny_clipcap.backbone.weights, model.backbone.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(loaded.numpy()), np.asarray(expected.numpy()))


# --------------------------------------------------------------------------- 4. config.json paths


@pytest.mark.parametrize("key, value", [("tokenizer", "/etc"), ("tokenizer", "../other"), ("tokenizer", ["x"]),
                                        ("clip", "/tmp"), ("clip", {"a": 1}), ("tokenizer", "link")])
def test_config_sub_folders_are_plain_names_inside_the_folder(saved, tmp_path, key, value):
    outside = tmp_path / "other"
    shutil.copytree(saved / "tokenizer", outside)
    (saved / "link").symlink_to(outside)
    _edit_config(saved / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(ModelLoadError, match=f"config.json: entry '{key}'"):
        ClipCap.load(saved)


# ------------------------------------------------------------------------ 5. sizes, 6. clear errors


@pytest.mark.parametrize("change", [
    lambda c: c["model"]["config"]["gpt2"]["config"].update(n_layer=10**9),
    lambda c: c["model"]["config"]["gpt2"]["config"].update(vocab_size=10**12),
])
def test_a_model_larger_than_its_weights_file_is_refused_before_it_is_built(saved, change):
    _edit_config(saved / "config.json", change)
    with pytest.raises(ModelLoadError, match="parameters"):
        ClipCap.load(saved)


def _small_models():
    from custom_architectures.clip_arch import ModifiedResNet, VisionTransformer
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapMLP, ClipCapTransformerMapper

    return {"resnet": (ModifiedResNet([1, 2, 1, 1], 16, 2, input_resolution=64, width=8), "layers", [1, 10**6, 1, 1]),
            "vit": (VisionTransformer(32, 8, 16, 2, 2, 16), "layers", 10**6),
            "transformer mapper": (ClipCapTransformerMapper(16, 4, 4, 24, num_layers=2, num_heads=2),
                                   "num_layers", 10**6),
            "mlp": (ClipCapMLP(16, 4, 24), "prefix_size", 10**9)}


@pytest.mark.parametrize("kind", ["resnet", "vit", "transformer mapper", "mlp"])
def test_implied_parameters_bound_every_tower_and_mapper(kind):
    """`implied_parameters` is a lower bound of each part's real size (so no honest folder is refused), and
    grows with each part's depth: a ModifiedResNet's stage of 10**6 blocks or a transformer mapper of 10**6
    layers counted for nothing before (built until memory ran out)."""
    import keras

    from utils.preset_utils import implied_parameters

    model, key, huge = _small_models()[kind]
    config = keras.saving.serialize_keras_object(model)
    assert 0 < implied_parameters(config) <= model.count_params()
    config["config"][key] = huge
    assert implied_parameters(config) > 10**9


def test_a_model_entry_that_is_no_object_is_an_error_naming_the_file(saved):
    _edit_config(saved / "config.json", lambda c: c.update(model="Dense"))
    with pytest.raises(ModelLoadError, match="config.json"):
        ClipCap.load(saved)


@pytest.mark.parametrize("entry", [[1], {"directory": "/etc"}, {"evil": 1}, {"context_length": "77"}])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_clip_tokenizer_entry_of_the_wrong_type_is_an_error_naming_the_file(saved, entry, lazy):
    _edit_config(saved / "clip" / "config.json", lambda c: c.update(tokenizer=entry))
    with pytest.raises(CheckpointError, match="config.json"):
        CLIP.load(saved / "clip", lazy_text=lazy).load_text()


@pytest.mark.parametrize("damage", ["not gzip", "truncated", "bomb"])
def test_a_damaged_clip_vocabulary_is_an_error_naming_the_file(saved, damage):
    path = saved / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    if damage == "not gzip":
        path.write_bytes(b"not gzip at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # 64 MB of text in a few kB: refused after a few MB, never decompressed whole
        with gzip.open(path, "wb", compresslevel=9) as f:
            for _ in range(64):
                f.write(b"a" * (1 << 20))
    with pytest.raises(CheckpointError, match="bpe_simple_vocab_16e6.txt.gz"):
        CLIP.load(saved / "clip")
