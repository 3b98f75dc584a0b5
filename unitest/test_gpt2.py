"""Keras GPT-2 against transformers' PyTorch GPT2LMHeadModel with the same random weights.

Two configurations: GPT-2 small (124M, built once per module) and a tiny one. Also: cached decoding equals
the full pass, the XLA-compiled step equals the eager one, greedy decoding gives PyTorch's ids, dropout only
in training, save/restore is exact.
"""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from custom_architectures.transformers_arch.gpt2_arch import GPT2
from unitest.hlo import greedy_loop_hlo
from unitest.parity import assert_close, max_abs_diff
from utils.convert.hf_gpt2 import load_gpt2

CONFIGS = {
    "tiny": dict(vocab_size=97, n_positions=40, n_embd=64, n_layer=2, n_head=4),
    "real": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def _pair(name, seed=0, initializer_range=0.02):
    torch.manual_seed(seed)
    config = GPT2Config(**CONFIGS[name], initializer_range=initializer_range)
    torch_model = GPT2LMHeadModel(config).eval()
    keras_model = load_gpt2(torch_model.state_dict(), n_head=config.n_head)
    return torch_model, keras_model


@pytest.fixture(scope="module", params=["tiny", "real"])
def pair(request):
    return (request.param, *_pair(request.param))


@pytest.fixture(scope="module")
def tiny_pair():
    return _pair("tiny", seed=1)


def _torch_logits(model, ids=None, embeds=None, mask=None):
    with torch.no_grad():
        if embeds is not None and ids is not None:
            embeds = torch.cat([torch.tensor(embeds), model.transformer.wte(torch.tensor(ids))], dim=1)
            ids = None
        kwargs = {"attention_mask": torch.tensor(mask)} if mask is not None else {}
        if ids is not None:
            return model(torch.tensor(ids), **kwargs).logits.numpy()
        return model(inputs_embeds=torch.as_tensor(embeds), **kwargs).logits.numpy()


def _assert_close(out, ref, atol=1e-4, rtol_of_max=1e-5):
    diff = max_abs_diff(out, ref)
    print(f"[parity] GPT-2 {out.shape}: max abs logits diff {diff:.2e}")  # reported with `pytest -s`
    assert_close(out, ref, atol, "GPT-2 logits")
    # random-init logits are small: also check the error relative to their scale
    assert diff <= rtol_of_max * np.abs(ref).max() + 1e-7, f"relative diff {diff / np.abs(ref).max()}"


def test_token_input_matches_torch(pair):
    name, torch_model, keras_model = pair
    ids = np.random.default_rng(0).integers(0, CONFIGS[name]["vocab_size"], (2, 9))
    ref = _torch_logits(torch_model, ids=ids)
    assert np.abs(ref).max() > 0.5  # meaningful scale
    _assert_close(keras_model(token_ids=ids).numpy(), ref)


def test_embedding_input_matches_torch(pair):
    name, torch_model, keras_model = pair
    embeds = np.random.default_rng(1).normal(size=(2, 6, CONFIGS[name]["n_embd"])).astype("float32")
    _assert_close(keras_model(inputs_embeds=embeds).numpy(), _torch_logits(torch_model, embeds=embeds))


def test_prefix_then_tokens_matches_torch(pair):
    name, torch_model, keras_model = pair
    rng = np.random.default_rng(2)
    embeds = rng.normal(size=(2, 4, CONFIGS[name]["n_embd"])).astype("float32")
    ids = rng.integers(0, CONFIGS[name]["vocab_size"], (2, 5))
    out = keras_model(token_ids=ids, inputs_embeds=embeds).numpy()
    assert out.shape == (2, 9, CONFIGS[name]["vocab_size"])
    _assert_close(out, _torch_logits(torch_model, ids=ids, embeds=embeds))


def test_right_padded_batch_matches_torch(pair):
    name, torch_model, keras_model = pair
    lengths = [8, 5, 2]
    ids = np.random.default_rng(3).integers(0, CONFIGS[name]["vocab_size"], (3, 8))
    mask = (np.arange(8)[None] < np.array(lengths)[:, None]).astype("int64")
    ids = np.where(mask == 1, ids, 0)  # pad id: any valid id
    out = keras_model(token_ids=ids, padding_mask=mask).numpy()
    ref = _torch_logits(torch_model, ids=ids, mask=mask)
    for row, n in enumerate(lengths):
        _assert_close(out[row, :n], ref[row, :n])
        # a padded row equals the same sequence run alone
        alone = keras_model(token_ids=ids[row : row + 1, :n]).numpy()[0]
        np.testing.assert_allclose(out[row, :n], alone, atol=1e-5)


def test_cached_decoding_equals_full_pass(pair):
    name, _, keras_model = pair
    rng = np.random.default_rng(4)
    prefix = rng.normal(size=(2, 3, CONFIGS[name]["n_embd"])).astype("float32")
    ids = rng.integers(0, CONFIGS[name]["vocab_size"], (2, 5))
    full = keras_model(token_ids=ids, inputs_embeds=prefix).numpy()  # (2, 8, V)

    cache = keras_model.init_cache(batch_size=2, max_length=10)
    logits, cache = keras_model.call_with_cache(prefix, cache, 0, all_logits=True)
    np.testing.assert_allclose(logits.numpy(), full[:, :3], atol=1e-5, rtol=0)
    for t in range(5):
        step_in = keras_model.embed_tokens(ids[:, t : t + 1])
        logits, cache = keras_model.call_with_cache(step_in, cache, 3 + t)
        assert logits.shape == (2, CONFIGS[name]["vocab_size"])
        np.testing.assert_allclose(logits.numpy(), full[:, 3 + t], atol=1e-5, rtol=0)


def test_traced_block_step_equals_the_default_path(pair):
    """`GPT2.block_step_function` (the uncompiled decoder's one traced block, reused by every block): the same
    logits and cache as the default path for the prefill and each step (<= 1e-5), and PyTorch's (<= 1e-4)."""
    name, torch_model, keras_model = pair
    rng = np.random.default_rng(6)
    prefix = rng.normal(size=(2, 3, CONFIGS[name]["n_embd"])).astype("float32")
    ids = rng.integers(0, CONFIGS[name]["vocab_size"], (2, 4))
    reference = _torch_logits(torch_model, ids=ids, embeds=prefix)  # (2, 7, V)
    block_fn = keras_model.block_step_function()
    default_cache, traced_cache = keras_model.init_cache(2, 8), keras_model.init_cache(2, 8)
    default, default_cache = keras_model.call_with_cache(prefix, default_cache, 0, all_logits=True)
    traced, traced_cache = keras_model.call_with_cache(prefix, traced_cache, 0, all_logits=True, block_fn=block_fn)
    assert_close(traced, default, 1e-5, "prefill logits, traced block vs default")
    _assert_close(traced.numpy(), reference[:, :3])
    for t in range(4):
        x = keras_model.embed_tokens(ids[:, t : t + 1])
        default, default_cache = keras_model.call_with_cache(x, default_cache, 3 + t)
        traced, traced_cache = keras_model.call_with_cache(x, traced_cache, 3 + t, block_fn=block_fn)
        assert_close(traced, default, 1e-5, f"step {t} logits, traced block vs default")
        _assert_close(traced.numpy(), reference[:, 3 + t])
    for a, b in zip(tf.nest.flatten(traced_cache), tf.nest.flatten(default_cache), strict=True):
        assert_close(a, b, 1e-5, "cache, traced block vs default")


def test_xla_step_equals_eager(tiny_pair):
    _, keras_model = tiny_pair
    rng = np.random.default_rng(5)
    prefix = rng.normal(size=(3, 4, 64)).astype("float32")
    ids = rng.integers(0, 97, (3, 4))
    step = tf.function(keras_model.call_with_cache, jit_compile=True)
    eager_cache = keras_model.init_cache(3, 12)
    xla_cache = keras_model.init_cache(3, 12)
    eager, eager_cache = keras_model.call_with_cache(prefix, eager_cache, 0)
    xla, xla_cache = step(tf.constant(prefix), xla_cache, tf.constant(0))
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), atol=1e-5, rtol=0)
    for t in range(4):
        x = keras_model.embed_tokens(ids[:, t : t + 1])
        eager, eager_cache = keras_model.call_with_cache(x, eager_cache, 4 + t)
        xla, xla_cache = step(x, xla_cache, tf.constant(4 + t))
        np.testing.assert_allclose(xla.numpy(), eager.numpy(), atol=1e-5, rtol=0)
    for a, b in zip(tf.nest.flatten(xla_cache), tf.nest.flatten(eager_cache), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0)
    # one trace for the prefix shape, one for the single-token shape: the index does not retrace
    assert step.experimental_get_tracing_count() == 2


