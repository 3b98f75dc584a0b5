"""precision="int8": GPT-2's blocks and tied LM head with int8 weights per output channel.

Quantization error bounds per channel, int8 logits close to float32 (stated tolerance), the cast kept inside a
compiled decoding loop (else the loop reads float32 weights and int8 gains nothing), greedy captions of the
tiny model against float32, save / load round trip, and the refusals (training, float32 from an int8 folder).
"""

import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from custom_architectures.quantization import is_quantized, quantize_gpt2
from custom_architectures.transformers_arch.gpt2_arch import GPT2
from custom_layers.quantized import QMAX, dequantize_rows, int8_matmul, quantize_rows
from testing.tiny_models import DEMO_DIR, random_embeddings
from unitest.hlo import greedy_loop_hlo

#: int8 logits against float32 on the small GPT-2 below: max |difference| over max |logit|. Each weight is off
#: by at most scale/2 = max|row|/254 (0.4 % of its row's largest), which through 2 blocks and the head
#: measured 0.8 %; 3 % leaves room and still fails for a wrong scale axis or a missing scale (~100 %).
LOGITS_RTOL = 0.03


@pytest.fixture(scope="module")
def gpt2_pair():
    keras.utils.set_random_seed(0)
    fp32 = GPT2(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    return fp32, quantize_gpt2(fp32)


def test_quantize_rows_error_bound_per_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 40)).astype(np.float32) * np.array([1e-3, 0.02, 1.0, 50.0, 0.0, 3.0], np.float32)[:, None]
    q, scale = quantize_rows(w)
    q, scale = q.numpy(), scale.numpy()
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (6,)
    assert np.abs(q.astype(np.int32)).max() <= QMAX
    np.testing.assert_allclose(scale[[0, 1, 2, 3, 5]], np.abs(w[[0, 1, 2, 3, 5]]).max(1) / QMAX, rtol=1e-6)
    assert (np.abs(q[[0, 1, 2, 3, 5]]).max(1) == QMAX).all()  # every row uses the full range
    assert scale[4] == 1.0 and (q[4] == 0).all()  # an all-zero row: no division by zero
    error = np.abs(w - dequantize_rows(q, scale).numpy())
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()  # per channel: half its own step


def test_quantize_rows_refuses_non_finite():
    with pytest.raises(ValueError, match="not finite"):
        quantize_rows(np.array([[1.0, np.nan]], np.float32))


def test_int8_matmul_matches_dequantized_product():
    rng = np.random.default_rng(1)
    q, scale = quantize_rows(rng.normal(size=(24, 16)).astype(np.float32))
    x = tf.constant(rng.normal(size=(2, 3, 16)).astype(np.float32))
    expected = np.einsum("btk,nk->btn", x.numpy(), dequantize_rows(q, scale).numpy())
    np.testing.assert_allclose(int8_matmul(x, q, scale).numpy(), expected, rtol=1e-5, atol=1e-5)
    compiled = tf.function(int8_matmul, jit_compile=True)(x, q, scale)
    np.testing.assert_allclose(compiled.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_quantized_gpt2_layout_and_config(gpt2_pair):
    fp32, int8 = gpt2_pair
    assert not is_quantized(fp32) and is_quantized(int8)
    assert "quantization" not in fp32.get_config()  # float configs (and so identities) unchanged
    assert int8.get_config()["quantization"] == "int8"
    dtypes = {v.path: v.dtype for v in int8.weights}
    assert dtypes["wte/embeddings_q"] == "int8" and dtypes["h_0/mlp/c_fc/kernel_q"] == "int8"
    assert tuple(int8.h[0].mlp.c_fc.kernel_q.shape) == (256, 64)  # (out, in): one scale per output channel
    assert tuple(int8.wte.embeddings_scale.shape) == (300,)  # the LM head: one scale per vocabulary row
    assert not [v for v in int8.trainable_weights if "_q" in v.path or "_scale" in v.path]


def test_int8_logits_close_to_float32(gpt2_pair):
    fp32, int8 = gpt2_pair
    ids = tf.constant([[5, 17, 42, 7, 99, 3]])
    full, full8 = fp32(token_ids=ids).numpy(), int8(token_ids=ids).numpy()
    assert np.abs(full - full8).max() <= LOGITS_RTOL * np.abs(full).max()
    assert np.abs(full - full8).max() > 0  # int8 indeed (a float copy would be exact)

    prefix = tf.constant(np.random.default_rng(2).normal(size=(1, 4, 64)).astype(np.float32))
    cached, _ = fp32.call_with_cache(prefix, fp32.init_cache(1, 16), 0)
    cached8, _ = int8.call_with_cache(prefix, int8.init_cache(1, 16), 0)
    assert np.abs(np.asarray(cached) - np.asarray(cached8)).max() <= LOGITS_RTOL * np.abs(np.asarray(cached)).max()
    # the traced block step (eager decoding) and the XLA-compiled step give int8's logits
    traced, _ = int8.call_with_cache(prefix, int8.init_cache(1, 16), 0, block_fn=int8.block_step_function())
    compiled = tf.function(lambda p: int8.call_with_cache(p, int8.init_cache(1, 16), 0)[0], jit_compile=True)(prefix)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(cached8), atol=1e-5)
    np.testing.assert_allclose(np.asarray(compiled), np.asarray(cached8), atol=1e-5)


