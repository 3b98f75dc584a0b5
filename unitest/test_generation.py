"""Batched, KV-cached, compiled decoding against the official ClipCap decoders (generate2, generate_beam).

The PyTorch reference runs the official way (one image at a time, whole sequence recomputed per step).
Random weights have a larger init scale so that decisions are not near-ties; each comparison also checks
its margins (top-1 vs top-2 logit, last kept vs first dropped beam candidate) against the numerical error.
"""

import numpy as np
import pytest
import torch

from custom_architectures.generation_utils import Beam, Greedy, PrefixDecoder, Sample
from testing import clipcap_official as ref
from testing.tiny_models import KINDS, random_embeddings
from unitest.parity import assert_same_tokens, torch_prefix
from utils.tokenizer import TokenizerError

MIN_GAP = 2e-5  # decisions closer than this could flip on fp32 round-off (logits agree to ~1e-5)


def official(torch_model, model, tokenizer, embeddings, method, max_length, beam_size=5):
    """Per image: (token ids of the best caption, text, all beam token lists, scores, min decision gap)."""
    prefix = torch_prefix(torch_model, embeddings, model.config["normalize_prefix"])
    out = []
    for i in range(len(embeddings)):
        if method == "greedy":
            text, tokens, gap = ref.generate2(torch_model, tokenizer, prefix[i : i + 1], entry_length=max_length,
                                              return_tokens=True)
            out.append((tokens, text, [tokens], None, gap))
        else:
            texts, token_lists, scores, gap = ref.generate_beam(torch_model, tokenizer, beam_size, prefix[i : i + 1],
                                                                entry_length=max_length, return_details=True)
            out.append((token_lists[0], texts[0], token_lists, scores, gap))
    return out


def generate_both_ways(model, embeddings, **kwargs):
    """{"uncompiled": ..., "compiled": ...}: `ClipCap.generate` over the traced block (a ClipCap on the same
    backbone with jit_compile=False, what "auto" runs at a shape's first call) and in the XLA loop."""
    from models.image_captioning import ClipCap

    uncompiled = ClipCap(model.backbone, model.tokenizer, jit_compile=False)
    return {"uncompiled": uncompiled.generate(embeddings, **kwargs),
            "compiled": model.generate(embeddings, compile_now=True, **kwargs)}


def check_against_official(torch_model, model, tokenizer, embeddings, method, max_length, beam_size=5):
    both = generate_both_ways(model, embeddings, method=method, max_length=max_length, beam_size=beam_size,
                              num_captions=beam_size if method == "beam" else 1)
    expected = official(torch_model, model, tokenizer, embeddings, method, max_length, beam_size)
    for how, got in both.items():
        for candidates, (tokens, text, token_lists, scores, gap) in zip(got, expected, strict=True):
            assert gap > MIN_GAP, f"near-tie ({gap}): the comparison would mean nothing"
            assert_same_tokens([candidates[0]["tokens"]], [tokens], f"{method} tokens ({how})")
            assert candidates[0]["text"] == text.strip()
            if method == "beam":
                assert_same_tokens([c["tokens"] for c in candidates], token_lists, f"beam candidates ({how})")
                np.testing.assert_allclose([c["score"] for c in candidates], scores, atol=1e-4)
    np.testing.assert_allclose([[c["score"] for c in r] for r in both["uncompiled"]],
                               [[c["score"] for c in r] for r in both["compiled"]], atol=1e-5, rtol=0)
    return both["compiled"]


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_greedy_equals_generate2(kind, tiny_checkpoints, tiny_models, clipcap_tokenizer):
    model = tiny_models[kind]
    got = check_against_official(tiny_checkpoints[kind][0], model, clipcap_tokenizer,
                                 random_embeddings(3, model.prefix_size, seed=1), "greedy", max_length=67)
    assert all(1 <= len(c[0]["tokens"]) <= 67 for c in got)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_beam_equals_generate_beam(kind, tiny_checkpoints, tiny_models, clipcap_tokenizer):
    model = tiny_models[kind]
    check_against_official(tiny_checkpoints[kind][0], model, clipcap_tokenizer,
                           random_embeddings(3, model.prefix_size, seed=2), "beam", max_length=30)