def test_prefill_shares_the_prefix_and_reorder_follows_the_parents(tiny_pair):
    """`GPT2.prefill(rows=W)`: the prefix's keys/values stored once per image, W rows decoding from it; after
    `reorder_cache` each row's logits equal a full pass over its parent's sequence then its own token, as
    beam search needs (rows of image 1 reordered too: the rows of each image stay its own)."""
    _, keras_model = tiny_pair
    rng = np.random.default_rng(6)
    prefix = rng.normal(size=(2, 4, 64)).astype("float32")
    first, second = rng.integers(0, 97, (6, 1)), rng.integers(0, 97, (6, 1))
    parents = np.array([2, 2, 0, 4, 3, 3])
    _, cache = keras_model.prefill(prefix, 8, rows=3)
    assert cache.layers[0][0].shape == (2, 4, 4, 16) and cache.layers[0][2].shape == (2, 4, 4 * 3, 16)
    _, cache = keras_model.call_with_cache(keras_model.embed_tokens(first), cache, 4)
    reordered = keras_model.reorder_cache(cache, parents)
    logits, _ = keras_model.call_with_cache(keras_model.embed_tokens(second), reordered, 5)
    full = keras_model(token_ids=np.concatenate([first[parents], second], axis=1),
                       inputs_embeds=np.repeat(prefix, 3, axis=0)).numpy()[:, -1]  # (6, V)
    np.testing.assert_allclose(logits.numpy(), full, atol=1e-5, rtol=0)


