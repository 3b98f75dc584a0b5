"""Keras CLIP vs OpenAI's PyTorch CLIP: same random (fp16-rounded) weights, real and tiny sizes.

Image embeddings, text embeddings and logits per image must agree within 1e-4 x the reference's largest
magnitude, at the real ViT-B/32 and RN50x4 configurations (what the ClipCap checkpoints use) and at tiny
ones. A ModifiedResNet is tested as the converter builds it (BatchNorms folded into the convolutions) and in
OpenAI's layout (``fold_batch_norm=False``), on BN statistics that are not the identity's. The architecture
of every OpenAI variant is inferred from its weights' shapes alone.
"""

import numpy as np
import pytest
import torch
from clip import tokenize
from clip.model import CLIP as TorchCLIP

from custom_architectures.clip_arch import ModifiedResNet, VisionTransformer, clip_config_from_shapes
from testing.clip_reference import (
    OPENAI_CONFIGS,
    TINY_CONFIGS,
    max_rel_diff,
    random_clip_state_dict,
    reference_model,
)
from utils.convert.openai_clip import clip_from_state_dict

CONFIGS = {"ViT-B/32": OPENAI_CONFIGS["ViT-B/32"], "RN50x4": OPENAI_CONFIGS["RN50x4"], **TINY_CONFIGS}
TEXTS = ["a photo of a cat", "two dogs playing in the snow, seen from far away", "!"]
TOLERANCE = 1e-4
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@pytest.fixture(scope="module", params=list(CONFIGS))
def outputs(request):
    """Reference and Keras outputs for one configuration (built once per module)."""
    config = CONFIGS[request.param]
    state_dict = random_clip_state_dict(config, seed=1)
    reference = reference_model(state_dict)
    model = clip_from_state_dict(state_dict)  # a ResNet's BatchNorms folded into its convolutions
    n_px = config["image_resolution"]
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, n_px, n_px, generator=generator)
    pixels = images.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    unfolded_image, bn_tensors = None, {}
    if not model.is_vit:  # OpenAI's layout too (BN layers), on the same weights and images
        unfolded = clip_from_state_dict(state_dict, visual_only=True, fold_batch_norm=False)
        unfolded_image = np.asarray(unfolded.encode_image(pixels))
        del unfolded
        batch_norms = [k.removesuffix(".running_mean") for k in state_dict if k.endswith(".running_mean")]
        bn_tensors = {name: {t: state_dict[f"{name}.{t}"].numpy() for t in BN_TENSORS} for name in batch_norms}
    del state_dict
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        ref_image = reference.encode_image(images).numpy()
        ref_text = reference.encode_text(tokens).numpy()
        if request.param.startswith("tiny"):  # OpenAI's forward (which encodes everything again)
            ref_logits = reference(images, tokens)[0].numpy()
        else:  # the same formula on the features above: saves re-encoding at the real sizes
            image_features = torch.from_numpy(ref_image)
            text_features = torch.from_numpy(ref_text)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            ref_logits = (reference.logit_scale.exp() * image_features @ text_features.t()).numpy()
    token_ids = tokens.numpy().astype(np.int32)
    ours_image = np.asarray(model.encode_image(pixels))
    ours_text = np.asarray(model.encode_text(token_ids))
    ours_logits = np.asarray(model.logits(ours_image, ours_text))
    del reference
    return {
        "name": request.param,
        "model": model,
        "image": (ref_image, ours_image),
        "unfolded_image": unfolded_image,
        "bn_tensors": bn_tensors,
        "text": (ref_text, ours_text),
        "logits": (ref_logits, ours_logits),
        "pixels": pixels,
        "token_ids": token_ids,
    }


def test_image_embeddings_match_openai(outputs):
    reference, ours = outputs["image"]
    print(f"[parity] CLIP {outputs['name']} image: max abs diff / max |ref| {max_rel_diff(reference, ours):.2e}")
    assert np.abs(reference[0] - reference[1]).max() > 1e-3 * np.abs(reference).max(), "degenerate reference"
    assert max_rel_diff(reference, ours) <= TOLERANCE, outputs["name"]


@pytest.mark.parametrize("outputs", ["RN50x4", "tiny-RN"], indirect=True)
def test_batch_norm_statistics_are_not_trivial(outputs):
    """The fold is tested only if every BN does something: gamma != 1, beta != 0, running_mean != 0,
    running_var != 1 (the identity statistics a fresh nn.BatchNorm2d holds)."""
    bn_tensors = outputs["bn_tensors"]
    stages = outputs["model"].config["vision_layers"]
    assert len(bn_tensors) == 3 + sum(3 * blocks + 1 for blocks in stages)  # stem, 3 per block, 1 downsample
    trivial = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for name, tensors in bn_tensors.items():
        for t, value in tensors.items():
            assert np.abs(value - trivial[t]).max() > 0.05, f"{name}.{t} is (nearly) the identity's"


