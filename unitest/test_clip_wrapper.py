"""The `CLIP` wrapper: OpenAI-identical tokenizer, end-to-end encodings vs OpenAI's pipeline, save / load."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from clip import tokenize
from clip.clip import _transform
from PIL import Image

from models.siamese import CLIP
from models.siamese.clip_tokenizer import VOCAB_FILENAME, CLIPTokenizer, default_vocab_path
from testing.clip_reference import TINY_CONFIGS, max_rel_diff, random_clip_state_dict, reference_model
from utils.convert.common import CheckpointError

TOLERANCE = 1e-4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "a photo of a cat",
    "Hello   World!!\n\tsecond line",
    "Ünïcödé ñandú, 中文 and emoji 😀🎉",
    "",
    "HTML &amp; entities &lt;b&gt; &amp;amp;",
    "don't won't it's we'll they're I'm you've he'd",
    "numbers 12345 3.14159 -42",
    "<|endoftext|> inside <|startoftext|> text",
    "mojibake: Ã©tÃ© â€” fixed by ftfy",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "   leading and trailing   ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_tokenizer_equals_clip_tokenize(tokenizer):
    texts = TEXTS[:-1]
    np.testing.assert_array_equal(tokenizer.tokenize(texts), tokenize(texts).numpy())
    np.testing.assert_array_equal(tokenizer.tokenize("one text"), tokenize("one text").numpy())


def test_tokenizer_long_texts(tokenizer):
    long_text = "a photo of " * 40
    with pytest.raises(RuntimeError):
        tokenize(long_text)
    with pytest.raises(ValueError, match="more than the context length"):
        tokenizer.tokenize(long_text)
    np.testing.assert_array_equal(
        tokenizer.tokenize([long_text, TEXTS[-1]], truncate=True),
        tokenize([long_text, TEXTS[-1]], truncate=True).numpy(),
    )


def test_tokenizer_decodes_and_finds_its_vocabulary_without_clip(tokenizer):
    ids = tokenizer.encode("a photo of a cat")
    assert tokenizer.decode(ids).strip() == "a photo of a cat"
    assert os.path.basename(default_vocab_path()) == VOCAB_FILENAME
    assert tokenizer.vocab_size == 49408 and tokenizer.eot_token == 49407


def test_shipped_vocabulary_is_openais_file():
    """The vocabulary shipped in models/siamese/vocab/ is OpenAI's, byte for byte (the reference package's copy)."""
    import importlib.util

    official = os.path.join(importlib.util.find_spec("clip").submodule_search_locations[0], VOCAB_FILENAME)
    with open(default_vocab_path(), "rb") as ours, open(official, "rb") as theirs:
        assert ours.read() == theirs.read()
    assert os.path.isfile(os.path.join(os.path.dirname(default_vocab_path()), "LICENSE"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ViT CLIP saved as an OpenAI state dict, its reference, and sample image files."""
    directory = tmp_path_factory.mktemp("clip_wrapper")
    state_dict = random_clip_state_dict(TINY_CONFIGS["tiny-ViT"], seed=7)
    checkpoint = directory / "tiny.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}, checkpoint)
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate([((50, 40), "RGB"), ((33, 61), "L"), ((40, 40), "RGBA")]):
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = directory / f"image{i}.png"
        Image.fromarray(array).convert(mode).save(path)
        paths.append(str(path))
    clip = CLIP.from_pretrained(checkpoint)
    return {"dir": directory, "checkpoint": checkpoint, "reference": reference_model(state_dict), "paths": paths,
            "clip": clip}


def _reference_features(setup, images):
    transform = _transform(TINY_CONFIGS["tiny-ViT"]["image_resolution"])
    pixels = torch.stack([transform(Image.open(p) if isinstance(p, str) else p) for p in images])
    with torch.no_grad():
        return setup["reference"].encode_image(pixels).numpy()


def test_encode_image_matches_openai_pipeline(setup):
    clip, paths = setup["clip"], setup["paths"]
    assert clip.embed_dim == 32 and clip.input_resolution == 32
    expected = _reference_features(setup, paths)
    assert max_rel_diff(expected, clip.encode_image(paths)) <= TOLERANCE
    assert max_rel_diff(expected, clip.encode_image(paths, batch_size=2)) <= TOLERANCE
    # single inputs of every kind -> (1, D)
    image = Image.open(paths[0])
    for single in (paths[0], image, np.asarray(image)):
        assert max_rel_diff(expected[:1], clip.encode_image(single)) <= TOLERANCE
    stacked = np.stack([np.asarray(image), np.asarray(image)])  # (N, H, W, 3) array = a batch
    assert clip.encode_image(stacked).shape == (2, 32)
    assert clip.encode_image([]).shape == (0, 32)


def test_encode_pixels_and_preprocess(setup):
    clip = setup["clip"]
    pixels = np.stack([clip.preprocess(p) for p in setup["paths"]])
    transform = _transform(32)
    expected = np.stack([transform(Image.open(p)).permute(1, 2, 0).numpy() for p in setup["paths"]])
    np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-6)
    assert max_rel_diff(_reference_features(setup, setup["paths"]), clip.encode_pixels(pixels)) <= TOLERANCE
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        clip.encode_pixels(np.zeros((1, 3, 32, 32), np.float32))