def test_stop_token_ends_captions_and_is_kept(tiny_models, stop_id):
    model = tiny_models["mlp"]
    embeddings = random_embeddings(8, model.prefix_size, seed=3)
    for method in ("greedy", "beam"):
        results = model.generate(embeddings, method=method, max_length=40)
        tokens = [r[0]["tokens"] for r in results]
        stopped = [t for t in tokens if t[-1] == stop_id]
        assert stopped and any(len(t) < 40 for t in stopped), method  # the stop token is reachable
        assert all(stop_id not in t[:-1] for t in tokens)  # nothing after the stop token
        assert all(len(t) == 40 for t in tokens if t[-1] != stop_id)  # otherwise max_length tokens
        assert all(r[0]["text"].endswith(".") for r, t in zip(results, tokens) if t[-1] == stop_id)
    unstoppable = model.generate(embeddings, max_length=12, stop_token=None)
    assert all(len(r[0]["tokens"]) == 12 for r in unstoppable)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_real_size_greedy_and_beam(kind, real_checkpoints, real_models, clipcap_tokenizer):
    model = real_models[kind]
    embeddings = random_embeddings(2, model.prefix_size, seed=4)
    check_against_official(real_checkpoints[kind][0], model, clipcap_tokenizer, embeddings, "greedy", max_length=8)
    check_against_official(real_checkpoints[kind][0], model, clipcap_tokenizer, embeddings[:1], "beam",
                           max_length=6)


@pytest.mark.parametrize("sampler", [Greedy(), Beam(beam_size=3), Sample(top_k=20, num_captions=2)],
                         ids=["greedy", "beam", "sample"])
def test_batched_equals_one_at_a_time_and_compiled_equals_eager(sampler, tiny_models):
    model = tiny_models["transformer"]
    prefix = model.prefix(random_embeddings(3, model.prefix_size, seed=5))
    decoder = PrefixDecoder(model.gpt2)
    batched = decoder(prefix, sampler, max_length=15, stop_token_id=7, seed=3)
    eager = decoder(prefix, sampler, max_length=15, stop_token_id=7, seed=3, jit_compile=False)
    for i in range(3):  # an image's draws are keyed by its id (default: its position), not by its batch
        alone = decoder(prefix[i : i + 1], sampler, max_length=15, stop_token_id=7, seed=3, image_ids=[i])
        assert alone.tokens[0] == batched.tokens[i]
        np.testing.assert_allclose(alone.scores[0], batched.scores[i], atol=1e-5)
    assert eager.tokens == batched.tokens
    np.testing.assert_allclose(eager.scores, batched.scores, atol=1e-5)
    ids = [900, 2**31 - 1, 5]  # any ids: the same draws in any order, chunking or padding
    shuffled = decoder(prefix[::-1], sampler, max_length=15, stop_token_id=7, seed=3, image_ids=ids[::-1])
    chunked = PrefixDecoder(model.gpt2, max_batch_size=2)(prefix, sampler, max_length=15, stop_token_id=7, seed=3,
                                                          image_ids=ids)
    assert shuffled.tokens[::-1] == chunked.tokens
    if isinstance(sampler, Sample):
        assert chunked.tokens != batched.tokens  # other ids, other draws


def test_compiled_loops_are_cached_per_shape(tiny_models):
    model = tiny_models["mlp"]
    decoder = PrefixDecoder(model.gpt2)
    prefix = model.prefix(random_embeddings(4, model.prefix_size, seed=6))
    decoder(prefix[:3], Greedy(), max_length=5)
    decoder(prefix, Greedy(), max_length=5)  # 3 and 4 images share the batch-4 loop
    assert len(decoder._compiled) == 1
    decoder(prefix, Beam(beam_size=2), max_length=5)
    decoder(prefix, Beam(beam_size=2), max_length=5)
    assert len(decoder._compiled) == 2


def test_early_exit_when_all_finished(tiny_models, stop_id):
    model = tiny_models["mlp"]
    prefix = model.prefix(random_embeddings(8, model.prefix_size, seed=3))
    out = model.decoder(prefix, Greedy(), max_length=60, stop_token_id=stop_id)
    assert out.steps == 60
    ends = [i for i, t in enumerate(out.tokens) if len(t[0]) < 60]
    assert ends
    out = model.decoder(prefix[ends], Greedy(), max_length=60, stop_token_id=stop_id)
    longest = max(len(t[0]) for t in out.tokens)
    assert longest < 60 and out.steps == longest


def first_token_probs(torch_model, model, embeddings, temperature=1.0):
    prefix = torch_prefix(torch_model, embeddings, model.config["normalize_prefix"])
    with torch.no_grad():
        logits = torch_model.gpt(inputs_embeds=prefix).logits[0, -1] / temperature
    return torch.softmax(logits.double(), -1).numpy()


