"""What the benchmarks measure compute against: FLOPs of a CLIP image encoder per image, counted from its
architecture, and this machine's measured fp32 matmul peak.

FLOPs count 2 per multiply-add of the convolutions, projections and attention products (the work a
framework cannot avoid); normalisations, activations, pooling and additions are left out, as are layout
changes, so ``FLOP/s / peak`` says how close an encoder runs to the machine's matmul speed.
"""

import time

import tensorflow as tf

from custom_architectures.clip_arch import ModifiedResNet, VisionTransformer


def vit_flops(visual: VisionTransformer) -> int:
    """FLOPs per image of a `VisionTransformer`: patch conv, per block q/k/v/out (4C^2) + MLP (8C^2) per
    token and the two attention products (2 T^2 C), the output projection."""
    grid = visual.input_resolution // visual.patch_size
    tokens, c = grid * grid + 1, visual.width
    patch = grid * grid * 3 * visual.patch_size**2 * c
    block = tokens * 12 * c * c + 2 * tokens * tokens * c
    return 2 * (patch + visual.num_layers * block + c * visual.output_dim)


def resnet_flops(visual: ModifiedResNet) -> int:
    """FLOPs per image of a `ModifiedResNet`: the 3-conv stem, every Bottleneck (conv1 1x1, conv2 3x3,
    conv3 1x1 after the stride's pooling, the downsample 1x1) and the attention pool (q on the mean token,
    k / v on all HW + 1 tokens, the two attention products, c_proj)."""
    w, n = visual.width, visual.input_resolution
    hw = (n // 2) ** 2
    macs = hw * 9 * (3 * (w // 2) + (w // 2) * (w // 2) + (w // 2) * w)  # stem at n/2
    hw = (n // 4) ** 2  # after the stem's average pooling
    inplanes = w
    for stage, blocks in enumerate(visual.layer_counts, start=1):
        planes, out = w * 2 ** (stage - 1), w * 2 ** (stage - 1) * 4
        for b in range(blocks):
            stride = 2 if (stage > 1 and b == 0) else 1
            pooled = hw // stride**2
            macs += hw * inplanes * planes + hw * 9 * planes * planes + pooled * planes * out
            if stride > 1 or inplanes != out:
                macs += pooled * inplanes * out
            hw, inplanes = pooled, out
    tokens, c = hw + 1, w * 32
    macs += c * c + 2 * tokens * c * c + 2 * tokens * c + c * visual.output_dim
    return 2 * macs


def image_encoder_flops(visual) -> int:
    """FLOPs per image of a CLIP image encoder (ViT or ModifiedResNet)."""
    if isinstance(visual, VisionTransformer):
        return vit_flops(visual)
    if isinstance(visual, ModifiedResNet):
        return resnet_flops(visual)
    raise TypeError(f"not a CLIP image encoder: {type(visual).__name__}")


def matmul_probe(size=4096, dtype="float32"):
    """``(fn, flops)``: a (size x size) TF matmul (fp32, or ``dtype="bfloat16"``: the bound of a bf16 model
    on this CPU) to time beside a benchmark's own functions, so the peak is measured under the same load as
    what it is compared with."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    b = tf.cast(tf.random.normal((size, size)), dtype)
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    return (lambda: fn(a, b).numpy()), 2 * size**3


def matmul_peak(size=4096, repeats=5):
    """Best fp32 FLOP/s of a (size x size) @ (size x size) TF matmul on this machine (same threads as the
    benchmark: call it after configuring TensorFlow's thread pools)."""
    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    fn(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