def test_encode_text_and_similarity_match_openai(setup):
    clip, reference = setup["clip"], setup["reference"]
    texts = ["a photo of a cat", "a diagram", "an astronaut riding a horse"]
    with torch.no_grad():
        expected_text = reference.encode_text(tokenize(texts)).numpy()
        transform = _transform(32)
        pixels = torch.stack([transform(Image.open(p)) for p in setup["paths"]])
        expected_logits = reference(pixels, tokenize(texts))[0].numpy()
    assert max_rel_diff(expected_text, clip.encode_text(texts)) <= TOLERANCE
    assert clip.encode_text("one").shape == (1, 32)
    logits = clip.similarity(setup["paths"], texts)
    assert logits.shape == (3, 3)
    assert max_rel_diff(expected_logits, logits) <= TOLERANCE


def test_save_and_load_without_torch(setup):
    clip = setup["clip"]
    saved = str(setup["dir"] / "saved")
    clip.save(saved)
    assert sorted(os.listdir(saved)) == sorted(["README.md", "config.json", "metadata.json", "model.weights.h5",
                                                VOCAB_FILENAME])
    expected_image = clip.encode_image(setup["paths"])
    expected_logits = clip.similarity(setup["paths"], ["a cat", "a dog"])
    loaded = CLIP.load(saved)
    np.testing.assert_allclose(loaded.encode_image(setup["paths"]), expected_image, rtol=0, atol=1e-6)
    assert CLIP.from_pretrained(saved).embed_dim == 32
    # a fresh process where torch, torchvision and clip cannot be imported
    script = f"""
import json, sys
for blocked in ("torch", "torchvision", "clip"):
    sys.modules[blocked] = None
from models.siamese import CLIP
clip = CLIP.load({saved!r})
logits = clip.similarity({setup["paths"]!r}, ["a cat", "a dog"])
print(json.dumps(logits.tolist()))
"""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "-1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.asarray(json.loads(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)


def test_text_tower_loaded_later_is_its_own(setup):
    """A lazily loaded text tower takes its own tensors: its paths repeat the image tower's
    (``transformer.resblocks.0/...`` in both towers of a ViT CLIP)."""
    clip = setup["clip"]
    saved = str(setup["dir"] / "saved_lazy")
    clip.save(saved)
    lazy = CLIP.load(saved, lazy_text=True)
    texts = ["a cat", "a diagram"]
    # the same weights (another tower's would differ by far more); the session's CLIP may have compiled the shape
    np.testing.assert_allclose(lazy.encode_text(texts), clip.encode_text(texts), rtol=0, atol=1e-5)


def test_visual_only(setup):
    clip = CLIP.from_pretrained(setup["checkpoint"], visual_only=True)
    assert clip.tokenizer is None and clip.model.text is None
    np.testing.assert_allclose(clip.encode_image(setup["paths"]), setup["clip"].encode_image(setup["paths"]),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no text encoder"):
        clip.encode_text("a cat")
    saved = str(setup["dir"] / "saved_visual")
    clip.save(saved)
    assert VOCAB_FILENAME not in os.listdir(saved)
    assert CLIP.load(saved).model.text is None


def test_clear_errors(setup, tmp_path, monkeypatch):
    from utils.downloads import OfflineError

    with pytest.raises(FileNotFoundError, match="not an existing file or directory, nor an OpenAI CLIP name"):
        CLIP.from_pretrained(str(tmp_path / "ViT-B-32.pt"))
    monkeypatch.setenv("IMAGE_CAPTIONING_OFFLINE", "1")
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "store"))
    with pytest.raises(OfflineError, match=r"ViT-B-32\.pt.*" + str(tmp_path / "store" / "downloads")):
        CLIP.from_pretrained("ViT-B/32")  # a name: downloaded, except offline, where the error says where
    with pytest.raises(FileNotFoundError, match="not a saved CLIP model"):
        CLIP.load(tmp_path)
    saved = str(setup["dir"] / "saved_broken")
    setup["clip"].save(saved)
    import h5py

    with h5py.File(os.path.join(saved, "model.weights.h5"), "a") as f:
        del f["vars/0"]  # CLIPModel's own variable: logit_scale
    # the file and the variable it lacks are named
    with pytest.raises(CheckpointError, match=r"cannot load the weights from .*model\.weights\.h5.*logit_scale"):
        CLIP.load(saved)


def test_compiled_encoders_trace_one_block_step(setup, monkeypatch):
    """Issue 24 (tiering): a compiled encoder's trace runs the transformer blocks as one traced function (each
    block's weights as its arguments), not each block's ops anew: a background build holds the GIL while it
    traces, and CLIP's eager calls beside it need it at every layer (ViT-B/32's trace 0.62 -> ~0.2 s). The
    compiled features are the eager tower's."""
    from custom_layers import clip_layers
    from unitest.tracing import record_traces

    model = setup["clip"].model
    assert setup["clip"].wait_for_builds(timeout=300)  # earlier tests' background builds trace this tower too
    traced = record_traces(monkeypatch, clip_layers.MultiHeadAttention.call, clip_layers.MultiHeadAttention)
    pixels = np.random.default_rng(5).normal(0, 1, (3, 32, 32, 3)).astype(np.float32)
    compiled = CLIP(model, jit_compile=True).encode_pixels(pixels)
    assert traced == [False], traced  # 2 blocks, one trace
    traced.clear()
    eager = np.asarray(model.visual(pixels, training=False))
    assert traced == [True, True]  # eager calls run every block as before
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)
    traced.clear()
    CLIP(model, tokenizer=setup["clip"].tokenizer, jit_compile=True).encode_text(["a photo of a cat", "two dogs"])
    assert traced == [False], traced  # the text tower's (causal) blocks: one trace too
