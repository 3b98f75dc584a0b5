"""OpenAI CLIP checkpoints -> Keras: both file formats, fp16 storage, architecture detection, strictness."""

import warnings

import numpy as np
import pytest
import torch
from clip import tokenize

from testing.clip_reference import (
    TINY_CONFIGS,
    as_fp16_checkpoint,
    max_rel_diff,
    random_clip_state_dict,
    reference_model,
)
from utils.convert.common import CheckpointError
from utils.convert.openai_clip import (
    clip_config_from_state_dict,
    clip_from_state_dict,
    clip_parameter_count,
    load_openai_clip,
    load_openai_state_dict,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vit_state_dict():
    return random_clip_state_dict(TINY_CONFIGS["tiny-ViT"], seed=3)


@pytest.fixture(scope="module")
def resnet_state_dict():
    return random_clip_state_dict(TINY_CONFIGS["tiny-RN"], seed=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, vit_state_dict, resnet_state_dict):
    """A TorchScript archive of a traced ViT CLIP (fp16, as OpenAI ships) and a plain fp16 ResNet state
    dict carrying the metadata entries of OpenAI's archives."""
    directory = tmp_path_factory.mktemp("clip_checkpoints")
    reference = reference_model(vit_state_dict)
    n_px = TINY_CONFIGS["tiny-ViT"]["image_resolution"]
    with warnings.catch_warnings():  # tracer and torch.jit deprecation warnings
        warnings.simplefilter("ignore")
        example = (torch.randn(1, 3, n_px, n_px), tokenize(["a photo"]))
        traced = torch.jit.trace(reference, example, check_trace=False).half()
        jit_path = directory / "tiny-vit-jit.pt"
        torch.jit.save(traced, str(jit_path))
    plain = as_fp16_checkpoint(resnet_state_dict)
    plain.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    plain_path = directory / "tiny-rn-state-dict.pt"
    torch.save(plain, plain_path)
    return {"jit": jit_path, "plain": plain_path, "dir": directory}


def _compare(model, state_dict):
    reference = reference_model(state_dict)
    n_px = model.config["image_resolution"]
    images = torch.randn(2, 3, n_px, n_px, generator=torch.Generator().manual_seed(5))
    tokens = tokenize(["a photo of a dog", "an astronaut"])
    with torch.no_grad():
        ref_image = reference.encode_image(images).numpy()
        ref_text = reference.encode_text(tokens).numpy()
    ours_image = np.asarray(model.encode_image(images.permute(0, 2, 3, 1).numpy()))
    assert max_rel_diff(ref_image, ours_image) <= TOLERANCE
    if model.text is not None:
        ours_text = np.asarray(model.encode_text(tokens.numpy().astype(np.int32)))
        assert max_rel_diff(ref_text, ours_text) <= TOLERANCE
    np.testing.assert_allclose(float(model.logit_scale.numpy()), reference.logit_scale.item(), rtol=1e-6)


def test_torchscript_archive_loads(files, vit_state_dict):
    state_dict = load_openai_state_dict(files["jit"])
    assert all(v.dtype == np.float16 for v in state_dict.values() if np.issubdtype(v.dtype, np.floating))
    model = load_openai_clip(files["jit"])
    assert model.is_vit
    _compare(model, vit_state_dict)


def test_plain_state_dict_loads(files, resnet_state_dict):
    model = load_openai_clip(files["plain"])
    assert not model.is_vit
    _compare(model, resnet_state_dict)


def test_architecture_is_recognised_from_weights_alone(vit_state_dict, resnet_state_dict):
    vit = clip_from_state_dict(vit_state_dict)
    resnet = clip_from_state_dict(resnet_state_dict)
    assert vit.is_vit and vit.config["vision_patch_size"] == 8 and vit.config["vision_layers"] == 2
    assert not resnet.is_vit and resnet.config["vision_layers"] == [1, 2, 1, 1]
    assert resnet.config["image_resolution"] == 64 and resnet.config["vision_width"] == 16


def test_visual_only_skips_the_text_encoder(files, resnet_state_dict):
    model = load_openai_clip(files["plain"], visual_only=True)
    assert model.text is None
    _compare(model, resnet_state_dict)
    with pytest.raises(ValueError, match="without its text encoder"):
        model.encode_text(np.zeros((1, 77), np.int32))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_openai_clip(tmp_path / "absent.pt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_openai_clip(tmp_path / "empty.pt")


@pytest.mark.parametrize("kind", ["jit", "plain"])
def test_truncated_file(files, tmp_path, kind):
    data = files[kind].read_bytes()
    truncated = tmp_path / f"truncated-{kind}.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_openai_clip(truncated)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_openai_clip(path)


def test_non_clip_state_dict(tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save({"wte.weight": torch.zeros(10, 4), "h.0.ln_1.weight": torch.ones(4)}, path)
    with pytest.raises(CheckpointError, match="not an OpenAI CLIP checkpoint"):
        load_openai_clip(path)


def test_missing_key_is_named(vit_state_dict):
    state_dict = dict(vit_state_dict)
    del state_dict["visual.transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.transformer\.resblocks\.1\.ln_2\.bias"):
        clip_from_state_dict(state_dict)


def test_unexpected_key_is_named(vit_state_dict):
    state_dict = dict(vit_state_dict)
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.extra_head\.weight"):
        clip_from_state_dict(state_dict)


def test_mis_shaped_key_is_named(resnet_state_dict):
    state_dict = dict(resnet_state_dict)
    state_dict["visual.layer2.0.conv2.weight"] = torch.zeros(32, 32, 5, 5)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: visual\.layer2\.0\.conv2\.weight"):
        clip_from_state_dict(state_dict)


# ---------------------------------------------------------------------------------- BatchNorm folding


def test_resnet_is_converted_with_its_batch_norms_folded(resnet_state_dict):
    """The converter's ResNet has biased convs and no BN layer, and gives OpenAI's embeddings."""
    import keras

    from custom_layers.clip_layers import Bottleneck

    model = clip_from_state_dict(resnet_state_dict)
    visual = model.visual
    assert visual.fold_batch_norm and model.config["fold_batch_norm"] is True
    layers = list(visual._flatten_layers(include_self=False))  # the Bottlenecks' convolutions too
    assert any(isinstance(layer, Bottleneck) for layer in layers)
    assert not [layer.name for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 3 + 3 * 5 + 4 and all(conv.use_bias for conv in convs)
    unfolded = clip_from_state_dict(resnet_state_dict, fold_batch_norm=False)
    assert not unfolded.visual.fold_batch_norm and "fold_batch_norm" not in unfolded.config
    assert len(visual.weights) == len(unfolded.visual.weights) - 4 * (3 + 3 * 5 + 4) + (3 + 3 * 5 + 4)
    _compare(model, resnet_state_dict)
    _compare(unfolded, resnet_state_dict)


def test_fold_batch_norm_is_the_inference_batch_norm():
    """conv then BN (inference) == the folded conv, in float64 on random data."""
    from utils.convert.openai_clip import fold_batch_norm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))  # a 1x1 conv is a matmul over channels
    kernel = rng.normal(size=(1, 1, 5, 3))
    gamma, beta, mean = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    var = rng.uniform(0.1, 2.0, size=3)
    expected = (x @ kernel[0, 0] - mean) / np.sqrt(var + 1e-5) * gamma + beta
    folded_kernel, bias = fold_batch_norm(kernel, gamma, beta, mean, var)
    assert folded_kernel.dtype == bias.dtype == np.float32
    np.testing.assert_allclose(x @ folded_kernel[0, 0] + bias, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("key", ["visual.bn2.running_var", "visual.layer2.0.downsample.1.weight",
                                 "visual.layer3.0.bn3.running_mean", "visual.layer1.0.bn1.bias"])
def test_missing_batch_norm_key_is_named(resnet_state_dict, key, fold):
    state_dict = dict(resnet_state_dict)
    del state_dict[key]
    with pytest.raises(CheckpointError, match=rf"missing keys: {key.replace('.', r'[.]')}$"):
        clip_from_state_dict(state_dict, fold_batch_norm=fold)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_mis_shaped_batch_norm_key_is_named(resnet_state_dict, fold):
    state_dict = dict(resnet_state_dict)
    state_dict["visual.layer2.1.bn2.running_var"] = torch.ones(5)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: visual\.layer2\.1\.bn2\.running_var: expected "
                                              r"\(32,\), found \(5,\)"):
        clip_from_state_dict(state_dict, fold_batch_norm=fold)


def test_unexpected_batch_norm_key_is_named_and_the_step_counter_ignored(resnet_state_dict):
    state_dict = dict(resnet_state_dict)
    assert "visual.bn1.num_batches_tracked" in state_dict  # consumed as ignored: no error below for it
    state_dict["visual.layer1.0.bn4.weight"] = torch.ones(16)
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.layer1\.0\.bn4\.weight$"):
        clip_from_state_dict(state_dict)


def test_a_clip_converted_with_batch_norm_layers_folds_afterwards(resnet_state_dict, vit_state_dict):
    """`fold_clip_batch_norms` upgrades a CLIP in OpenAI's layout (e.g. saved before the converter folded):
    the same weights as folding at conversion, the same embeddings as the unfolded model."""
    from utils.convert.openai_clip import fold_clip_batch_norms

    unfolded = clip_from_state_dict(resnet_state_dict, fold_batch_norm=False)
    folded = fold_clip_batch_norms(unfolded)
    converted = clip_from_state_dict(resnet_state_dict)
    assert folded.visual.fold_batch_norm and folded.config == converted.config
    assert folded.text is unfolded.text
    for ours, theirs in zip(folded.visual.weights, converted.visual.weights, strict=True):
        assert ours.path == theirs.path
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)
    np.testing.assert_array_equal(folded.logit_scale.numpy(), unfolded.logit_scale.numpy())
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = np.asarray(unfolded.encode_image(images))
    assert max_rel_diff(expected, np.asarray(folded.encode_image(images))) <= 1e-5
    _compare(folded, resnet_state_dict)
    assert fold_clip_batch_norms(converted) is converted  # already folded
    vit = clip_from_state_dict(vit_state_dict)
    assert fold_clip_batch_norms(vit) is vit


# ------------------------------------------------------------------ checked before the model is built


@pytest.fixture()
def no_build(monkeypatch):
    """Building a CLIP fails the test: the checks below must come before any build."""
    from custom_architectures import clip_arch

    def refuse(config):
        raise AssertionError(f"a CLIP was built from a checkpoint that should have been refused: {config}")

    monkeypatch.setattr(clip_arch, "build_clip", refuse)


@pytest.mark.parametrize("visual_only", [False, True])
def test_parameter_count_is_the_built_models(vit_state_dict, resnet_state_dict, visual_only):
    """`clip_parameter_count` (shape arithmetic, checked before building) counts OpenAI's layout of the model
    (BatchNorms unfolded), which is also every element of the file's tensors."""
    from custom_architectures.clip_arch import build_clip

    for state_dict in (vit_state_dict, resnet_state_dict):
        config = clip_config_from_state_dict(state_dict, visual_only=visual_only)
        held = sum(int(np.prod(v.shape)) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
                   and (not visual_only or k.startswith("visual.") or k == "logit_scale"))
        assert clip_parameter_count(config, visual_only) == build_clip(config).count_params() == held


@pytest.mark.parametrize("layers", ["visual.transformer.resblocks.{}.attn.in_proj_weight", "transformer.resblocks.{}.x",
                                    "visual.layer4.{}.x"])
def test_stray_layer_keys_are_refused_before_building(vit_state_dict, resnet_state_dict, no_build, layers):
    """Layers counted from keys: 400 one-element keys would build 400 blocks of the tower's width; refused
    before anything is built, as the model would be larger than what the file's tensors hold."""
    state_dict = dict(resnet_state_dict if "layer4" in layers else vit_state_dict)
    state_dict.update({layers.format(i): torch.zeros(1) for i in range(2, 400)})
    with pytest.raises(CheckpointError, match=r"state dict: the CLIP its keys .* weights, but its tensors hold only"):
        load_openai_clip(state_dict)


@pytest.mark.parametrize("key, value, expected", [
    ("visual.conv1.weight", torch.zeros(64, 3), r"visual\.conv1\.weight has shape \(64, 3\) \(2-D\), expected a 4-D"),
    ("visual.positional_embedding", torch.zeros(0, 64), r"visual\.positional_embedding has shape \(0, 64\): every"),
    ("visual.proj", torch.zeros(64), r"visual\.proj has shape \(64,\) \(1-D\), expected a 2-D"),
    ("ln_final.weight", torch.zeros(()), r"ln_final\.weight has shape \(\) \(0-D\), expected a 1-D"),
    ("text_projection", torch.zeros(64, 0), r"text_projection has shape \(64, 0\)"),
    ("token_embedding.weight", torch.zeros(3, 2, 1), r"token_embedding\.weight has shape \(3, 2, 1\) \(3-D\)"),
    ("visual.positional_embedding", torch.zeros(1, 64), r"no image patch"),
    ("ln_final.weight", torch.zeros(32), r"the text encoder's width gives no attention head"),
])
def test_malformed_shapes_are_named(vit_state_dict, no_build, key, value, expected):
    """A crafted shape is a `CheckpointError` naming the key and the rank expected, never a raw
    IndexError / TypeError / unpacking error."""
    state_dict = dict(vit_state_dict, **{key: value})
    with pytest.raises(CheckpointError, match=expected):
        load_openai_clip(state_dict)