def test_merged_prefill_keeps_the_prefix_in_the_row_slots(pair):
    """One row per prefix (greedy, sampling): ``prefill(merged=True)`` leaves the prefix's keys/values in the
    row's first K slots of a cache with no context, so that a step's attention reads one segment (issue 24:
    half the small batched matmuls of a bf16 greedy step). The same logits as PyTorch's (<= 1e-4) and as the
    default layout (<= 1e-5), row and column forms, written in place or not; several rows are refused."""
    name, torch_model, keras_model = pair
    rng = np.random.default_rng(11)
    prefix = rng.normal(size=(2, 3, CONFIGS[name]["n_embd"])).astype("float32")
    ids = rng.integers(0, CONFIGS[name]["vocab_size"], (2, 2))
    reference = _torch_logits(torch_model, ids=ids, embeds=prefix)  # (2, 5, V)
    for form in ("rows", "columns", "inplace"):
        inplace = form == "inplace"
        logits, cache = keras_model.prefill(prefix, 6, merged=True, inplace=inplace)
        _, default = keras_model.prefill(prefix, 6)
        assert cache.context_length == 0 and cache.slots == 6 and default.context_length == 3
        _assert_close(logits.numpy(), reference[:, 2])
        for t in range(2):
            x = keras_model.embed_tokens(ids[:, t : t + 1])
            logits, cache = keras_model.call_with_cache(x, cache, 3 + t, columns=form == "columns", inplace=inplace)
            expected, default = keras_model.call_with_cache(x, default, 3 + t)
            assert_close(logits, expected, 1e-5, f"{form}, step {t}: merged vs default layout")
            _assert_close(logits.numpy(), reference[:, 3 + t])
    with pytest.raises(ValueError, match="merged"):
        keras_model.prefill(prefix, 6, rows=2, merged=True)


