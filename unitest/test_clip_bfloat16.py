"""CLIP's transformer blocks in bfloat16 (`custom_layers.clip_layers`): the graph form that runs fast on oneDNN
(bfloat16 matmuls, everything between them in XLA-fused float32 kernels) computes the float32 function.

The ViT (OpenAI's heads rule: width / 64) and the text transformer (causal) are built small with several
heads, cast with `models.precision` and compared with their float32 selves, traced (the XLA-fused form) and
eager (plain TensorFlow ops). The bound is `test_precision`'s (3e-2 of the largest feature: bfloat16 rounds each matmul input to 8 bits).
"""

import numpy as np
import pytest
import tensorflow as tf

from custom_architectures.clip_arch import TextTransformer, VisionTransformer
from models.precision import cast_model

# ops that compute in bfloat16 between the matmuls in the plain form; in the fast form they run inside
# XLA-compiled calls (float32 inside), never as bfloat16 TensorFlow kernels of the block
ELEMENTWISE = {"Sigmoid", "Mul", "AddV2", "Add", "AddN", "Sub", "Mean", "SquaredDifference", "Softmax", "Rsqrt"}


def _relative(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def vit_pair():
    visual = VisionTransformer(input_resolution=32, patch_size=8, width=128, layers=2, heads=2, output_dim=32)
    pixels = np.random.RandomState(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    visual(pixels[:1])
    _randomize(visual)
    return visual, cast_model(visual, "bfloat16"), pixels


def _randomize(model):
    """Non-trivial layer norm weights and biases (Keras initialises them to 1 and 0)."""
    rng = np.random.RandomState(1)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])


def _block_ops(function, *args):
    """(op type, dtype attr) of every op of the traced function's own graph inside the residual blocks."""
    graph = tf.function(function).get_concrete_function(*args).graph
    ops = []
    for op in graph.get_operations():
        if "resblocks" not in op.name:
            continue
        dtype = op.node_def.attr["T"].type if "T" in op.node_def.attr else None
        ops.append((op.type, dtype, op.node_def))
    return ops


def test_vit_blocks_run_no_bfloat16_elementwise_kernels(vit_pair):
    """Layer norms, QuickGELU, biases, residual sums and the softmax of a bf16 ViT block are XLA-compiled
    float32 calls; the block's own TensorFlow ops are its matmuls, casts and reshapes."""
    _, half, pixels = vit_pair
    ops = _block_ops(lambda x: half(x, training=False), tf.constant(pixels))
    bf16_elementwise = sorted({t for t, dtype, _ in ops if t in ELEMENTWISE and dtype == tf.bfloat16.as_datatype_enum})
    assert bf16_elementwise == []
    compiled = [n for t, _, n in ops if t in ("PartitionedCall", "StatefulPartitionedCall")
                and n.attr["_XlaMustCompile"].b]
    assert len(compiled) >= 2 * 5  # per block: 2 layer norms, attention heads, softmax, QuickGELU, residual
    assert {t for t, dtype, _ in ops if dtype == tf.bfloat16.as_datatype_enum} >= {"MatMul", "Einsum"}


def test_vit_bf16_close_to_float32_traced_and_eager(vit_pair):
    visual, half, pixels = vit_pair
    expected = visual(pixels, training=False).numpy()
    traced = tf.function(lambda x: half(x, training=False))(tf.constant(pixels))
    eager = half(pixels, training=False)
    assert traced.dtype == eager.dtype == tf.bfloat16
    assert _relative(tf.cast(traced, tf.float32), expected) < 3e-2
    assert _relative(tf.cast(eager, tf.float32), expected) < 3e-2
    assert _relative(tf.cast(traced, tf.float32), tf.cast(eager, tf.float32).numpy()) < 3e-2


def test_causal_text_bf16_close_to_float32():
    """The text transformer's causal mask in the fused softmax: bf16 features close to float32's, and a
    token's features do not depend on the tokens after it."""
    text = TextTransformer(embed_dim=32, context_length=8, vocab_size=50, width=64, heads=4, layers=2)
    ids = np.array([[3, 7, 9, 49, 0, 0, 0, 0], [5, 2, 11, 4, 6, 1, 49, 0]], np.int32)
    text(ids)
    _randomize(text)
    half = cast_model(text, "bfloat16")
    expected = text(ids).numpy()
    traced = tf.function(lambda t: half(t, training=False))
    assert _relative(tf.cast(traced(tf.constant(ids)), tf.float32), expected) < 3e-2
    changed = ids.copy()
    changed[0, 4:] = [8, 8, 8, 8]  # after the first row's end of text: its features must not move
    first = tf.cast(traced(tf.constant(ids)), tf.float32).numpy()[0]
    assert np.array_equal(tf.cast(traced(tf.constant(changed)), tf.float32).numpy()[0], first)


def test_bf16_vit_clip_pads_batches_to_few_shapes(vit_pair):
    """A bf16 ViT's graph compiles its XLA parts once per input shape, so `CLIP.encode_pixels` pads batches
    to a power of two in graph mode as it does under XLA (3 and 4 images: one shape), and cuts the result."""
    from custom_architectures.clip_arch import CLIPModel
    from models.siamese.clip import CLIP

    visual, _, pixels = vit_pair
    clip = CLIP(CLIPModel(visual), jit_compile="auto").to_precision("bf16", warn=False)
    assert not clip.jit_compile  # graph mode: oneDNN's bf16 matmuls
    shapes, compiled = [], clip._encode_pixels

    def recording(x, run):
        shapes.append(tuple(x.shape))
        return compiled(x, run)

    clip._encode_pixels = recording
    four = np.concatenate([pixels, pixels[:1]])
    features = [clip.encode_pixels(batch, compile_now=True) for batch in (pixels, four)]
    assert shapes == [(4, 32, 32, 3), (4, 32, 32, 3)]
    assert [f.shape for f in features] == [(3, 32), (4, 32)]
    assert _relative(features[0], visual(pixels, training=False).numpy()) < 3e-2
