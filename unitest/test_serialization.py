"""Every Keras model of the library survives Keras' own serialization, at tiny sizes.

`run_model_saving_test` (keras-hub's ``TestCase.run_model_saving_test`` idea): the model is serialized with
``keras.saving.serialize_keras_object``, through JSON, rebuilt with ``deserialize_keras_object`` (which needs
every class registered and every ``get_config`` complete), its weights go through ``save_weights`` /
``load_weights``, and the rebuilt model must hold the same variables (same paths, same values) and give
bit-identical outputs. Every variable is shifted away from its initial value first, so that one the
round trip misses (a zero-initialised position table, ``logit_scale``) cannot pass unnoticed.
"""

import inspect
import json

import keras
import numpy as np
import pytest

import custom_architectures.clip_arch as clip_arch
import custom_architectures.transformers_arch.clip_cap_arch as clip_cap_arch
import custom_architectures.transformers_arch.gpt2_arch as gpt2_arch
import custom_layers.clip_layers as clip_layers
import custom_layers.gpt2_attention as gpt2_attention
import custom_layers.gpt2_block as gpt2_block
from custom_architectures.clip_arch import (
    CLIPModel,
    ModifiedResNet,
    TextTransformer,
    VisionTransformer,
    build_clip,
)
from custom_architectures.transformers_arch.clip_cap_arch import ClipCapTransformerMapper, build_mapper
from custom_architectures.transformers_arch.gpt2_arch import GPT2

PACKAGE = "image_captioning"
MODULES = (clip_layers, gpt2_attention, gpt2_block, clip_arch, clip_cap_arch, gpt2_arch)
TINY_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=16, vocab_size=100, text_width=64, text_heads=2, text_layers=2)
TINY_CLIP_RN = dict(TINY_CLIP, image_resolution=64, vision_layers=[1, 2, 1, 1], vision_width=16,
                    vision_patch_size=None)


def _shift_every_variable(model, seed=0):
    """Move every variable off its initial value (positive shifts: BatchNorm variances stay positive)."""
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        value = np.asarray(variable.numpy())
        variable.assign(value + rng.uniform(0.01, 0.05, value.shape).astype(value.dtype))


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def run_model_saving_test(model, inputs, tmp_path):
    """serialize -> JSON -> deserialize, then save_weights / load_weights into the rebuilt model; the rebuilt
    model must have the same class, config, variables (paths, shapes, values) and outputs. Returns it."""
    _shift_every_variable(model)
    serialized = keras.saving.serialize_keras_object(model)
    assert serialized["registered_name"] == f"{PACKAGE}>{type(model).__name__}"
    assert {"name", "trainable", "dtype"} <= set(serialized["config"])  # Keras' base entries: get_config chains
    text = json.dumps(serialized)
    restored = keras.saving.deserialize_keras_object(json.loads(text))
    assert type(restored) is type(model)
    assert json.dumps(keras.saving.serialize_keras_object(restored)) == text
    assert [(v.path, tuple(v.shape)) for v in restored.weights] == [(v.path, tuple(v.shape)) for v in model.weights]

    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    restored.load_weights(path)
    for original, loaded in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy(), err_msg=original.path)
    expected, actual = _call(model, inputs), _call(restored, inputs)
    for e, a in zip(keras.tree.flatten(expected), keras.tree.flatten(actual), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    return restored


def _images(resolution, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, resolution, resolution, 3)).astype("float32")


def _token_ids(batch=2, length=16, vocab=100, seed=0):
    ids = np.random.default_rng(seed).integers(1, vocab - 1, size=(batch, length)).astype("int32")
    ids[:, -3] = vocab - 1  # the end-of-text token: the highest id
    ids[:, -2:] = 0
    return ids


# -------------------------------------------------------------------------------------------- registration


def test_every_layer_and_model_is_registered_under_one_package():
    classes = [c for module in MODULES for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, keras.layers.Layer) and c.__module__ == module.__name__]
    assert len(classes) >= 20
    for cls in classes:
        assert keras.saving.get_registered_name(cls) == f"{PACKAGE}>{cls.__name__}"
        assert keras.saving.get_registered_object(f"{PACKAGE}>{cls.__name__}") is cls


def test_every_get_config_is_written_one_way():
    """keras-hub's way: ``config = super().get_config()``, ``config.update(<constructor kwargs>)``,
    ``return config`` (Keras' base entries, then the class's own, flat)."""
    classes = [c for module in MODULES for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, keras.layers.Layer) and c.__module__ == module.__name__ and "get_config" in vars(c)]
    assert len(classes) >= 15
    for cls in classes:
        body = [line.strip() for line in inspect.getsource(cls.get_config).splitlines()[1:] if line.strip()]
        assert body[0] == "config = super().get_config()", cls.__name__
        assert body[1].startswith("config.update(") and body[-1] == "return config", cls.__name__


# ------------------------------------------------------------------------------------------------ CLIP


def test_vision_transformer(tmp_path):
    model = VisionTransformer(input_resolution=32, patch_size=8, width=64, layers=2, heads=2, output_dim=32,
                              name="visual")
    run_model_saving_test(model, _images(32), tmp_path)


@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
def test_modified_resnet(fold, tmp_path):
    model = ModifiedResNet(layers=(1, 2, 1, 1), output_dim=32, heads=4, input_resolution=64, width=16,
                           fold_batch_norm=fold, name="visual")
    restored = run_model_saving_test(model, _images(64), tmp_path)
    assert restored.fold_batch_norm is fold
    has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for layer in restored._flatten_layers())
    assert has_bn is not fold