def test_reorder_cache_moves_no_keys(tiny_pair):
    """Beam search's reorder copies no cache (issue 24: a gather of the loop-carried keys cost a cache-sized
    copy per step and block): the keys/values are the same tensors after it, only the (B, W, L) sources move;
    a parent from another image is refused."""
    _, keras_model = tiny_pair
    _, cache = keras_model.prefill(np.zeros((2, 4, 64), "float32"), 8, rows=3)
    reordered = keras_model.reorder_cache(cache, [1, 1, 0, 3, 5, 5])
    for kept, before in zip(tf.nest.flatten(reordered.layers), tf.nest.flatten(cache.layers), strict=True):
        assert kept is before
    with pytest.raises(ValueError, match="same prefix"):
        keras_model.reorder_cache(cache, [3, 1, 0, 3, 5, 5])


def test_cache_bounds_are_checked(tiny_pair):
    _, keras_model = tiny_pair
    with pytest.raises(ValueError, match="n_positions"):
        keras_model.init_cache(1, 41)
    cache = keras_model.init_cache(1, 5)
    with pytest.raises(ValueError, match="do not fit"):
        keras_model.call_with_cache(np.zeros((1, 2, 64), "float32"), cache, 4)
    with pytest.raises(ValueError, match="token_ids, inputs_embeds"):
        keras_model()
    prefix = np.zeros((1, 4, 64), "float32")
    with pytest.raises(ValueError, match="prefix's 4 positions"):
        keras_model.prefill(prefix, 3)
    with pytest.raises(ValueError, match="rows must be"):
        keras_model.prefill(prefix, 8, rows=0)
    _, cache = keras_model.prefill(prefix, 8, rows=2)  # positions [4, 8) after the context
    with pytest.raises(ValueError, match="do not fit"):
        keras_model.call_with_cache(np.zeros((2, 1, 64), "float32"), cache, 3)


def test_greedy_20_tokens_same_ids_as_torch():
    # Large random weights make next-token decisions clear-cut (random GPT-2 logits are near-ties).
    torch_model, keras_model = _pair("tiny", seed=3, initializer_range=0.3)
    batch, prefix_len, steps = 2, 3, 20
    prefix = np.random.default_rng(7).normal(size=(batch, prefix_len, 64)).astype("float32")

    # PyTorch: full recomputation at each step, no cache, so both implementations are independent.
    embeds = torch.tensor(prefix)
    torch_ids, margins = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = torch_model(inputs_embeds=embeds).logits[:, -1]
            top2 = torch.topk(logits, 2).values
            margins.append((top2[:, 0] - top2[:, 1]).min().item())
            nxt = logits.argmax(-1)
            torch_ids.append(nxt.numpy())
            embeds = torch.cat([embeds, torch_model.transformer.wte(nxt)[:, None]], dim=1)
    torch_ids = np.stack(torch_ids, axis=1)
    assert min(margins) > 1e-3, f"near-tie in the reference (margin {min(margins)}): the test would be moot"
    assert len(np.unique(torch_ids)) > 3  # a varied continuation, not one repeated token

    @tf.function(jit_compile=True)
    def greedy(prefix):
        logits, cache = keras_model.call_with_cache(prefix, keras_model.init_cache(batch, prefix_len + steps), 0)
        ids = tf.TensorArray(tf.int32, size=steps)

        def body(i, logits, cache, ids):
            nxt = tf.argmax(logits, -1, output_type=tf.int32)
            logits, cache = keras_model.call_with_cache(
                keras_model.embed_tokens(nxt[:, None]), cache, prefix_len + i
            )
            return i + 1, logits, cache, ids.write(i, nxt)

        _, _, _, ids = tf.while_loop(lambda i, *_: i < steps, body, (tf.constant(0), logits, cache, ids))
        return tf.transpose(ids.stack())

    np.testing.assert_array_equal(greedy(tf.constant(prefix)).numpy(), torch_ids)


