"""OpenAI CLIP checkpoints -> Keras: both file formats, fp16 storage, architecture detection, strictness."""

import warnings

import numpy as np
import pytest
import torch
from clip import tokenize

from unitest.clip_reference import (
    TINY_CONFIGS,
    as_fp16_checkpoint,
    max_rel_diff,
    random_clip_state_dict,
    reference_model,
)
from utils.convert.common import CheckpointError
from utils.convert.openai_clip import (
    clip_from_state_dict,
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
    assert all(v.dtype == torch.float16 for k, v in state_dict.items() if v.is_floating_point())
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