def test_a_resnet_config_written_before_fold_batch_norm_builds_unfolded():
    """Configs saved before the flag existed (no key) rebuild OpenAI's layout, whose weights they hold."""
    model = ModifiedResNet(layers=(1, 2, 1, 1), output_dim=32, heads=4, input_resolution=64, width=16,
                           name="visual")
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    assert serialized["config"].pop("fold_batch_norm") is False
    old = keras.saving.deserialize_keras_object(serialized)
    assert not old.fold_batch_norm
    assert [(v.path, tuple(v.shape)) for v in old.weights] == [(v.path, tuple(v.shape)) for v in model.weights]
    assert "layer1.0/bn1/moving_variance" in [v.path for v in old.weights]
    clip = build_clip(TINY_CLIP_RN)  # the flat config without the key (format-1 folders, saved headers)
    assert not clip.visual.fold_batch_norm and "fold_batch_norm" not in clip.config
    folded = build_clip(dict(TINY_CLIP_RN, fold_batch_norm=True))
    assert folded.visual.fold_batch_norm and folded.config == dict(TINY_CLIP_RN, fold_batch_norm=True)
    assert len(folded.visual.weights) == len(clip.visual.weights) - 3 * 22  # 22 BNs: 4 variables -> 1 bias


def test_text_transformer(tmp_path):
    model = TextTransformer(embed_dim=32, context_length=16, vocab_size=100, width=64, heads=2, layers=2,
                            name="text")
    run_model_saving_test(model, _token_ids(), tmp_path)


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_CLIP_RN, dict(TINY_CLIP_RN, fold_batch_norm=True)],
                         ids=["ViT", "RN", "RN-folded"])
def test_clip_model(config, tmp_path):
    model = build_clip(config)
    restored = run_model_saving_test(model, (_images(config["image_resolution"]), _token_ids()), tmp_path)
    assert restored.config == model.config == config  # the flat config other code reads
    assert restored.is_vit == model.is_vit
    assert [v.path for v in build_clip(restored.config).weights] == [v.path for v in model.weights]


def _without_base_entries(serialized):
    """A serialized model as the library wrote CLIP configs before their get_config chained to Keras': no
    ``trainable`` / ``dtype`` in the CLIP model's and its towers' configs."""
    serialized = json.loads(json.dumps(serialized))
    configs = [serialized["config"]] + [serialized["config"][k]["config"] for k in ("visual", "text")
                                        if serialized["config"].get(k)]
    for config in configs:
        config.pop("dtype"), config.pop("trainable")
    return serialized


@pytest.mark.parametrize("config", [TINY_CLIP, dict(TINY_CLIP_RN, fold_batch_norm=True)], ids=["ViT", "RN-folded"])
def test_a_clip_config_written_before_the_base_entries_loads(config, tmp_path):
    model = build_clip(config)
    _shift_every_variable(model)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    old = keras.saving.deserialize_keras_object(_without_base_entries(keras.saving.serialize_keras_object(model)))
    old.load_weights(str(tmp_path / "m.weights.h5"))
    assert old.config == config and old.trainable and old.visual.dtype_policy.name == "float32"
    assert keras.saving.serialize_keras_object(old) == keras.saving.serialize_keras_object(model)
    inputs = (_images(config["image_resolution"]), _token_ids())
    np.testing.assert_array_equal(np.asarray(old(inputs)), np.asarray(model(inputs)))


def test_image_only_clip_model(tmp_path):
    config = dict(TINY_CLIP_RN, context_length=0, vocab_size=0, text_width=0, text_heads=0, text_layers=0)
    model = build_clip(config)
    assert model.text is None
    serialized = keras.saving.serialize_keras_object(model)
    assert serialized["config"]["text"] is None
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert restored.text is None and restored.config == config
    _shift_every_variable(model)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    restored.load_weights(str(tmp_path / "m.weights.h5"))
    images = _images(64)
    np.testing.assert_array_equal(np.asarray(restored.encode_image(images)), np.asarray(model.encode_image(images)))


def test_clip_model_refuses_towers_its_flat_config_cannot_describe():
    visual = VisionTransformer(input_resolution=32, patch_size=8, width=64, layers=1, heads=2, output_dim=32)
    with pytest.raises(ValueError, match="2 heads; a CLIP config implies OpenAI's 1"):
        CLIPModel(visual)
    visual = VisionTransformer(input_resolution=32, patch_size=8, width=64, layers=1, heads=1, output_dim=32)
    text = TextTransformer(embed_dim=16, context_length=8, vocab_size=10, width=64, heads=1, layers=1)
    with pytest.raises(ValueError, match="projects to 16, the image encoder to 32"):
        CLIPModel(visual, text)


# ----------------------------------------------------------------------------------------- GPT-2, mappers


def test_gpt2(tmp_path):
    model = GPT2(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    mask = np.ones((2, 16), "int32")
    mask[1, 10:] = 0
    run_model_saving_test(model, {"token_ids": _token_ids(), "padding_mask": mask}, tmp_path)


@pytest.mark.parametrize("mapping_type", ["mlp", "linear"])
def test_clipcap_mlp(mapping_type, tmp_path):
    model = build_mapper(mapping_type, prefix_size=32, prefix_length=4, n_embd=64)
    restored = run_model_saving_test(model, np.random.default_rng(1).normal(size=(3, 32)).astype("float32"),
                                     tmp_path)
    assert restored.num_hidden_layers == model.num_hidden_layers


def test_clipcap_transformer_mapper(tmp_path):
    model = ClipCapTransformerMapper(prefix_size=32, prefix_length=5, clip_length=3, n_embd=64, num_layers=2,
                                     num_heads=8)
    run_model_saving_test(model, np.random.default_rng(2).normal(size=(3, 32)).astype("float32"), tmp_path)
