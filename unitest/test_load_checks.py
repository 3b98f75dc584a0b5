"""Saved folders whose weights or dtype policies were edited are refused at load, before any caption.

- D: an int8 folder's scales must be finite and > 0 and its q values within [-QMAX, QMAX] (else captions of
  ``<|endoftext|>`` with score nan, or garbage); any folder's float weights must be finite (a NaN is as silent).
- E: a saved config's layers must run in float32 (a float32 folder edited to "bfloat16" loaded as float32
  and failed at the first caption with a dtype mismatch); an int8 folder (float32 policies) still loads.
"""

import json
import re
import shutil

import h5py
import keras
import numpy as np
import pytest

from models.image_captioning.saving import ModelLoadError
from testing.tiny_models import random_embeddings, shared_tiny_model
from utils.convert.common import CheckpointError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"float32": the shared tiny folder, "int8": it loaded with precision="int8" and saved}."""
    from models.image_captioning.clip_cap import ClipCap

    fp32 = shared_tiny_model(tmp_path_factory)
    int8 = tmp_path_factory.mktemp("load_checks") / "tiny8"
    ClipCap.load(str(fp32), precision="int8").save(str(int8))
    return {"float32": fp32, "int8": int8}


def _copy(folders, kind, tmp_path):
    target = tmp_path / kind
    shutil.copytree(folders[kind], target)
    return target


def _edit_dataset(weights_path, suffix, edit):
    """Apply ``edit(array) -> array`` to the one dataset whose name ends with ``suffix`` (in place)."""
    with h5py.File(weights_path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and n.endswith(suffix) else None)
        assert len(names) == 1, names
        f[names[0]][...] = edit(f[names[0]][()])


def _caption(model):
    return model.generate(random_embeddings(1, model.mapper.prefix_size, seed=0), max_length=5)[0][0]


WTE_SCALE = "int8_embedding/vars/1"  # gpt2.wte's embeddings_scale (V,)
C_FC_SCALE = "gpt2_block_1/mlp/c_fc/vars/1"  # a block's kernel_scale (N,)
C_FC_Q = "gpt2_block_1/mlp/c_fc/vars/0"  # its kernel_q (N, K) int8


def _set_first(value):
    def edit(a):
        a = a.copy()
        a.flat[0] = value
        return a
    return edit


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 0.0, -0.01, 3e38])
@pytest.mark.parametrize("suffix, variable", [(WTE_SCALE, "embeddings_scale"), (C_FC_SCALE, "kernel_scale")])
def test_int8_folder_with_bad_scale_is_refused(folders, tmp_path, value, suffix, variable):
    from models.image_captioning.clip_cap import ClipCap

    folder = _copy(folders, "int8", tmp_path)
    _edit_dataset(folder / "model.weights.h5", suffix, _set_first(value))
    with pytest.raises(ModelLoadError, match=rf"model\.weights\.h5.*{variable}") as e:
        ClipCap.load(str(folder))
    assert "finite" in str(e.value) or "> 0" in str(e.value), e.value


def test_int8_folder_with_q_out_of_range_is_refused(folders, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    folder = _copy(folders, "int8", tmp_path)
    _edit_dataset(folder / "model.weights.h5", C_FC_Q, _set_first(-128))
    with pytest.raises(ModelLoadError, match=r"model\.weights\.h5.*kernel_q.*\[-127, 127\]"):
        ClipCap.load(str(folder))


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("kind, suffix", [("float32", "gpt2/layers/embedding/vars/0"),
                                          ("float32", "clip_cap_mlp/layers/dense/vars/0"),
                                          ("int8", "gpt2_block/ln_1/vars/0")])
def test_folder_with_non_finite_float_weight_is_refused(folders, tmp_path, kind, suffix, value):
    from models.image_captioning.clip_cap import ClipCap

    folder = _copy(folders, kind, tmp_path)
    _edit_dataset(folder / "model.weights.h5", suffix, _set_first(value))
    with pytest.raises(ModelLoadError, match=r"model\.weights\.h5.*not finite"):
        ClipCap.load(str(folder))


def test_clip_folder_with_non_finite_weight_is_refused(folders, tmp_path):
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP

    folder = _copy(folders, "float32", tmp_path)
    _edit_dataset(folder / "clip" / "model.weights.h5", "vision_transformer/layers/conv2d/vars/0", _set_first(np.nan))
    with pytest.raises(CheckpointError, match=r"clip.model\.weights\.h5.*not finite"):
        CLIP.load(str(folder / "clip"))
    with pytest.raises(CheckpointError, match=r"clip.model\.weights\.h5.*not finite"):
        ClipCap.load(str(folder))


def test_a_lazily_loaded_clip_text_tower_is_checked_too(folders, tmp_path):
    """``CLIP.load(lazy_text=True)`` reads the text tower when re-ranking first needs it: its weights are
    checked then, as the eager load checks them."""
    from models.siamese.clip import CLIP

    folder = _copy(folders, "float32", tmp_path)
    _edit_dataset(folder / "clip" / "model.weights.h5", "text_transformer/layers/embedding/vars/0", _set_first(np.inf))
    clip = CLIP.load(str(folder / "clip"), lazy_text=True)  # the image side is sound
    with pytest.raises(CheckpointError, match=r"model.weights.h5: the weight token_embedding.* is not finite"):
        clip.load_text()


def test_genuine_folders_still_load_and_caption(folders):
    from models.image_captioning.clip_cap import ClipCap

    for kind in ("float32", "int8"):
        model = ClipCap.load(str(folders[kind]))
        assert model.precision == kind
        assert np.isfinite(_caption(model)["score"])


# ------------------------------------------------------------------ E: dtype policies
def _edit_config(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16", "float16"])
def test_config_with_non_float32_policy_is_refused_before_building(folders, tmp_path, monkeypatch, kind, policy):
    from models.image_captioning.clip_cap import ClipCap

    folder = _copy(folders, kind, tmp_path)
    _edit_config(folder / "config.json", '"name": "float32"', f'"name": "{policy}"')

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(keras.saving, "deserialize_keras_object", no_build)
    with pytest.raises(ModelLoadError, match=rf"config\.json.*{policy}.*float32"):
        ClipCap.load(str(folder))


def test_config_with_one_layer_edited_names_it(folders, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    folder = _copy(folders, "float32", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["config"]["gpt2"]["config"]["dtype"]["config"]["name"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json.*gpt2.*'bfloat16'"):
        ClipCap.load(str(folder))
    config["model"]["config"]["gpt2"]["config"]["dtype"] = "bfloat16"  # a plain name, as Keras also accepts
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json.*gpt2.*'bfloat16'"):
        ClipCap.load(str(folder))


@pytest.mark.parametrize("part", ["visual", "text"])
def test_clip_config_with_non_float32_policy_is_refused(folders, tmp_path, part):
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP

    folder = _copy(folders, "float32", tmp_path)
    config = json.loads((folder / "clip" / "config.json").read_text())
    config["model"]["config"][part]["config"]["dtype"]["config"]["name"] = "bfloat16"
    (folder / "clip" / "config.json").write_text(json.dumps(config))
    for load in (lambda: CLIP.load(str(folder / "clip")), lambda: CLIP.load(str(folder / "clip"), lazy_text=True),
                 lambda: ClipCap.load(str(folder))):
        with pytest.raises(CheckpointError, match=rf"clip.config\.json.*{part}.*'bfloat16'"):
            load()


@pytest.mark.parametrize("file, suffix", [("gpt2.weights.h5", "h/gpt2_block/ln_1/vars/0"),
                                          ("mapper.weights.h5", "layers/dense_1/vars/1")])
def test_format1_folder_with_non_finite_weight_is_refused(tmp_path, file, suffix):
    from pathlib import Path

    from models.image_captioning.clip_cap import ClipCap

    folder = tmp_path / "mlp"
    shutil.copytree(Path(__file__).parent / "data" / "format1" / "mlp", folder)
    _edit_dataset(folder / file, suffix, _set_first(np.nan))
    with pytest.raises(ModelLoadError, match=rf"{re.escape(file)}.*not finite"):
        ClipCap.load(str(folder))


def test_a_lazily_loaded_clip_text_config_is_checked_at_load(folders, tmp_path):
    """``CLIP.load(lazy_text=True)`` built its visual part from a config whose text tower was set aside, and
    the text tower later with ``keras.layers.deserialize`` of its config as written: the class check
    (`check_model_config`: Keras' and this library's classes only) never saw it. The whole config is checked
    when it is read now, before anything is built."""
    from models.siamese.clip import CLIP

    folder = _copy(folders, "float32", tmp_path)
    config = json.loads((folder / "clip" / "config.json").read_text())
    config["model"]["config"]["text"]["module"] = "subprocess"
    config["model"]["config"]["text"]["class_name"] = "Popen"
    (folder / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"clip.config\.json: model.config.text names 'subprocess'.'Popen'"):
        CLIP.load(str(folder / "clip"), lazy_text=True)
