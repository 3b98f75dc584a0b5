"""Opt-in bfloat16 (`models.precision`): the registry, ClipCap / CLIP loaded in bf16 close to float32, decoding
in bf16 (greedy, beam, sample), ``--precision`` on the command line, the one-line warning on a CPU without
bf16 instructions, and the float32 default left unchanged.

Tolerances: bfloat16 keeps 8 significant bits (a relative rounding step of 2^-8 = 3.9e-3); every weight and
every matmul input is rounded once, and the tiny models chain ~6 matmuls, so outputs differ from float32 by a
few 1e-3 relative (measured here: CLIP features 4e-3, GPT-2 logits 1.3e-2 of their largest value). The bounds
below (3e-2 features, 5e-2 logits, 0.1 nat of mean log-probability) leave room for that and for other CPUs'
kernels, and are still ten times below what a float32 model loaded as bf16 *without* float32 layer norms and
softmax would need if it went wrong (an unnormalised or saturated model differs by O(1)).
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import main
from models.precision import (
    PRECISIONS,
    precision_identity,
    precision_names,
    resolve_precision,
    warn_if_slow,
)

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "demo").glob("*.jpg"))

INTEL = "processor\t: 0\nmodel name\t: Intel Xeon 8481C\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AMD = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(float32, bfloat16) loads of the session's tiny MLP ClipCap."""
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import shared_tiny_model

    directory = str(shared_tiny_model(tmp_path_factory))
    return ClipCap.load(directory), ClipCap.load(directory, precision="bf16")