@pytest.mark.parametrize("outputs", ["RN50x4", "tiny-RN"], indirect=True)
def test_unfolded_resnet_matches_openai(outputs):
    """OpenAI's layout (one Keras BN per BN module, ``fold_batch_norm=False``) stays exact too."""
    reference, _ = outputs["image"]
    ours = outputs["unfolded_image"]
    print(f"[parity] CLIP {outputs['name']} image, BN unfolded: max abs diff / max |ref| "
          f"{max_rel_diff(reference, ours):.2e}")
    assert max_rel_diff(reference, ours) <= TOLERANCE, outputs["name"]


def test_text_embeddings_match_openai(outputs):
    reference, ours = outputs["text"]
    print(f"[parity] CLIP {outputs['name']} text: max abs diff / max |ref| {max_rel_diff(reference, ours):.2e}")
    assert np.abs(reference[0] - reference[1]).max() > 1e-3 * np.abs(reference).max(), "degenerate reference"
    assert max_rel_diff(reference, ours) <= TOLERANCE, outputs["name"]


def test_logits_per_image_match_openai(outputs):
    reference, ours = outputs["logits"]
    print(f"[parity] CLIP {outputs['name']} logits: max abs diff / max |ref| {max_rel_diff(reference, ours):.2e}")
    assert reference.shape == (2, len(TEXTS))
    assert max_rel_diff(reference, ours) <= TOLERANCE, outputs["name"]


@pytest.mark.parametrize("outputs", list(TINY_CONFIGS), indirect=True)
def test_full_model_call_gives_logits_per_image(outputs):
    """The Keras model's own forward pass against OpenAI's forward (tiny configs: the reference ran it)."""
    reference, _ = outputs["logits"]
    logits = np.asarray(outputs["model"]((outputs["pixels"], outputs["token_ids"])))
    assert max_rel_diff(reference, logits) <= TOLERANCE, outputs["name"]


def test_layer_names_mirror_openai_modules(outputs):
    model = outputs["model"]
    names = {layer.name for layer in model.visual.layers}
    if isinstance(model.visual, VisionTransformer):
        expected = {"conv1", "ln_pre", "ln_post", "proj"}
        expected |= {f"transformer.resblocks.{i}" for i in range(model.visual.num_layers)}
    else:
        assert isinstance(model.visual, ModifiedResNet) and model.visual.fold_batch_norm  # the converter's form
        expected = {"conv1", "conv2", "conv3", "avgpool", "attnpool", "layer1.0", "layer4.0"}
        expected |= {f"layer3.{i}" for i in range(model.visual.layer_counts[2])}
        assert not names & {"bn1", "bn2", "bn3"}
        block = model.visual.get_layer("layer2.0")
        assert [v.path for v in block.weights] == [
            f"layer2.0/{conv}/{w}" for conv in ("conv1", "conv2", "conv3", "downsample.0") for w in ("kernel", "bias")]
    assert expected <= names, sorted(expected - names)
    text_names = {layer.name for layer in model.text.layers}
    assert {"token_embedding", "positional_embedding", "ln_final", "text_projection"} <= text_names
    assert {f"transformer.resblocks.{i}" for i in range(model.text.num_layers)} <= text_names


@pytest.mark.parametrize("name", list(OPENAI_CONFIGS))
def test_every_openai_variant_is_inferred_from_its_weights(name):
    expected = OPENAI_CONFIGS[name]
    with torch.device("meta"):  # shapes only, no memory
        state_dict = TorchCLIP(**expected).state_dict()
    config = clip_config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    vision_layers = expected["vision_layers"]
    assert config == {
        "embed_dim": expected["embed_dim"],
        "image_resolution": expected["image_resolution"],
        "vision_layers": list(vision_layers) if isinstance(vision_layers, tuple) else vision_layers,
        "vision_width": expected["vision_width"],
        "vision_patch_size": expected["vision_patch_size"],
        "context_length": 77,
        "vocab_size": 49408,
        "text_width": expected["transformer_width"],
        "text_heads": expected["transformer_heads"],
        "text_layers": 12,
    }


@pytest.mark.parametrize("outputs", list(TINY_CONFIGS), indirect=True)
def test_get_config_rebuilds_the_same_architecture(outputs):
    model = outputs["model"]
    for part in (model.visual, model.text):
        rebuilt = type(part).from_config(part.get_config())
        assert [(v.path, tuple(v.shape)) for v in rebuilt.weights] == [(v.path, tuple(v.shape)) for v in part.weights]
    rebuilt = type(model).from_config(model.get_config())
    assert rebuilt.config == model.config and rebuilt.is_vit == model.is_vit
