"""The `ClipCap` class: conversion with a CLIP, captions end to end against the official pipeline, save/load.

End to end: a tiny OpenAI-format CLIP (fp16 weights, as released) + a tiny official transformer-mapper
ClipCap; the PyTorch reference runs OpenAI's CLIP (built from the same fp16-rounded weights, in fp32),
OpenAI's preprocessing, the L2 normalisation and the official ``generate2`` / ``generate_beam``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.image_captioning import ClipCap
from testing import clipcap_official as ref
from testing.tiny_models import KINDS, TINY_INIT_SCALE, random_embeddings
from utils.convert.common import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def with_clip(tmp_path_factory, clipcap_tokenizer, stop_id, gpt2_tokenizer_dir):
    """(torch CLIP, torch ClipCap, ClipCap with its CLIP): transformer mapper on a 32-d tiny ViT CLIP."""
    from clip.model import build_model

    from testing.tiny_models import EMBED_DIM, build_tiny_clip

    directory = tmp_path_factory.mktemp("clipcap_with_clip")
    clip_path = build_tiny_clip(directory / "clip.pt")
    torch_clip = build_model(torch.load(clip_path, weights_only=True)).float().eval()
    torch.manual_seed(3)
    vocab = len(clipcap_tokenizer)
    config = ref.GPT2Config(**dict(ref.SIZES["tiny"]["gpt"], vocab_size=vocab),
                            initializer_range=0.02 * TINY_INIT_SCALE, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch_model = ref.ClipCaptionModel(5, clip_length=3, prefix_size=EMBED_DIM, num_layers=2,
                                       mapping_type="transformer", gpt_config=config).eval()
    with torch.no_grad():
        torch_model.gpt.transformer.wte.weight[stop_id] *= 3.0
    checkpoint = ref.save_official(torch_model, directory / "clipcap.pt")
    model = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=gpt2_tokenizer_dir)
    return torch_clip, torch_model, model


def photos(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


def test_captions_match_the_official_pipeline(with_clip, clipcap_tokenizer):
    from clip.clip import _transform

    torch_clip, torch_model, model = with_clip
    images = photos()
    assert model.config["normalize_prefix"] and model.clip.embed_dim == 32
    transform = _transform(torch_clip.visual.input_resolution)
    with torch.no_grad():
        embeddings = torch_clip.encode_image(torch.stack([transform(im) for im in images])).float()
    ours = model.encode_images(images)
    assert np.abs(ours - embeddings.numpy()).max() <= 1e-4 * np.abs(embeddings.numpy()).max()
    prefix = torch_model.project(ref.normalize_embedding(embeddings)).detach()
    expected_greedy, expected_beam = [], []
    for i in range(len(images)):
        text, _, gap = ref.generate2(torch_model, clipcap_tokenizer, prefix[i : i + 1], return_tokens=True)
        texts, _, _, beam_gap = ref.generate_beam(torch_model, clipcap_tokenizer, 2, prefix[i : i + 1],
                                                  entry_length=12, return_details=True)
        assert min(gap, beam_gap) > 2e-5  # decisions are not near-ties
        expected_greedy.append(text.strip())
        expected_beam.append(texts[0].strip())
    assert model.caption(images) == expected_greedy
    assert model.caption(images, method="beam", beam_size=2, max_length=12) == expected_beam
    assert model.caption(images[0]) == expected_greedy[:1]  # one image -> a list of one caption


def test_predict_delegates_to_the_pipeline(with_clip, tmp_path):
    model = with_clip[2]
    images = [np.asarray(im) for im in photos(2, seed=1)]
    results = model.predict(images, save=False, progress=False)
    assert [r["caption"] for r in results] == model.caption(images)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, tiny_models, tmp_path):
    model = tiny_models[kind]
    directory = model.save(tmp_path / kind)
    assert sorted(os.listdir(directory)) == ["README.md", "config.json", "metadata.json", "model.weights.h5",
                                             "tokenizer"]
    loaded = ClipCap.load(directory)
    assert loaded.clip is None and loaded.name == kind
    assert {k: v for k, v in loaded.config.items() if k != "name"} == {
        k: v for k, v in model.config.items() if k != "name"}
    e = random_embeddings(2, model.prefix_size, seed=9)
    # the same path on both sides (the session's model may have compiled this shape in an earlier test)
    np.testing.assert_array_equal(loaded.prefix(e, compile_now=False), model.prefix(e, compile_now=False))
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(loaded.logits(e, ids), model.logits(e, ids))
    # uncompiled on both sides too: an earlier test may have built this shape's program for the session's model,
    # and XLA's sums differ from the graph's in the last digits of the beam scores
    assert loaded.generate(e, method="beam", beam_size=3, max_length=10, compile_now=False) == model.generate(
        e, method="beam", beam_size=3, max_length=10, compile_now=False)


def test_saved_model_with_clip_loads_without_torch(with_clip, tmp_path):
    model = with_clip[2]
    directory = model.save(tmp_path / "with_clip")
    assert os.path.isdir(os.path.join(directory, "clip"))
    images = np.stack([np.asarray(im.resize((56, 48))) for im in photos(2, seed=2)])
    script = (
        "import sys, json; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import numpy as np\n"
        "from models.image_captioning.clip_cap import ClipCap\n"
        f"m = ClipCap.load({str(directory)!r})\n"
        f"print(json.dumps(m.caption(list(np.load({str(tmp_path / 'x.npy')!r})))))\n"
    )
    np.save(tmp_path / "x.npy", images)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == model.caption(list(images))


def test_name_saves_to_the_model_store(tiny_checkpoints, gpt2_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    model = ClipCap.from_pretrained(tiny_checkpoints["linear"][1], tokenizer=gpt2_tokenizer_dir, name="legacy")
    assert (tmp_path / "home" / "legacy" / "config.json").is_file()
    loaded = ClipCap.load("legacy")
    assert loaded.name == "legacy" and loaded.config["mapping_type"] == "linear"
    e = random_embeddings(1, model.prefix_size)
    assert loaded.generate(e, max_length=8) == model.generate(e, max_length=8)


def test_clear_errors(tiny_models, tmp_path, with_clip):
    model = tiny_models["mlp"]
    with pytest.raises(ValueError, match="no CLIP image encoder"):
        model.encode_images(photos(1))
    with pytest.raises(FileNotFoundError, match="not a saved ClipCap model"):
        ClipCap.load(tmp_path)
    with pytest.raises(CheckpointError, match="32-d image embeddings.*prefix_size=24"):
        ClipCap.load(model.save(tmp_path / "m"), clip=with_clip[2].clip)
    os.remove(tmp_path / "m" / "model.weights.h5")
    with pytest.raises(FileNotFoundError, match="model.weights.h5 missing"):
        ClipCap.load(tmp_path / "m")
    assert model.generate(np.zeros((0, model.prefix_size), np.float32)) == []


def test_compiled_mapper_traces_one_layer_step(tiny_models, monkeypatch):
    """Issue 24 (tiering): the compiled transformer mapper's trace runs its layers as one traced function (each
    layer's weights as arguments), not each layer's ops anew (the trace of a background build holds the GIL that
    the calls beside it need); the compiled prefixes are the eager ones."""
    import tensorflow as tf

    from custom_architectures.transformers_arch import clip_cap_arch
    from models.image_captioning.clip_cap import _project
    from unitest.tracing import record_traces

    model = tiny_models["transformer"]
    assert model._policy.wait(timeout=300)  # earlier tests' background builds trace this mapper too
    layers = [x for x in model.backbone._flatten_layers() if isinstance(x, clip_cap_arch.MapperLayer)]
    assert len(layers) >= 2
    traced = record_traces(monkeypatch, clip_cap_arch.MapperAttention.call, clip_cap_arch.MapperAttention)
    e = random_embeddings(3, model.prefix_size, seed=41)
    project = tf.function(lambda e, run: _project(model.backbone, e, run), jit_compile=True)  # `ClipCap._project`
    compiled = project(tf.constant(e), tf.constant(True)).numpy()
    assert traced == [False], traced  # every layer, one trace
    np.testing.assert_allclose(compiled, model.prefix(e, compile_now=False), rtol=0, atol=1e-5)