def test_compiled_loop_reads_int8_weights(gpt2_pair):
    """The cast of the weights stays in the while loop: the loop's state holds the int8 kernels. (XLA hoists a
    cast of a loop-invariant tensor out of a loop; the loop then reads float32 copies, no faster than float32.)"""
    _, int8 = gpt2_pair

    hlo = greedy_loop_hlo(int8)
    bodies = [line for line in hlo.splitlines() if " while(" in line]
    assert bodies, "no while loop in the compiled decoding"
    for kernel in ("s8[192,64]", "s8[256,64]", "s8[64,256]"):  # c_attn, c_fc, mlp.c_proj: (out, in)
        assert any(kernel in line for line in bodies), f"{kernel} not carried into the loop: its cast was hoisted"


# ------------------------------------------------------------------ ClipCap
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import shared_tiny_model

    folder = shared_tiny_model(tmp_path_factory)
    return folder, ClipCap.load(str(folder)), ClipCap.load(str(folder), precision="int8")


def _tokens(model, embeddings, **kwargs):
    return [c[0]["tokens"] for c in model.generate(embeddings, max_length=20, **kwargs)]


def test_load_int8_quantizes_float_folder(tiny_pair):
    _, fp32, int8 = tiny_pair
    assert not is_quantized(fp32.gpt2) and is_quantized(int8.gpt2)
    for x, y in zip(fp32.mapper.weights, int8.mapper.weights, strict=True):  # only GPT-2 changes
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int8.clip is not None and int8.info == fp32.info
    assert int8.identity != fp32.identity  # another model: results never mixed


def test_int8_greedy_agrees_with_float32(tiny_pair):
    """Greedy tokens of int8 against float32 on the demo photos and random embeddings: identical here (the
    rates are printed with -s: exact captions, mean token agreement)."""
    _, fp32, int8 = tiny_pair
    photos = sorted(DEMO_DIR.glob("*.jpg"))
    embeddings = np.concatenate([fp32.encode_images([str(p) for p in photos]),
                                 random_embeddings(8, fp32.mapper.prefix_size, seed=3)])
    a, b = _tokens(fp32, embeddings), _tokens(int8, embeddings)
    exact = np.mean([x == y for x, y in zip(a, b, strict=True)])
    agree = np.mean([np.mean([s == t for s, t in zip(x, y, strict=False)] or [1.0]) for x, y in zip(a, b, strict=True)])
    print(f"int8 vs float32: exact {exact:.0%}, mean token agreement {agree:.1%} over {len(a)} captions")
    assert a == b, (exact, agree)  # measured: identical on all 13 (5 photos + 8 random embeddings)
    # compiled (XLA) and uncompiled int8 decoding give the same tokens
    assert _tokens(int8, embeddings, compile_now=True) == b


def test_int8_save_load_round_trip(tiny_pair, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    folder, _, int8 = tiny_pair
    saved = int8.save(str(tmp_path / "tiny8"))
    config = json.loads((tmp_path / "tiny8" / "config.json").read_text())
    assert '"quantization": "int8"' in json.dumps(config)
    with h5py.File(tmp_path / "tiny8" / "model.weights.h5", "r") as f:
        dtypes = set()
        f.visititems(lambda name, obj: dtypes.add(obj.dtype.name) if isinstance(obj, h5py.Dataset) else None)
    assert "int8" in dtypes  # int8 values and their scales, not float copies
    assert (tmp_path / "tiny8" / "model.weights.h5").stat().st_size < (folder / "model.weights.h5").stat().st_size
    for precision in (None, "int8"):  # as saved, or asked: the same int8 weights, not quantized again
        loaded = ClipCap.load(saved, precision=precision)
        assert is_quantized(loaded.gpt2)
        for x, y in zip(int8.gpt2.weights, loaded.gpt2.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    embeddings = random_embeddings(4, int8.mapper.prefix_size, seed=5)
    assert _tokens(loaded, embeddings) == _tokens(int8, embeddings)
    assert loaded.identity == int8.identity
    with pytest.raises(ValueError, match="int8 weights"):
        ClipCap.load(saved, precision="float32")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        ClipCap.load(saved, precision="int4")


def test_int8_refuses_training(tiny_pair, tmp_path):
    from custom_train_objects.trainer import Trainer
    from hparams.training import TrainingHParams

    _, _, int8 = tiny_pair
    with pytest.raises(ValueError, match="int8 weights.*inference only"):
        Trainer(int8, TrainingHParams(), tmp_path / "out", progress=False)
    with pytest.raises(RuntimeError, match="inference only"):
        int8.backbone(random_embeddings(1, int8.mapper.prefix_size), tf.constant([[1, 2]]), training=True)


def test_int8_is_one_entry_of_the_precision_registry(tiny_pair, tmp_path, capsys):
    """int8 comes from `models.precision.PRECISIONS` like bfloat16: keyed apart from float32 before any load
    (cached answers, Beam records), GPT-2 only (a CLIP refuses it), and ``--precision int8`` on the command line."""
    import main
    from models.image_captioning.identity import recorded_identity
    from models.precision import PRECISIONS, precision_identity

    folder, fp32, int8 = tiny_pair
    assert PRECISIONS["int8"].savable and not PRECISIONS["int8"].clip
    assert int8.precision == "int8" and int8.identity != fp32.identity
    assert int8.identity == precision_identity(recorded_identity(folder), "int8")  # what map.json / Beam key by
    assert int8.clip is fp32.clip or int8.clip.precision == "float32"
    with pytest.raises(ValueError, match="GPT-2 only"):
        int8.clip.to_precision("int8")
    image = str(DEMO_DIR / "astronaut.jpg")
    code = main.main(["caption", image, "--model", str(folder), "--precision", "int8", "--no-progress",
                      "--output-dir", str(tmp_path / "out"), "--max-length", "12"])
    assert code == 0
    out = capsys.readouterr().out
    assert int8.caption([image], max_length=12)[0] in out