def _relative(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_registry_names_aliases_and_unknown():
    assert list(PRECISIONS)[:2] == ["float32", "bfloat16"]
    assert resolve_precision("bf16") is PRECISIONS["bfloat16"] is resolve_precision("bfloat16")
    assert resolve_precision(None).name == resolve_precision("fp32").name == "float32"
    assert {"fp32", "bf16"} <= set(precision_names())
    for bad in ("int4", "BF16", "half", 16, ""):
        with pytest.raises(ValueError, match="unknown precision .* expected one of float32, bfloat16"):
            resolve_precision(bad)
    identity = "sha256:" + "0" * 64
    assert precision_identity(identity, "float32") == identity and precision_identity(None, "bf16") is None
    assert precision_identity(identity, "bf16").startswith("sha256:") and precision_identity(identity, "bf16") != identity


def test_warning_only_where_the_cpu_lacks_bf16(tmp_path, caplog):
    (tmp_path / "intel").write_text(INTEL)
    (tmp_path / "amd").write_text(AMD)
    bf16 = PRECISIONS["bfloat16"]
    with caplog.at_level(logging.WARNING, logger="models.precision"):
        assert not warn_if_slow(bf16, tmp_path / "intel")
        assert not warn_if_slow(PRECISIONS["float32"], tmp_path / "amd")
        assert caplog.records == []
        assert warn_if_slow(bf16, tmp_path / "amd")
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "AMD EPYC 7B13" in line and "slower than float32" in line


def test_load_warns_once_on_a_cpu_without_bf16(tiny_model_dir, monkeypatch, caplog):
    """ClipCap.load(precision="bf16") on faked AVX2-only flags: one warning line for the model and its CLIP."""
    import models.precision as precision
    from models.image_captioning.clip_cap import ClipCap

    monkeypatch.setattr(precision, "cpu_info", lambda *a: ("AMD EPYC 7B13", {"avx2", "fma"}))
    with caplog.at_level(logging.WARNING, logger="models.precision"):
        model = ClipCap.load(str(tiny_model_dir), precision="bf16")
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert model.caption(PHOTOS[0], max_length=4)  # still runs
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_info", lambda *a: ("Intel Xeon 8481C", {"avx512_bf16", "amx_bf16"}))
    with caplog.at_level(logging.WARNING, logger="models.precision"):
        ClipCap.load(str(tiny_model_dir), precision="bf16")
        ClipCap.load(str(tiny_model_dir))
    assert caplog.records == []


def test_bf16_weights_cast_once_and_outputs_float32(tiny_pair):
    fp32, bf16 = tiny_pair
    assert fp32.precision == "float32" and bf16.precision == "bfloat16" and bf16.clip.precision == "bfloat16"
    assert {v.dtype for v in fp32.backbone.weights} == {"float32"}
    assert {v.dtype for v in bf16.backbone.weights} == {"bfloat16"}  # stored bf16: no cast per step
    assert {v.dtype for v in bf16.clip.visual.weights} == {"bfloat16"}
    assert not bf16.uses_xla and not bf16.decoder.xla and not bf16.clip.jit_compile  # graph mode: oneDNN's bf16
    assert fp32.uses_xla and fp32.decoder.xla
    embeddings = bf16.encode_images(PHOTOS)
    assert embeddings.dtype == np.float32 and bf16.prefix(embeddings).dtype == np.float32
    assert bf16.logits(embeddings, [[1, 2, 3]] * len(PHOTOS)).dtype == np.float32


def test_bf16_close_to_fp32(tiny_pair):
    fp32, bf16 = tiny_pair
    expected = fp32.encode_images(PHOTOS)
    assert _relative(bf16.encode_images(PHOTOS), expected) < 3e-2
    assert _relative(bf16.prefix(expected), fp32.prefix(expected)) < 3e-2
    ids = [[5, 17, 40, 2]] * len(PHOTOS)
    assert _relative(bf16.logits(expected, ids), fp32.logits(expected, ids)) < 5e-2


@pytest.mark.parametrize("method, options", [("greedy", {}), ("beam", {"beam_size": 3, "num_captions": 2}),
                                             ("sample", {"seed": 3, "top_k": 5, "num_captions": 2})])
def test_bf16_decoding(tiny_pair, method, options):
    """Every decoding method runs in bf16 (uncompiled first call, then the compiled graph), scores are float32
    mean log-probabilities close to float32's for the same tokens."""
    fp32, bf16 = tiny_pair
    embeddings = fp32.encode_images(PHOTOS)
    want = fp32.generate(embeddings, method=method, max_length=6, **options)
    for _ in range(2):  # "auto": eager then compiled
        got = bf16.generate(embeddings, method=method, max_length=6, **options)
    assert [len(c) for c in got] == [len(c) for c in want]
    vocab = bf16.gpt2.vocab_size
    same = 0
    for mine, theirs in zip(got, want):
        for a, b in zip(mine, theirs):
            assert isinstance(a["score"], float) and np.isfinite(a["score"]) and a["score"] <= 0
            assert all(0 <= t < vocab for t in a["tokens"])
            if a["tokens"] == b["tokens"]:
                same += 1
                assert abs(a["score"] - b["score"]) < 0.1
    assert same >= 1  # the tiny model's captions mostly agree; at least one must


def test_bf16_identity_and_no_save(tiny_pair, tmp_path):
    fp32, bf16 = tiny_pair
    assert bf16.identity == precision_identity(fp32.identity, "bfloat16") != fp32.identity
    with pytest.raises(ValueError, match="runs in bfloat16.*float32"):
        bf16.save(str(tmp_path / "copy"))
    with pytest.raises(ValueError, match="runs in bfloat16"):
        bf16.clip.save(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="only a float32 model changes precision"):
        bf16.to_precision("float32")
    assert not (tmp_path / "copy").exists()


def test_a_clip_shared_with_a_float32_model_stays_float32(tiny_model_dir):
    """``ClipCap.load(..., clip=a.clip, precision="bf16")`` cast ``a``'s CLIP in place: ``a`` then encoded in
    bfloat16 while its identity still said float32. The twin gets its own cast CLIP; and a float32 model given
    a bfloat16 CLIP is keyed apart from float32 results."""
    from models.image_captioning.clip_cap import ClipCap

    fp32 = ClipCap.load(str(tiny_model_dir))
    identity, before = fp32.identity, fp32.encode_images(PHOTOS[:1])
    bf16 = ClipCap.load(str(tiny_model_dir), clip=fp32.clip, precision="bf16")
    assert bf16.clip is not fp32.clip and bf16.clip.precision == "bfloat16"
    assert fp32.clip.precision == "float32" and fp32.identity == identity
    np.testing.assert_array_equal(fp32.encode_images(PHOTOS[:1]), before)
    assert bf16.identity != identity
    mixed = ClipCap.load(str(tiny_model_dir), clip=bf16.clip)  # float32 GPT-2 on bfloat16 features
    assert mixed.precision == "float32" and mixed.identity not in (identity, bf16.identity)


def test_unknown_precision_fails_before_loading(tmp_path):
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP

    for load in (ClipCap.load, CLIP.load):
        with pytest.raises(ValueError, match="unknown precision 'int4'"):
            load(str(tmp_path / "no_such_model"), precision="int4")  # not FileNotFoundError: checked first


def test_clip_load_bf16_with_lazy_text(tiny_model_dir):
    """CLIP.load(precision="bf16"): image and text features close to float32's, the lazily read text tower
    cast when read."""
    from models.siamese.clip import CLIP

    directory = str(Path(tiny_model_dir) / "clip")
    fp32, bf16 = CLIP.load(directory), CLIP.load(directory, lazy_text=True, precision="bfloat16")
    assert bf16.model.text is None and bf16.has_text
    texts = ["a photo of a cat", "a clock"]
    want, got = fp32.encode_text(texts), bf16.encode_text(texts)
    assert {v.dtype for v in bf16.model.text.weights} == {"bfloat16"} and got.dtype == np.float32
    assert _relative(got, want) < 3e-2
    assert _relative(bf16.encode_image(PHOTOS), fp32.encode_image(PHOTOS)) < 3e-2


@pytest.mark.usefixtures("isolated_home")
def test_cli_precision_flag(tiny_model_dir, tmp_path, capsys):
    """--precision bf16 through caption: captions, and results keyed apart from float32's in map.json (a
    float32 run is not answered from a bf16 one); an unknown name is a usage error."""
    out_dir = tmp_path / "out"
    args = ["caption", str(PHOTOS[0]), "--model", str(tiny_model_dir), "--output-dir", str(out_dir),
            "--max-length", "4", "--no-progress", "--json"]
    assert main.main([*args, "--precision", "bf16"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["caption"] and not result["cached"]
    stored = json.loads((out_dir / "map.json").read_text())
    identity = json.loads((Path(tiny_model_dir) / "metadata.json").read_text())["identity"]
    assert stored[str(PHOTOS[0])]["settings"]["model_identity"] == precision_identity(identity, "bfloat16")
    assert main.main(args) == 0  # float32: not taken from the bf16 entry
    (result,) = json.loads(capsys.readouterr().out)
    assert not result["cached"]
    assert main.main([*args, "--precision", "bfloat16"]) == 0  # the bf16 entry was replaced by float32's
    assert not json.loads(capsys.readouterr().out)[0]["cached"]
    with pytest.raises(SystemExit) as info:
        main.main([*args, "--precision", "int4"])
    assert info.value.code == 2 and "unknown precision 'int4'" in capsys.readouterr().err


def test_every_model_command_takes_precision():
    parser = main.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("caption", "batch", "serve", "export"):
        action = next(a for a in commands[name]._actions if "--precision" in a.option_strings)
        assert action.default is None and action.type("bf16") == "bfloat16" and action.type("int8") == "int8", name


@pytest.mark.usefixtures("isolated_home")
def test_export_official_refuses_bf16(tiny_model_dir, tmp_path, capsys):
    code = main.main(["export", str(tiny_model_dir), str(tmp_path / "m.pt"), "--precision", "bf16"])
    assert code == 2 and "--precision apply to --format savedmodel only" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_bf16_transformer_mapper(tiny_pair):
    """The transformer mapper (L2-normalised input, learned constant, its own attention) in bf16, built in
    memory with random weights (the tiny model's tokenizer)."""
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone, build_mapper
    from custom_architectures.transformers_arch.gpt2_arch import GPT2
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import random_embeddings

    tokenizer = tiny_pair[0].tokenizer
    mapper = build_mapper("transformer", prefix_size=32, prefix_length=4, clip_length=3, n_embd=64, num_layers=2,
                          num_heads=4)
    gpt2 = GPT2(vocab_size=tiny_pair[0].gpt2.vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    backbone = ClipCapBackbone(mapper, gpt2, normalize_prefix=True)
    fp32, bf16 = ClipCap(backbone, tokenizer), ClipCap(backbone, tokenizer).to_precision("bf16")
    assert fp32.backbone is backbone and bf16.backbone is not backbone  # a twin: the float32 one is untouched
    embeddings = random_embeddings(3, 32)
    assert _relative(bf16.prefix(embeddings), fp32.prefix(embeddings)) < 3e-2
    assert [len(c) for c in bf16.generate(embeddings, method="beam", beam_size=2, max_length=5)] == [1, 1, 1]


def test_export_savedmodel_bf16(tiny_pair, tmp_path):
    """A bf16 model exports (graph-mode mapper and loop): the embeddings signature gives generate's captions
    and records the precision in its metadata."""
    import tensorflow as tf

    from models.image_captioning.serving import export_savedmodel

    bf16 = tiny_pair[1]
    directory, metadata, _ = export_savedmodel(bf16, tmp_path / "export", max_length=5, max_batch_size=2)
    assert metadata["precision"] == "bfloat16"
    embeddings = tiny_pair[0].encode_images(PHOTOS[:2])
    got = tf.saved_model.load(directory).signatures["embeddings"](embeddings=tf.constant(embeddings))
    expected = bf16.generate(embeddings, max_length=5, compile_now=True)
    assert [c.decode() for c in got["captions"].numpy()] == [c[0]["text"] for c in expected]
    np.testing.assert_allclose(got["scores"].numpy(), [c[0]["score"] for c in expected], atol=1e-3)


def test_a_new_version_of_a_precision_keys_its_results_apart(monkeypatch):
    """How float32 weights become int8 (or bfloat16) is part of the identity: a changed quantizer bumps its
    `Precision.version`, and no result of the old weights answers the new."""
    import dataclasses

    from models import precision as registry

    identity = "sha256:" + "0" * 64
    before = registry.precision_identity(identity, "int8")
    monkeypatch.setitem(registry.PRECISIONS, "int8", dataclasses.replace(registry.PRECISIONS["int8"], version=2))
    assert registry.precision_identity(identity, "int8") != before
    assert registry.precision_identity(identity, "float32") == identity


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_head_ranks_its_largest_logits_in_float32(packed):
    """A trained GPT-2's logits share a large offset (its hidden states lean on wte's mean direction): at
    |logits| of 128-256 bfloat16's step is 1, so the head's rounded output ties the best tokens and the lowest
    id wins. A bf16 model's head recomputes each row's `REFINED_LOGITS` largest in float32: they equal the
    float32 dot products of the hidden state with the bf16 rows of wte and pick float32's best token; the
    rest stay as the matmul rounded them. ``packed``: the compiled steps' head (`custom_layers.packed_weights`),
    traced in a plain graph."""
    import tensorflow as tf

    from custom_architectures.transformers_arch.gpt2_arch import GPT2, REFINED_LOGITS
    from custom_layers import packed_weights
    from models.precision import _bfloat16

    if packed and not packed_weights.available(tf.bfloat16):
        pytest.skip("no packed bfloat16 head here (oneDNN off, or a CPU where it has no bfloat16: AVX2 only)")
    rng = np.random.default_rng(0)
    fp32 = GPT2(vocab_size=50257, n_positions=8, n_embd=64, n_layer=1, n_head=4)  # GPT-2's vocabulary: two stages
    spread = 0.3 * rng.standard_normal((50257, 64))
    fp32.wte.embeddings.assign((0.5 + spread - spread.mean(-1, keepdims=True)).astype(np.float32))
    bf16 = _bfloat16(fp32)
    hidden = (rng.standard_normal((24, 64)) + 6.0).astype(np.float32)  # logits 192 + N(0, 2.4): each row its own best
    head = tf.function(lambda h: bf16.lm_logits(h, packed=True)) if packed else bf16.lm_logits
    logits = np.asarray(head(tf.constant(hidden)))
    wte = bf16.wte.embeddings.value  # (V, C) bfloat16
    rounded = tf.cast(tf.matmul(tf.cast(hidden, tf.bfloat16), wte, transpose_b=True), tf.float32).numpy()
    exact = hidden.astype(np.float64) @ tf.cast(wte, tf.float64).numpy().T  # (N, V)
    assert 128 < exact.max() < 256
    assert (rounded.argmax(-1) != exact.argmax(-1)).mean() > 0.1  # the rounded head's pick: a tie's lowest id
    refined = tf.math.top_k(rounded, REFINED_LOGITS).indices.numpy()  # (N, 16)
    # float32 sums of 64 products at |logits| ~ 192 (one ulp: 1.5e-5): measured 9e-5, i.e. 4.7e-7 relative
    np.testing.assert_allclose(np.take_along_axis(logits, refined, -1), np.take_along_axis(exact, refined, -1),
                               rtol=1e-6, atol=0)
    np.testing.assert_array_equal(logits.argmax(-1), exact.argmax(-1))
    others = np.ones_like(exact, bool)
    np.put_along_axis(others, refined, False, -1)
    assert np.abs(logits - rounded)[others].max() <= 1.0 and (logits == rounded)[others].mean() > 0.99