def test_dropout_only_in_training():
    model = GPT2(**CONFIGS["tiny"], embd_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2)
    ids = np.random.default_rng(8).integers(0, 97, (2, 6))
    eval_a, eval_b = model(token_ids=ids).numpy(), model(token_ids=ids, training=False).numpy()
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_b = model(token_ids=ids, training=True).numpy(), model(token_ids=ids, training=True).numpy()
    assert np.abs(train_a - eval_a).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3


def test_save_restore_exact(tmp_path, tiny_pair):
    _, model = tiny_pair
    (tmp_path / "config.json").write_text(json.dumps(model.get_config()))
    model.save_weights(str(tmp_path / "gpt2.weights.h5"))
    restored = GPT2.from_config(json.loads((tmp_path / "config.json").read_text()))
    restored.load_weights(str(tmp_path / "gpt2.weights.h5"))
    assert restored.get_config() == model.get_config()
    assert [w.path for w in restored.weights] == [w.path for w in model.weights]
    for a, b in zip(restored.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    ids = np.random.default_rng(9).integers(0, 97, (2, 5))
    np.testing.assert_array_equal(restored(token_ids=ids).numpy(), model(token_ids=ids).numpy())


def test_projection_kernels_are_out_in_and_read_so_by_the_compiled_step(tiny_pair):
    """The blocks' projections hold their kernels (out, in), as torch's nn.Linear (converted from HF's (in, out)
    Conv1D), and the compiled decoding loop multiplies by them with ``transpose_b``: no (in, out) copy of a
    kernel exists in its program (an (in, out) kernel is slower to read at 16-80 rows: `custom_layers.linear`)."""
    torch_model, model = tiny_pair
    block, hf_block = model.h[1], torch_model.transformer.h[1]
    for layer, hf_layer in ((block.attn.c_attn, hf_block.attn.c_attn), (block.attn.c_proj, hf_block.attn.c_proj),
                            (block.mlp.c_fc, hf_block.mlp.c_fc), (block.mlp.c_proj, hf_block.mlp.c_proj)):
        np.testing.assert_array_equal(layer.kernel.numpy(), hf_layer.weight.detach().numpy().T)

    hlo = greedy_loop_hlo(model)
    assert "f32[192,64]" in hlo  # c_attn (3C, C), read as stored
    assert "f32[64,192]" not in hlo  # ...and never transposed to (C, 3C)


def _loop_body_hlo(hlo):
    """The text of the while loop's body computation in an optimized HLO module."""
    body = re.search(r"\bwhile\(.*?body=(%[\w.\-]+)", hlo).group(1)
    start = hlo.index(f"\n{body} ")
    return hlo[start : hlo.index("\n}", start)]


@pytest.mark.parametrize("images", [2, 16], ids=["6_rows_column_form", "48_rows_row_form"])
def test_compiled_beam_step_copies_no_cache(tiny_pair, images):
    """Issue 24: in the compiled beam loop, a step writes the cache in place and copies none of it. Per step
    and block, the only instructions as large as a layer's keys are the two in-place writes (keys, values):
    the old tail reorder gathered the loop-carried cache and XLA copied it (cache-sized copies each step).
    Both forms of the step (`cached_column_step` up to 32 rows, `cached_block_step` above)."""
    from custom_architectures.generation_utils import Beam, PrefixDecoder

    _, keras_model = tiny_pair
    decoder, beam, max_length = PrefixDecoder(keras_model), Beam(beam_size=3), 12
    loop = decoder._function(decoder._key(images, 4, max_length, beam), beam, compiled=True)  # as the decoder compiles
    args = (tf.zeros((images, 4, 64)), tf.ones((images,), tf.bool), tf.constant(-1), tf.constant(0),
            tf.range(images))  # the images' draw ids, as the decoder passes them
    body = _loop_body_hlo(loop.experimental_get_compiler_ir(*args)(stage="optimized_hlo"))
    layer_elements = images * 4 * 3 * (max_length - 1) * 16  # (B, H, W * L, D) of one layer's keys
    large = []  # (op, name) of every instruction writing as many elements as a layer's keys, or more
    for line in body.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\S+?)\(", line)
        moves = match and match.group(3) not in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")
        if moves and np.prod([int(d) for d in match.group(2).split(",") if d]) >= layer_elements:
            large.append((match.group(3), match.group(1)))
    assert len(large) == 2 * keras_model.n_layer, large
    # each a fusion rooted in the in-place write (a name may show a fused transpose of the small update as
    # "copy_": the column form's keys come from a transpose); a copy of a cache would be an instruction of its own
    assert all(op == "fusion" and name.split(".")[0].endswith("dynamic-update-slice_fusion") for op, name in large), large


def test_compiled_loop_traces_one_block_function(tiny_pair, monkeypatch):
    """Issue 24 (tiering): the compiled decoding loop is traced with one block function that every block calls
    (traced once per chunk shape: the prefill's and the step's), not the blocks inlined one by one. A loop that
    inlined 2 x 12 blocks took 1.6-1.9 s of Python to trace, and an uncompiled call running beside that
    background trace waited for the GIL; tokens are those of the uncompiled loop."""
    from custom_architectures.generation_utils import Greedy, PrefixDecoder
    from custom_architectures.transformers_arch import gpt2_arch
    from custom_layers import gpt2_block
    from unitest.tracing import record_traces

    _, keras_model = tiny_pair
    assert keras_model.n_layer >= 2
    traced = record_traces(monkeypatch, gpt2_block.cached_block_step, gpt2_block, gpt2_arch)
    column_traced = record_traces(monkeypatch, gpt2_block.cached_column_step, gpt2_block, gpt2_arch)
    prefix = np.random.default_rng(3).normal(0, 1, (2, 4, keras_model.n_embd)).astype(np.float32)
    decoder = PrefixDecoder(keras_model)
    compiled = decoder(prefix, Greedy(), max_length=6, jit_compile=True)
    # the prefill's chunk and the step's (2 rows: in column form), each traced once
    assert traced == [False] and column_traced == [False], (traced, column_traced)
    assert compiled.tokens == PrefixDecoder(keras_model)(prefix, Greedy(), max_length=6, jit_compile=False).tokens


def _graph_ops(concrete):
    """Op types of a concrete function's graph and of every function it calls (a while loop's body...)."""
    graph_def = concrete.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def test_inplace_cache_writes_equal_copies_and_write_the_buffer_passed_in(tiny_pair):
    """Issue 24 (bf16 decoding): outside XLA a ``dynamic_update_slice`` copies the whole cache at every write
    (263 ms of a 2.0 s bfloat16 beam call). ``prefill(inplace=True)`` / ``call_with_cache(inplace=True)``
    write into the cache's own buffer: the same logits and caches as the copying path, the traced block's
    (``block_step_function(inplace=True)``) too, and the cache passed in *is* the one returned (it holds the
    new keys). An out-of-range start is clamped as ``dynamic_update_slice`` clamps it (``InplaceUpdate``
    itself wraps an out-of-range row around, into another head's slots)."""
    from custom_layers.gpt2_block import write_slots

    _, keras_model = tiny_pair
    rng = np.random.default_rng(8)
    prefix = rng.normal(size=(2, 4, 64)).astype("float32")
    ids = rng.integers(0, 97, (6, 3))
    for block_fn in (None, keras_model.block_step_function(inplace=True)):
        copied_logits, copied = keras_model.prefill(prefix, 8, rows=3)
        logits, cache = keras_model.prefill(prefix, 8, rows=3, inplace=True, block_fn=block_fn)
        np.testing.assert_array_equal(logits.numpy(), copied_logits.numpy())
        for t in range(3):
            x = keras_model.embed_tokens(ids[:, t : t + 1])
            copied_logits, copied = keras_model.call_with_cache(x, copied, 4 + t)
            before = cache
            logits, cache = keras_model.call_with_cache(x, cache, 4 + t, inplace=True, block_fn=block_fn)
            np.testing.assert_allclose(logits.numpy(), copied_logits.numpy(), atol=1e-6, rtol=0)
            for old, new in zip(tf.nest.flatten(before.layers), tf.nest.flatten(cache.layers), strict=True):
                np.testing.assert_array_equal(old.numpy(), new.numpy())  # written in the buffer passed in
        for a, b in zip(tf.nest.flatten(cache), tf.nest.flatten(copied), strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)
    update = tf.reshape(tf.range(1, 17, dtype=tf.float32), (1, 2, 2, 4))
    for start in (-1, 0, 1, 2, 5):  # out of range: clamped as dynamic_update_slice clamps, never outside
        cache = tf.raw_ops.Empty(shape=[1, 2, 3, 4], dtype=tf.float32, init=True)
        written = write_slots(cache, tf.constant(start), update, inplace=True)
        np.testing.assert_array_equal(written.numpy(), write_slots(tf.zeros((1, 2, 3, 4)), tf.constant(start), update))


def test_plain_graph_loop_writes_in_place_with_a_cache_per_call(tiny_pair):
    """The plain-graph decoding loop (a bfloat16 model's, ``PrefixDecoder(xla=False)``) writes its cache with
    ``InplaceUpdate`` and never runs ``XlaDynamicUpdateSlice`` (a whole-cache copy per write); its caches are
    made at each run (``Empty``, never folded into a shared constant): two threads running the same loop at
    once get the tokens each gets alone (with ``tf.zeros``, folded into one constant, they do not)."""
    import threading

    from custom_architectures.generation_utils import Beam, PrefixDecoder

    _, keras_model = tiny_pair
    decoder, beam = PrefixDecoder(keras_model, xla=False), Beam(beam_size=3)
    rng = np.random.default_rng(4)
    prefixes = [rng.normal(0, 1, (2, 4, 64)).astype(np.float32) for _ in range(2)]
    loop = decoder._function(decoder._key(2, 4, 10, beam), beam, compiled=True)
    ops = _graph_ops(loop.get_concrete_function(tf.constant(prefixes[0]), tf.ones((2,), tf.bool), tf.constant(-1),
                                                tf.constant(0), tf.range(2)))
    assert "InplaceUpdate" in ops and "Empty" in ops and "XlaDynamicUpdateSlice" not in ops, sorted(ops)
    alone = [decoder(p, beam, max_length=10).tokens for p in prefixes]
    assert alone[0] != alone[1]
    results = [[None] * 2 for _ in range(4)]

    def run(i):
        for j in range(4):
            results[j][i] = decoder(prefixes[i], beam, max_length=10).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == alone for result in results)


