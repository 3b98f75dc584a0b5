"""MAGIC search (``method="magic"``) against a plain PyTorch reference of MAGIC's step, on the tiny models.

The reference follows yxuansu/MAGIC's ``PlugAndPlayContrastiveDecodingOneStepFast`` with no cache and no
batching: for every candidate of the top k, the whole sequence (prefix embeddings + generated tokens + the
candidate) runs through transformers' GPT-2; the penalty is the max cosine of the candidate's last hidden
state to every earlier position's; the CLIP score is softmax over the k candidates of OpenAI's PyTorch CLIP
logits of the image and the decoded partial caption (last 60 tokens, ``truncate=True``).
"""

import numpy as np
import pytest
import torch

from custom_architectures.samplers import MAGIC_DEFAULTS, MAGIC_TEXT_TOKENS, Magic, get_sampler
from testing.tiny_models import EMBED_DIM, GPT, PREFIX_LENGTH, random_embeddings
from unitest.parity import torch_prefix

MIN_GAP = 1e-5  # a decision closer than this could flip on float32 round-off: the comparison would mean nothing


@pytest.fixture(scope="module")
def magic_setup(tiny_files, tiny_model_dir):
    """The tiny ClipCap with a CLIP that has its text tower, and the PyTorch references of both."""
    import warnings

    from transformers import GPT2Config, GPT2TokenizerFast

    from models.image_captioning.clip_cap import ClipCap
    from models.siamese import CLIP
    from testing.clipcap_official import ClipCaptionModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports pkg_resources (deprecated)
        from clip.model import build_model

    clip = CLIP.from_pretrained(tiny_files["clip"])
    model = ClipCap.load(str(tiny_model_dir), clip=clip)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tiny_files["tokenizer"]))
    vocab = len(tokenizer)
    config = GPT2Config(vocab_size=vocab, **GPT, initializer_range=0.1, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch_model = ClipCaptionModel(PREFIX_LENGTH, prefix_size=EMBED_DIM, mapping_type="mlp", gpt_config=config)
    torch_model.load_state_dict(torch.load(str(tiny_files["checkpoint"]), weights_only=True))
    torch_clip = build_model(torch.load(str(tiny_files["clip"]), weights_only=True)).float().eval()
    return {"model": model, "torch_model": torch_model.eval(), "torch_clip": torch_clip, "tokenizer": tokenizer}


def reference_magic(setup, embedding, k, alpha, beta, max_length, stop_id):
    """MAGIC on one image, the plain way: (token ids, smallest decision gap)."""
    from clip import tokenize

    torch_model, torch_clip, tokenizer = setup["torch_model"], setup["torch_clip"], setup["tokenizer"]
    prefix = torch_prefix(torch_model, embedding[None], setup["model"].config["normalize_prefix"])  # (1, K, C)
    image = torch.from_numpy(embedding[None])
    image = image / image.norm(dim=-1, keepdim=True)

    def run(tokens):  # -> last logits (V,), final hidden states (positions, C) (after ln_f)
        embeds = torch.cat([prefix, torch_model.gpt.transformer.wte(torch.tensor([tokens], dtype=torch.long))], 1)
        out = torch_model.gpt(inputs_embeds=embeds, output_hidden_states=True)
        return out.logits[0, -1], out.hidden_states[-1][0]

    generated, min_gap = [], np.inf
    with torch.no_grad():
        for _ in range(max_length):
            logits, _ = run(generated)
            probs = torch.softmax(logits, dim=-1)
            top = torch.topk(logits, k).indices.tolist()
            texts = [tokenizer.decode((generated + [v])[-MAGIC_TEXT_TOKENS:]) for v in top]
            text = torch_clip.encode_text(tokenize(texts, truncate=True))
            text = text / text.norm(dim=-1, keepdim=True)
            clip_probs = torch.softmax(torch_clip.logit_scale.exp() * (text @ image.T)[:, 0], dim=0)
            scores = []
            for j, v in enumerate(top):
                _, hidden = run(generated + [v])
                unit = hidden / hidden.norm(dim=-1, keepdim=True)
                penalty = (unit[:-1] @ unit[-1]).max()
                scores.append(float((1 - alpha) * probs[v] - alpha * penalty + beta * clip_probs[j]))
            ordered = sorted(scores, reverse=True)
            min_gap = min(min_gap, ordered[0] - ordered[1]) if k > 1 else min_gap
            generated.append(top[int(np.argmax(scores))])
            if generated[-1] == stop_id:
                break
    return generated, min_gap


@pytest.mark.parametrize("compiled", [False, True])
def test_magic_equals_the_reference_step(magic_setup, stop_id, compiled):
    from models.image_captioning import ClipCap

    model = magic_setup["model"]
    if not compiled:
        model = ClipCap(model.backbone, model.tokenizer, clip=model.clip, jit_compile=False)
    embeddings = random_embeddings(3, EMBED_DIM, seed=3)
    k, alpha, beta, max_length = 6, 0.1, 2.0, 10
    got = model.generate(embeddings, method="magic", magic_k=k, magic_alpha=alpha, magic_beta=beta,
                         max_length=max_length, compile_now=compiled or None)
    for i, candidates in enumerate(got):
        tokens, gap = reference_magic(magic_setup, embeddings[i], k, alpha, beta, max_length, stop_id)
        assert gap > MIN_GAP, f"near-tie ({gap}): the comparison would mean nothing"
        assert len(candidates) == 1 and candidates[0]["tokens"] == tokens, f"image {i}"
        assert candidates[0]["text"] == model.tokenizer.decode(tokens).strip()
    # CLIP's guidance changes the captions (else the comparison would not test it)
    unguided = model.generate(embeddings, method="magic", magic_k=k, magic_alpha=alpha, magic_beta=0.0,
                              max_length=max_length)
    assert [c[0]["tokens"] for c in unguided] != [c[0]["tokens"] for c in got]


def test_magic_without_penalty_nor_clip_is_greedy(magic_setup):
    model = magic_setup["model"]
    embeddings = random_embeddings(4, EMBED_DIM, seed=5)
    magic = model.generate(embeddings, method="magic", magic_k=4, magic_alpha=0.0, magic_beta=0.0, max_length=8)
    greedy = model.generate(embeddings, method="greedy", max_length=8)
    assert [c[0]["tokens"] for c in magic] == [c[0]["tokens"] for c in greedy]
    np.testing.assert_allclose([c[0]["score"] for c in magic], [c[0]["score"] for c in greedy], atol=1e-5)


def test_magic_batches_equal_one_image_at_a_time(magic_setup):
    model = magic_setup["model"]
    embeddings = random_embeddings(5, EMBED_DIM, seed=9)
    batched = model.generate(embeddings, method="magic", magic_k=5, max_length=8)
    single = [model.generate(embeddings[i : i + 1], method="magic", magic_k=5, max_length=8)[0] for i in range(5)]
    assert [c[0]["tokens"] for c in batched] == [c[0]["tokens"] for c in single]


@pytest.mark.parametrize("options, message", [
    ({"magic_k": 0}, "magic_k must be in [1, 512], got 0"),
    ({"magic_k": 513}, "magic_k must be in [1, 512], got 513"),
    ({"magic_k": 2.5}, "magic_k must be an integer"),
    ({"magic_alpha": -0.1}, "magic_alpha must be in [0, 1]"),
    ({"magic_alpha": 1.5}, "magic_alpha must be in [0, 1]"),
    ({"magic_alpha": float("nan")}, "magic_alpha must be a finite number"),
    ({"magic_beta": -1.0}, "magic_beta must be >= 0"),
    ({"magic_beta": float("inf")}, "magic_beta must be a finite number"),
    ({"num_captions": 2}, "one caption per image"),
])
def test_magic_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        get_sampler("magic", **options)


def test_magic_defaults_and_options_of_other_methods():
    sampler = get_sampler("magic")
    assert (sampler.k, sampler.alpha, sampler.beta) == (45, 0.1, 2.0) == tuple(MAGIC_DEFAULTS.values())
    assert isinstance(get_sampler("magic", magic_k=1, magic_alpha=1.0, magic_beta=0), Magic)
    with pytest.raises(ValueError, match="magic_alpha / magic_beta / magic_k apply to method='magic', not 'beam'"):
        get_sampler("beam", magic_k=5)
    with pytest.raises(TypeError, match="PrefixDecoder"):  # never silently run in the compiled loop
        sampler.first(None, None, None, None)


def test_magic_without_text_tower_says_how_to_get_one(tiny_files, tiny_model_dir):
    """An image-only CLIP (a folder saved before text encoders were kept), or none: the error says how to add it."""
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese import CLIP

    model = ClipCap.load(tiny_model_dir, clip=CLIP.from_pretrained(tiny_files["clip"], visual_only=True))
    embeddings = random_embeddings(1, EMBED_DIM)
    assert not model.clip.has_text
    with pytest.raises(ValueError, match=r"method='magic' needs CLIP's text encoder.*ClipCap.load\("):
        model.generate(embeddings, method="magic")
    model.clip = None
    with pytest.raises(ValueError, match=r"method='magic' needs CLIP's text encoder.*ClipCap.load\("):
        model.check_generate_args("magic")


def test_cli_caption_with_magic(magic_setup, tiny_files, tmp_path, monkeypatch, capsys):
    """End to end: a saved model whose CLIP keeps its text tower, captioned by ``main.py caption --method
    magic``; the captions are `generate`'s, and the settings are recorded in map.json."""
    import json

    import main
    from models.image_captioning import ClipCap
    from models.image_captioning.pretrained import convert_model
    from unitest.test_cli import ROOT

    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGE_CAPTIONING_OFFLINE", "1")
    model_dir = tmp_path / "model"
    convert_model(ClipCap, tiny_files["checkpoint"], magic_setup["model"].clip, tiny_files["tokenizer"], model_dir,
                  name="tiny_text")
    image = ROOT / "demo" / "cat.jpg"
    argv = ["caption", str(image), "--model", str(model_dir), "--method", "magic", "--magic-k", "4",
            "--magic-alpha", "0.2", "--magic-beta", "1.5", "--max-length", "6", "--output-dir", str(tmp_path / "out"),
            "--no-progress"]
    code = main.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    model = ClipCap.load(str(model_dir))
    expected = model.generate(model.encode_images([str(image)]), method="magic", magic_k=4, magic_alpha=0.2,
                              magic_beta=1.5, max_length=6)[0][0]["text"]
    assert out == f"{image}\t{expected}\n"
    settings = json.loads((tmp_path / "out" / "map.json").read_text())[str(image)]["settings"]
    assert settings["method"] == "magic" and (settings["magic_k"], settings["magic_alpha"]) == (4, 0.2)
    code = main.main(argv[:-1] + ["--magic-alpha", "1.5", "--no-progress"])
    assert code == 2 and "magic_alpha must be in [0, 1]" in capsys.readouterr().err

    # evaluate: the settings that ran (defaults included) are in metrics.json
    from datasets.synthetic_shapes import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=2, seed=0, image_size=32)
    code = main.main(["evaluate", str(tmp_path / "data" / "captions.json"), "--model", str(model_dir), "--output",
                      str(tmp_path / "eval"), "--metrics", "BLEU", "--cache-dir", str(tmp_path / "cache"),
                      "--method", "magic", "--magic-k", "3", "--max-length", "5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["method"] == "magic" and report["generate_kwargs"] == {
        "max_length": 5, "magic_k": 3, "magic_alpha": 0.1, "magic_beta": 2.0}


def test_text_features_of_trimmed_token_ids_equal_the_full_context(magic_setup):
    """MAGIC's scorer cuts the padding after the longest text (`CLIP.encode_token_ids`): same features."""
    clip = magic_setup["model"].clip
    texts = ["a", "a photo of a cat on a mat", "word " * 100, ""]  # one cut to the context (truncate)
    token_ids = clip.tokenize(texts, truncate=True)
    np.testing.assert_allclose(clip.encode_token_ids(token_ids), clip.encode_text(texts, truncate=True), atol=1e-5)
    short = clip.tokenize(texts[:2])
    np.testing.assert_allclose(clip.encode_token_ids(short), clip.encode_text(texts[:2]), atol=1e-5)
    assert clip.encode_token_ids(short[:0]).shape == (0, clip.embed_dim)


def test_batch_handler_and_web_demo_decode_with_magic(magic_setup, tiny_files, tmp_path):
    """`batch`'s RunInference handler and the web demo's Captioner run MAGIC as `generate` does (the same
    tokens), on a saved model whose CLIP keeps its text tower."""
    from models.image_captioning import ClipCap, beam_inference
    from models.image_captioning.pretrained import convert_model
    from models.image_captioning.web_demo import Captioner
    from unitest.test_cli import ROOT

    model_dir = tmp_path / "model"
    convert_model(ClipCap, tiny_files["checkpoint"], magic_setup["model"].clip, tiny_files["tokenizer"], model_dir,
                  name="tiny_text")
    photos = [str(ROOT / "demo" / name) for name in ("cat.jpg", "rocket.jpg")]
    options = dict(magic_k=4, magic_alpha=0.2, magic_beta=1.5, max_length=6)
    model = ClipCap.load(str(model_dir))
    expected = [c[0]["text"] for c in model.generate(model.encode_images(photos), method="magic", **options)]
    handler = beam_inference.ClipCapModelHandler(str(model_dir), method="magic", batch_size=2, **options)
    loaded = handler.load_model()
    results = handler.run_inference(list(zip(photos, [loaded.clip.preprocess(p) for p in photos])), loaded)
    assert [beam_inference.make_record(p, {}, candidates=r.inference)["caption"]
            for p, r in zip(photos, results)] == expected
    rows = Captioner(model).caption(photos, method="magic", max_length=6)
    default = [c[0]["text"] for c in model.generate(model.encode_images(photos), method="magic", max_length=6)]
    assert [row["candidates"][0]["text"] for row in rows] == default