def test_sampling_follows_the_distribution(tiny_checkpoints, tiny_models):
    """4000 first tokens drawn for one image match softmax(logits / T), restricted by top-k / top-p."""
    torch_model, model = tiny_checkpoints["mlp"][0], tiny_models["mlp"]
    e = random_embeddings(1, model.prefix_size, seed=7)
    n = 4000
    for kwargs in (dict(temperature=0.7), dict(top_k=5, temperature=1.5), dict(top_p=0.3)):
        t = kwargs.get("temperature", 1.0)
        p = first_token_probs(torch_model, model, e, t)
        if "top_k" in kwargs:
            p = np.where(p >= np.sort(p)[-kwargs["top_k"]], p, 0)
        if "top_p" in kwargs:
            order = np.argsort(-p)
            before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
            keep = np.zeros_like(p, bool)
            keep[order[before <= kwargs["top_p"]]] = True
            p = np.where(keep, p, 0)
            assert 1 < keep.sum() < len(p) // 2
        p = p / p.sum()
        out = model.generate(e, method="sample", max_length=1, num_captions=n, seed=11, stop_token=None, **kwargs)
        counts = np.bincount([c["tokens"][0] for c in out[0]], minlength=len(p))
        freq = counts / n
        assert np.all(counts[p == 0] == 0), kwargs
        assert np.abs(freq - p).max() <= 4 * np.sqrt(p.max() / n) + 1e-3, kwargs
        top = p > 0.02  # the likely tokens, each within 4 standard errors
        assert top.sum() >= 2 and np.all(np.abs(freq - p)[top] <= 4 * np.sqrt(p[top] * (1 - p[top]) / n)), kwargs


def assert_same_captions(a, b):
    """The same candidates (tokens and texts identical, scores within 1e-5): what one seed guarantees, whether
    a call runs uncompiled (the first of its shape under "auto") or compiled (the scores' last bits differ)."""
    assert [[(c["tokens"], c["text"]) for c in r] for r in a] == [[(c["tokens"], c["text"]) for c in r] for r in b]
    np.testing.assert_allclose([[c["score"] for c in r] for r in a], [[c["score"] for c in r] for r in b],
                               atol=1e-5, rtol=0)


def test_sampling_seeds_and_several_captions(tiny_models):
    model = tiny_models["linear"]
    e = random_embeddings(2, model.prefix_size, seed=8)
    kwargs = dict(method="sample", num_captions=4, max_length=12, temperature=1.5)
    a = model.generate(e, seed=1, **kwargs)
    assert_same_captions(a, model.generate(e, seed=1, **kwargs))
    assert model.generate(e, seed=1, **kwargs) == model.generate(e, seed=1, **kwargs)  # compiled: exact
    assert a != model.generate(e, seed=2, **kwargs)
    for candidates in a:
        assert len(candidates) == 4 and len({tuple(c["tokens"]) for c in candidates}) >= 3
        scores = [c["score"] for c in candidates]
        assert scores == sorted(scores, reverse=True)
    greedy = model.generate(e, max_length=12)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        picked = model.generate(e, method="sample", max_length=12, seed=3, **kw)
        assert [c[0]["tokens"] for c in picked] == [c[0]["tokens"] for c in greedy]


def test_arguments_are_checked(tiny_models):
    model = tiny_models["mlp"]
    e = random_embeddings(1, model.prefix_size)
    with pytest.raises(ValueError, match="method must be one of"):
        model.generate(e, method="nucleus")
    with pytest.raises(ValueError, match="exceeds beam_size"):
        model.generate(e, method="beam", beam_size=2, num_captions=3)
    with pytest.raises(ValueError, match="one caption per image"):
        model.generate(e, num_captions=2)
    with pytest.raises(ValueError, match="apply to method='sample'"):
        model.generate(e, top_p=0.9)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(e, method="sample", top_p=1.5)
    with pytest.raises(TokenizerError, match="not a single token"):
        model.generate(e, stop_token="riding a wave")
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(e, max_length=1000)
    with pytest.raises(ValueError, match=r"\(N, 24\)"):
        model.generate(np.zeros((2, 7), np.float32))


# ------------------------------------------------------------------------------- silent nonsense refused


def test_non_finite_embeddings_are_refused_naming_the_rows(tiny_models):
    """NaN / inf embeddings (also float64 values that overflow float32) gave '!!!!' captions with NaN scores."""
    model = tiny_models["mlp"]
    e = random_embeddings(4, model.prefix_size, seed=9).astype(np.float64)
    e[1, 3], e[2, 0] = np.nan, np.inf
    e[3, 5] = 1e39  # finite in float64, inf in float32
    for call in (model.generate, model.prefix, lambda x: model.generate(x, method="sample", seed=1)):
        with pytest.raises(ValueError, match=r"NaN or infinite values .* rows \[1, 2, 3\] \(of 4\)"):
            call(e)
    assert len(model.generate(e[:1], max_length=4)) == 1  # the finite row alone is fine