def test_guided_decoding_outside_xla_writes_its_cache_in_place(tiny_pair):
    """MAGIC's default steps (`GuidedDecoder`, a plain graph) write their cache of B * k rows in place, as the
    decoder's plain-graph loop does: a copying write moved the whole cache at each step and block."""
    from custom_architectures.guided_decoding import GuidedDecoder

    _, keras_model = tiny_pair
    prefill, propose, _ = GuidedDecoder(keras_model)._step_functions(False)
    prefix = tf.constant(np.random.default_rng(2).normal(0, 1, (2, 4, 64)).astype(np.float32))
    logits, context, cache = prefill(prefix, 10, 3)
    for ops in (_graph_ops(prefill.get_concrete_function(prefix, 10, 3)),
                _graph_ops(propose.get_concrete_function(logits, cache, context, tf.constant(4), 3))):
        assert "InplaceUpdate" in ops and "XlaDynamicUpdateSlice" not in ops, sorted(ops)


def test_column_step_equals_the_row_step(pair):
    """Issue 24 (greedy vs transformers): at a few rows XLA's CPU matmul runs ``kernel @ x^T`` faster than
    ``x @ kernel^T`` (GPT-2 124M's 48 block matmuls of a step: 32.9 -> 27.8 ms at 16 rows), so the compiled
    loop's steps keep the activations as columns (`cached_column_step`). The same logits and caches as the
    row form (<= 1e-5, beams included) and PyTorch's (<= 1e-4), eager and under XLA; what it does not take
    (several tokens, int8 kernels, writes in place) is refused."""
    name, torch_model, keras_model = pair
    n_embd = CONFIGS[name]["n_embd"]
    rng = np.random.default_rng(9)
    prefix = rng.normal(size=(2, 3, n_embd)).astype("float32")
    ids = rng.integers(0, CONFIGS[name]["vocab_size"], (2, 2))
    reference = _torch_logits(torch_model, ids=ids, embeds=prefix)  # (2, 5, V)
    step = tf.function(lambda x, cache, at: keras_model.call_with_cache(
        x, cache, at, columns=True, block_fn=keras_model.block_step_function(columns=True)), jit_compile=True)
    for columns in (lambda x, cache, at: keras_model.call_with_cache(x, cache, at, columns=True), step):
        _, rows_cache = keras_model.prefill(prefix, 6)
        column_cache = rows_cache
        for t in range(2):
            x = keras_model.embed_tokens(ids[:, t : t + 1])
            expected, rows_cache = keras_model.call_with_cache(x, rows_cache, 3 + t)
            logits, column_cache = columns(x, column_cache, tf.constant(3 + t))
            assert_close(logits, expected, 1e-5, f"step {t}, column vs row form")
            _assert_close(logits.numpy(), reference[:, 3 + t])
        for a, b in zip(tf.nest.flatten(column_cache), tf.nest.flatten(rows_cache), strict=True):
            assert_close(a, b, 1e-5, "cache, column vs row form")
    _, beams = keras_model.prefill(prefix, 6, rows=3)  # 3 rows per prefix: the slots of a group interleave
    x = keras_model.embed_tokens(rng.integers(0, CONFIGS[name]["vocab_size"], (6, 1)))
    expected, expected_cache = keras_model.call_with_cache(x, beams, 3)
    logits, cache = keras_model.call_with_cache(x, beams, 3, columns=True)
    assert_close(logits, expected, 1e-5, "beams, column vs row form")
    for a, b in zip(tf.nest.flatten(cache), tf.nest.flatten(expected_cache), strict=True):
        assert_close(a, b, 1e-5, "beams' cache, column vs row form")
    for bad in (dict(inputs_embeds=prefix[:, :2]), dict(inplace=True)):
        with pytest.raises(ValueError, match="columns=True"):
            keras_model.call_with_cache(**{"inputs_embeds": x, **bad}, cache=keras_model.prefill(prefix, 6)[1],
                                        cache_index=3, columns=True)


