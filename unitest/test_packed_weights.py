"""Matmuls that keep their weights packed (`custom_layers.packed_weights`), and the frozen weights they rest on.

Issue 24 (bf16 batched decoding >= 1.5x float32): TensorFlow's oneDNN matmul reordered each bfloat16 kernel
into AMX's blocked layout at every call (GPT-2's 48 block matmuls of a step, 16 rows: 19.5 ms, 13.0 ms
packed). `packed_linear` marks one node so that it packs its weight once; that is right only while the weight
never changes and the node always reads the same one, so a bfloat16 twin's weights are frozen and the node
must read a variable of the graph it is in.

Tolerances: float32 through the packed kernel equals TensorFlow's matmul to float32 rounding (1e-5 of the
largest output); bfloat16 outputs are rounded to 8 significant bits, so they are compared to the unpacked
bfloat16 kernel at 2^-7 of the largest output, and logits of the whole model to float32's at the bounds of
`unitest/test_precision.py` (5e-2 of the largest logit), no looser than the unpacked bfloat16 model's own
error plus that rounding.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from custom_architectures.generation_utils import Beam, Greedy, PrefixDecoder
from custom_architectures.transformers_arch.gpt2_arch import GPT2
from custom_layers import packed_weights
from custom_layers.inference_ops import gpt2_gelu
from custom_layers.linear import linear
from custom_layers.packed_weights import (
    FrozenWeightsError,
    freeze_weights,
    packed_linear,
    weights_frozen,
)
from models.precision import PRECISIONS, cast_model

needs_onednn = pytest.mark.skipif(not packed_weights.available(tf.float32),
                                  reason="oneDNN is off here (TF_ENABLE_ONEDNN_OPTS=0, a GPU, or not an x86 build)")
needs_onednn_bf16 = pytest.mark.skipif(not packed_weights.available(tf.bfloat16),
                                       reason="no oneDNN bfloat16 here (oneDNN off, or a CPU without it: AVX2 only)")

TINY = dict(vocab_size=97, n_positions=40, n_embd=64, n_layer=2, n_head=4)


def _relative(a, b):
    a, b = (np.asarray(tf.cast(t, tf.float32), np.float64) for t in (a, b))
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny_models():
    """(float32 GPT-2, its bfloat16 twin as precision="bfloat16" makes it: frozen)."""
    keras.utils.set_random_seed(3)
    model = GPT2(**TINY, initializer_range=0.2)  # large weights: logits far from uniform, errors visible
    return model, PRECISIONS["bfloat16"].apply(model)


@needs_onednn
@pytest.mark.parametrize("dtype, activation", [("float32", None), ("bfloat16", None),
                                               ("bfloat16", "gelu_approximate")])  # gpt2_gelu's bf16 form
def test_packed_linear_equals_matmul_and_bias(dtype, activation):
    """The packed kernel computes `custom_layers.linear.linear` (bias, and GELU-tanh fused), 2-D and 3-D."""
    if not packed_weights.available(dtype):
        pytest.skip("no oneDNN bfloat16 here (a CPU without it: AVX2 only)")
    rng = np.random.default_rng(0)
    kernel = tf.Variable(tf.cast(rng.normal(0, 0.05, (48, 64)), dtype))  # (out, in)
    bias = tf.Variable(tf.cast(rng.normal(0, 0.5, (48,)), dtype))
    fn = gpt2_gelu if activation else None
    for shape in ((6, 64), (2, 3, 64)):
        x = tf.cast(rng.normal(0, 1, shape), dtype)
        got = tf.function(lambda x: packed_linear(x, kernel.value(), bias.value(), activation))(x)
        want = tf.function(lambda x: linear(x, kernel.value(), bias.value(), fn))(x)
        assert got.shape == want.shape == (*shape[:-1], 48) and got.dtype == dtype
        assert _relative(got, want) <= (1e-5 if dtype == "float32" else 2**-7), _relative(got, want)


@needs_onednn
def test_packed_linear_keeps_the_first_weights_it_saw():
    """What packing means: the node reorders its weight once and keeps that copy, whatever the variable holds
    later (which is why only frozen weights are packed). Fails if TensorFlow stops honouring the mark: the
    decoder would then run the reorder at every step again, as before."""
    kernel = tf.Variable(tf.ones((8, 16)))
    bias = tf.Variable(tf.zeros((8,)))
    packed = tf.function(lambda x: packed_linear(x, kernel.value(), bias.value()))
    plain = tf.function(lambda x: linear(x, kernel.value(), bias.value()))
    x = tf.ones((4, 16))
    np.testing.assert_allclose(packed(x), plain(x))
    kernel.assign(2 * tf.ones((8, 16)))
    np.testing.assert_allclose(plain(x), 32 * np.ones((4, 8)))
    np.testing.assert_allclose(packed(x), 16 * np.ones((4, 8)))  # the first weights


@needs_onednn
def test_packed_linear_refuses_what_it_could_get_wrong():
    """Eagerly one kernel object serves every call of a shape, and a kernel passed into a function (one
    function shared by the blocks) reaches one node with every block's weights: both refused, as are an
    activation it cannot fuse and mixed dtypes."""
    kernel, bias = tf.Variable(tf.ones((8, 16))), tf.Variable(tf.zeros((8,)))
    x = tf.ones((4, 16))
    with pytest.raises(ValueError, match="traced graph"):
        packed_linear(x, kernel.value(), bias.value())
    with pytest.raises(ValueError, match="read from a variable"):
        tf.function(lambda x, k: packed_linear(x, k, bias.value()))(x, tf.ones((8, 16)))
    with pytest.raises(ValueError, match="activation"):
        tf.function(lambda x: packed_linear(x, kernel.value(), bias.value(), "relu"))(x)
    with pytest.raises(ValueError, match="bfloat16"):
        tf.function(lambda x: packed_linear(tf.cast(x, tf.bfloat16), kernel.value(), bias.value()))(x)


def test_a_bfloat16_twin_refuses_new_weights(tiny_models):
    """precision="bfloat16" freezes the twin: assign, set_weights and assign_add raise `FrozenWeightsError`
    naming the variable and what to do; reading works; the float32 model it came from is untouched."""
    model, twin = tiny_models
    assert weights_frozen(twin) and not weights_frozen(model)
    variable = twin.weights[0]
    before = variable.numpy()
    for change in (lambda: variable.assign(np.zeros_like(before)), lambda: variable.assign_add(before),
                   lambda: twin.set_weights([w * 0 for w in twin.get_weights()])):
        with pytest.raises(FrozenWeightsError, match=r"cast it again"):
            change()
    np.testing.assert_array_equal(variable.numpy(), before)
    model.weights[0].assign(model.weights[0])  # float32: assignable as ever
    assert weights_frozen(freeze_weights(twin))  # again: no-op
    unfrozen = cast_model(model, "bfloat16")
    assert not weights_frozen(unfrozen)


def test_trainer_refuses_a_bfloat16_model_before_training(tiny_model_dir, tmp_path):
    """Training writes its values into the model when it ends: a frozen twin would fail there, after the
    training; it fails at once instead, saying what to train."""
    from custom_train_objects.trainer import Trainer
    from hparams.training import TrainingHParams
    from models.image_captioning.clip_cap import ClipCap

    model = ClipCap.load(str(tiny_model_dir), precision="bf16")
    with pytest.raises(ValueError, match="train the float32 model"):
        Trainer(model, TrainingHParams(epochs=1), tmp_path / "out", progress=False)


def _step_logits(model, packed, prefix, ids):
    """Logits of 2 cached steps after a prefill, the steps traced (plain graph), packed or not."""
    step = tf.function(lambda x, cache, at: model.call_with_cache(x, cache, at, packed=packed))
    _, cache = model.prefill(prefix, prefix.shape[1] + ids.shape[1] - 1)
    out = []
    for t in range(ids.shape[1]):
        logits, cache = step(model.embed_tokens(ids[:, t : t + 1]), cache, tf.constant(prefix.shape[1] + t))
        out.append(logits.numpy())
    return np.stack(out, 1)


@needs_onednn_bf16
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_packed_steps_match_float32_as_the_unpacked_ones_do(tiny_models, size):
    """A cached step with every projection and the head packed gives the float32 model's logits within
    bfloat16's error (5e-2 of the largest logit, and no more than the unpacked bfloat16 step's error plus
    2^-7), at the tiny size and GPT-2 124M's; a second step still reads its own block's weights (a node given
    another block's weights would be off by O(1))."""
    if size == "tiny":
        model, twin = tiny_models
    else:
        keras.utils.set_random_seed(5)
        model = GPT2()
        twin = PRECISIONS["bfloat16"].apply(model)
    rng = np.random.default_rng(1)
    prefix = rng.normal(0, 1, (3, 4, model.n_embd)).astype(np.float32)
    ids = rng.integers(0, model.vocab_size, (3, 2))
    want = _step_logits(model, False, prefix, ids)
    unpacked = _step_logits(twin, False, prefix, ids)
    packed = _step_logits(twin, True, prefix, ids)
    error, unpacked_error = _relative(packed, want), _relative(unpacked, want)
    print(f"[bf16] {size}: packed vs float32 {error:.2e}, unpacked vs float32 {unpacked_error:.2e}")
    assert error < 5e-2 and error <= unpacked_error + 2**-7, (error, unpacked_error)
    assert _relative(packed, unpacked) <= 2 * 2**-7
    with pytest.raises(ValueError, match="frozen"):
        tf.function(lambda x, c: model.call_with_cache(x, c, 4, packed=True))(
            model.embed_tokens(ids[:, :1]), model.prefill(prefix, 5)[1])


@needs_onednn_bf16
def test_the_compiled_plain_graph_loop_packs_each_projection_once(tiny_models):
    """A bfloat16 twin's compiled loop (plain graph) packs the 4 projections of every block and the head in
    its steps, each node reading its own variable; the prefill keeps the shared traced block (unpacked). An
    unfrozen twin's loop packs nothing. Decoding gives the unfrozen twin's tokens and scores (same kernels'
    math, another blocking: scores within 2e-2)."""
    model, twin = tiny_models
    decoders = {"frozen": PrefixDecoder(twin, xla=False), "unfrozen": PrefixDecoder(cast_model(model, "bfloat16"),
                                                                                     xla=False)}
    assert decoders["frozen"].packs_weights() and not decoders["unfrozen"].packs_weights()
    prefix = np.random.default_rng(2).normal(0, 1, (2, 4, 64)).astype(np.float32)
    beam = Beam(beam_size=3)
    counts = {}
    for name, decoder in decoders.items():
        loop = decoder._function(decoder._key(2, 4, 6, beam), beam, compiled=True)
        graph = loop.get_concrete_function(tf.constant(prefix), tf.ones((2,), tf.bool), tf.constant(-1),
                                           tf.constant(0), tf.range(2)).graph
        nodes = [node for function in graph.as_graph_def().library.function for node in function.node_def
                 if node.op == "_MklNativeFusedMatMul"]
        assert all(node.attr["is_filter_const"].b for node in nodes)
        counts[name] = len(nodes)
    assert counts == {"frozen": 4 * TINY["n_layer"] + 1, "unfrozen": 0}
    for sampler in (Greedy(), beam):
        got, want = (decoders[name](prefix, sampler, max_length=6, jit_compile=True) for name in ("frozen",
                                                                                                   "unfrozen"))
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.scores, want.scores, atol=2e-2)