def test_zero_embedding_is_refused_when_the_mapper_normalises(tiny_models):
    model = tiny_models["transformer"]
    assert model.config["normalize_prefix"]
    e = random_embeddings(3, model.prefix_size, seed=10)
    e[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] \(of 3\) are all zeros"):
        model.generate(e, max_length=4)


def test_non_finite_prefix_is_refused_by_the_decoder(tiny_models):
    model = tiny_models["mlp"]
    prefix = np.array(model.prefix(random_embeddings(2, model.prefix_size, seed=11)))
    prefix[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.decoder(prefix, Greedy(), max_length=4)


BAD_TEMPERATURES = [float("nan"), float("inf"), 0.0, -1.0, 1e-30, True, "1"]


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("temperature", BAD_TEMPERATURES, ids=[repr(t) for t in BAD_TEMPERATURES])
def test_bad_temperatures_are_refused(method, temperature, tiny_models):
    model = tiny_models["mlp"]
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(random_embeddings(1, model.prefix_size), method=method, temperature=temperature,
                       max_length=4, beam_size=2)


def test_samplers_refuse_nan_temperature_themselves():
    for make in (lambda: Sample(temperature=float("nan")), lambda: Beam(temperature=float("nan")),
                 lambda: Sample(temperature=float("inf"))):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            make()
    with pytest.raises(ValueError, match="top_p must be a finite number"):
        Sample(top_p=float("nan"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="beam", beam_size=2.5), r"beam_size must be an integer, got 2.5 \(float\)"),
    (dict(method="beam", beam_size=3.0), r"beam_size must be an integer, got 3.0"),
    (dict(method="beam", beam_size=True), r"beam_size must be an integer, got True \(bool\)"),
    (dict(method="greedy", beam_size="5"), r"beam_size must be an integer"),
    (dict(method="beam", beam_size=0), r"beam_size=0: beam search needs at least one beam"),
    (dict(method="beam", beam_size=-2), r"beam_size must be >= 1, got -2"),
    (dict(max_length=2.5), r"max_length must be an integer, got 2.5"),
    (dict(max_length=0), r"max_length must be >= 1, got 0"),
    (dict(max_length=True), r"max_length must be an integer"),
    (dict(method="beam", num_captions=1.0), r"num_captions must be an integer, got 1.0"),
    (dict(method="sample", num_captions=0), r"num_captions must be >= 1"),
    (dict(method="sample", top_k=0), r"top_k must be >= 1"),
    (dict(method="sample", top_k=2.5), r"top_k must be an integer"),
    (dict(method="sample", top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(method="sample", top_p=float("nan")), r"top_p must be a finite number"),
    (dict(method="sample", seed=2**32), r"seed must be in \[0, 2\*\*32\)"),
    (dict(method="sample", seed=2**40), r"seed must be in \[0, 2\*\*32\)"),
    (dict(method="sample", seed=-1), r"seed must be in \[0, 2\*\*32\)"),
    (dict(method="sample", seed=1.5), r"seed must be an integer"),
    (dict(method="sample", seed=True), r"seed must be an integer"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_decoding_arguments_are_refused(kwargs, message, tiny_models):
    model = tiny_models["mlp"]
    with pytest.raises(ValueError, match=message):
        model.generate(random_embeddings(1, model.prefix_size), **{"max_length": 4, **kwargs})


def test_numpy_integers_are_accepted_and_32_bit_seeds_used_fully(tiny_models):
    model = tiny_models["linear"]
    e = random_embeddings(1, model.prefix_size, seed=12)
    kwargs = dict(method="sample", num_captions=np.int64(3), max_length=np.int32(10), temperature=np.float32(1.5),
                  top_k=np.int16(50))
    assert_same_captions(model.generate(e, seed=np.uint64(7), **kwargs), model.generate(e, seed=7, **kwargs))
    beam = model.generate(e, method="beam", beam_size=np.int64(3), num_captions=2, max_length=8)
    assert len(beam[0]) == 2
    # seeds of the upper half of 32 bits are their own seeds, not folded onto lower ones
    high = model.generate(e, seed=2**32 - 1, **kwargs)
    assert_same_captions(high, model.generate(e, seed=2**32 - 1, **kwargs))
    assert high != model.generate(e, seed=2**31 - 1, **kwargs)
    assert model.generate(e, seed=2**31 + 5, **kwargs) != model.generate(e, seed=5, **kwargs)


def test_decoder_refuses_non_integer_lengths_and_seeds(tiny_models):
    model = tiny_models["mlp"]
    prefix = model.prefix(random_embeddings(1, model.prefix_size))
    with pytest.raises(ValueError, match="max_length must be an integer"):
        model.decoder(prefix, Greedy(), max_length=3.7)
    with pytest.raises(ValueError, match="seed must be in"):
        model.decoder(prefix, Sample(), max_length=3, seed=2**33)