def test_compiled_loop_steps_in_column_form_up_to_32_rows(tiny_pair, monkeypatch):
    """The XLA loop's steps run in column form from 2 to 32 rows (where it is faster), not at 1 row nor at 40
    (beam search's 5 rows per image: slower there, 57.4 -> 81.5 ms at 80 rows)."""
    from custom_architectures.generation_utils import Beam, Greedy, PrefixDecoder
    from custom_architectures.transformers_arch import gpt2_arch
    from custom_layers import gpt2_block
    from unitest.tracing import record_traces

    _, keras_model = tiny_pair
    traced = record_traces(monkeypatch, gpt2_block.cached_column_step, gpt2_block, gpt2_arch)
    decoder = PrefixDecoder(keras_model)
    for images, sampler, expected in ((1, Greedy(), 0), (2, Greedy(), 1), (32, Greedy(), 1), (8, Beam(beam_size=5), 0)):
        traced.clear()
        loop = decoder._function(decoder._key(images, 4, 6, sampler), sampler, compiled=True)
        loop.get_concrete_function(tf.zeros((images, 4, 64)), tf.ones((images,), tf.bool), tf.constant(-1),
                                   tf.constant(0), tf.range(images))
        assert len(traced) == expected, (images, type(sampler).__name__, traced)
