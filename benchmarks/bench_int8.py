"""One-image (batch 1) greedy decoding, ms per token: float32 against ``precision="int8"``, with peers.

Random full-size GPT-2 124M (the same weights everywhere), a 10-position prefix, greedy, warm: ClipCap's
decoder (`PrefixDecoder`, one image) compiled (a recurring shape: one XLA ``tf.while_loop``) and uncompiled
(a shape's first call under ``jit_compile="auto"``), for the float32 GPT-2 and its int8 copy
(`custom_architectures.quantization.quantize_gpt2`); transformers' PyTorch model (cached steps) in float32
and under ``torch.ao.quantization.quantize_dynamic`` (int8 ``nn.Linear``: HF's ``Conv1D`` projections are
turned into ``nn.Linear`` first, the LM head is one already).
The runs are interleaved and repeated (``--repeats``), medians reported, so a shared machine loads them alike.
Also the greedy tokens' agreement of int8 with float32 on random prefixes (random weights: a lower bound on
what trained weights give, whose logits have larger margins).

``--kernels``: the kernel study. One-row products at GPT-2's shapes (1x768x2304, 1x768x3072, 1x3072x768,
1x768x50257), each over 12 distinct weight matrices (the weights a decoding step streams from memory, not
one matrix left in cache), per product: float32 (XLA, and TensorFlow's oneDNN graph), int8 weights with the
cast fused into an XLA product in the (N, K) layout (this library's) and in Keras' (K, N) layout, an
``XlaDotV2`` of int8 x int8 -> int32 after quantizing the activation row, ``UniformQuantizedDotHybrid`` and
oneDNN's ``QuantizedMatMulWithBiasAndDequantize``.

    python -m benchmarks.bench_int8 [--steps 20] [--repeats 5] [--kernels]
"""

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  #  (torch + torchvision before TensorFlow: see ARCHITECTURE.md)
import torchvision  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel

# isort: split
import numpy as np
import tensorflow as tf

from custom_architectures.generation_utils import Greedy, PrefixDecoder
from custom_architectures.quantization import quantize_gpt2
from custom_layers.quantized import quantize_rows
from utils.convert.hf_gpt2 import load_gpt2

PREFIX = 10
SHAPES = ((768, 2304), (768, 3072), (3072, 768), (768, 50257))
COPIES = 12  # distinct weight matrices per shape in the kernel study (one per block)
HEAD_COPIES = 2  # for the LM head's shape (154 MB each in float32: two already exceed every cache)


# ------------------------------------------------------------------ decoding
def time_decoder(decoder, prefix, steps, compiled):
    """ms per token of `PrefixDecoder` greedy at one image: (time of steps + 1 tokens - time of 1) / steps;
    ``compiled``: the XLA loop (a recurring shape), else the uncompiled path (a shape's first call)."""
    times = []
    for length in (1, steps + 1):
        start = time.perf_counter()
        decoder(prefix, Greedy(), max_length=length, jit_compile=compiled)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps * 1e3


def torch_linear_gpt2(model):
    """HF's GPT-2 with every ``Conv1D`` replaced by the equal ``nn.Linear`` (what ``quantize_dynamic`` takes)."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(module, name, linear)
    return model


def time_torch(model, prefix, steps):
    """ms per cached greedy step of a transformers model after the prefix."""
    with torch.no_grad():
        out = model(inputs_embeds=prefix, use_cache=True)
        past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(ids, past_key_values=past, use_cache=True)  # warm-up
        past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(ids, past_key_values=past, use_cache=True)
            past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - start) / steps * 1e3


def decoding(steps, repeats, agreement_prefixes):
    torch.manual_seed(0)
    torch_model = GPT2LMHeadModel(GPT2Config()).eval()
    fp32 = load_gpt2(torch_model.state_dict())
    int8 = quantize_gpt2(fp32)
    torch_int8 = torch.ao.quantization.quantize_dynamic(torch_linear_gpt2(copy.deepcopy(torch_model)),
                                                        {torch.nn.Linear}, dtype=torch.qint8)
    prefix = tf.random.stateless_normal((1, PREFIX, 768), (1, 2)).numpy()
    decoders = {"fp32": PrefixDecoder(fp32), "int8": PrefixDecoder(int8)}
    for decoder in decoders.values():
        for length in (1, steps + 1):
            decoder(prefix, Greedy(), max_length=length, jit_compile=True)  # compile
            decoder(prefix, Greedy(), max_length=length, jit_compile=False)  # trace the block step
    torch_prefix = torch.from_numpy(prefix)
    columns = ("keras fp32", "keras int8", "torch fp32", "torch dynamic int8", "keras fp32 uncompiled",
               "keras int8 uncompiled")
    runs = {name: [] for name in columns}
    for _ in range(repeats):  # interleaved: a shared machine loads every column alike
        for name, decoder in decoders.items():
            runs[f"keras {name}"].append(time_decoder(decoder, prefix, steps, True))
        runs["torch fp32"].append(time_torch(torch_model, torch_prefix, steps))
        runs["torch dynamic int8"].append(time_torch(torch_int8, torch_prefix, steps))
        for name, decoder in decoders.items():
            runs[f"keras {name} uncompiled"].append(time_decoder(decoder, prefix, steps, False))
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"\nGPT-2 124M, batch 1, greedy, prefix {PREFIX}, {steps} tokens, median of {repeats} "
          f"interleaved runs, {torch.get_num_threads()} torch threads")
    print(f"{'what':<20} | {'ms/token':>8} | {'fp32/this':>9} | runs (ms/token)")
    for name, value in med.items():
        print(f"{name:<20} | {value:>8.2f} | {med['keras fp32'] / value:>9.2f} | "
              + " ".join(f"{v:.1f}" for v in runs[name]))
    print(f"keras int8 vs torch fp32: {med['torch fp32'] / med['keras int8']:.2f}x; "
          f"vs torch dynamic int8: {med['torch dynamic int8'] / med['keras int8']:.2f}x")
    agreement(decoders, steps, agreement_prefixes)


def agreement(decoders, steps, count):
    """Greedy tokens of int8 against float32 on ``count`` random prefixes (one batch, compiled): the rate of
    identical captions and the mean share of tokens before the first difference."""
    prefixes = tf.random.stateless_normal((count, PREFIX, 768), (7, 7)).numpy()
    tokens = {name: decoder(prefixes, Greedy(), max_length=steps + 1).tokens for name, decoder in decoders.items()}
    exact, agree = 0, []
    for a, b in zip(tokens["fp32"], tokens["int8"], strict=True):
        a, b = a[0], b[0]
        exact += a == b
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agree.append(same / max(len(a), len(b)))
    print(f"agreement on {count} random prefixes (random weights): identical {exact}/{count}, mean prefix of "
          f"agreeing tokens {np.mean(agree):.2%}")


# ------------------------------------------------------------------ kernels
def kernel_functions():
    """{name: (build(w (K, N) float32) -> args, fn(x, *args) -> y)}: the one-row products compared."""
    from tensorflow.compiler.tf2xla.python import xla
    from tensorflow.compiler.xla import xla_data_pb2

    def nk(w):
        return quantize_rows(tf.transpose(w))

    def kn(w):
        q, s = quantize_rows(tf.transpose(w))
        return tf.transpose(q), s

    contract_k = xla_data_pb2.DotDimensionNumbers(lhs_contracting_dimensions=[1], rhs_contracting_dimensions=[1])

    def s8_dot(x, q, s):
        a = tf.maximum(tf.reduce_max(tf.abs(x), -1, keepdims=True) / 127, 1e-30)
        xq = tf.cast(tf.round(x / a), tf.int8)
        return tf.cast(xla.dot_general(xq, q, contract_k, preferred_element_type=tf.int32), tf.float32) * a * s

    def hybrid(x, q, s):
        return tf.raw_ops.UniformQuantizedDotHybrid(
            lhs=x, rhs=tf.raw_ops.Bitcast(input=q, type=tf.qint8), rhs_scales=s,
            rhs_zero_points=tf.zeros_like(s, tf.int32), Tout=tf.float32, rhs_quantization_min_val=-127,
            rhs_quantization_max_val=127, rhs_quantization_axis=1)

    def onednn(x, q, s):  # per-tensor weight range (the op's), activation quantized MIN_FIRST to quint8
        m = tf.reduce_max(tf.abs(x))
        xq, lo, hi = tf.raw_ops.QuantizeV2(input=x, min_range=-m, max_range=m, T=tf.quint8, mode="MIN_FIRST")
        r = tf.reduce_max(s) * 127
        return tf.raw_ops.QuantizedMatMulWithBiasAndDequantize(
            a=xq, b=tf.raw_ops.Bitcast(input=q, type=tf.qint8), bias=tf.zeros(q.shape[1:]), min_a=lo, max_a=hi,
            min_b=-r, max_b=r, min_freezed_output=-1.0, max_freezed_output=1.0, Toutput=tf.float32)

    return {
        "fp32 XLA": (lambda w: (w,), lambda x, w: tf.matmul(x, w), True),
        "fp32 oneDNN graph": (lambda w: (w,), lambda x, w: tf.matmul(x, w), False),
        "int8 (N,K) cast in XLA dot [ours]": (nk, lambda x, q, s: tf.matmul(x, tf.cast(q, x.dtype), transpose_b=True)
                                              * s, True),
        "int8 (K,N) cast in XLA dot [Keras layout]": (kn, lambda x, q, s: tf.matmul(x, tf.cast(q, x.dtype)) * s, True),
        "int8 (N,K) uncompiled graph": (nk, lambda x, q, s: tf.matmul(x, tf.cast(q, x.dtype), transpose_b=True)
                                        * s, False),
        "XlaDotV2 s8 x s8 -> s32 (N,K)": (nk, s8_dot, True),
        "UniformQuantizedDotHybrid (K,N)": (kn, hybrid, False),
        "oneDNN QuantizedMatMulWithBiasAndDequantize": (kn, onednn, False),
    }


def kernels(repeats):
    print(f"\nkernel study: one-row products, ms per product (median of {repeats} interleaved rounds; each call runs "
          f"one product on each of {COPIES} distinct matrices, {HEAD_COPIES} for the LM head)")
    rng = np.random.default_rng(0)
    table = {}
    for k, n in SHAPES:
        x = tf.constant(rng.standard_normal((1, k), np.float32))
        copies = HEAD_COPIES if n > 10000 else COPIES
        weights = [tf.constant(rng.standard_normal((k, n), np.float32) * 0.02) for _ in range(copies)]
        calls = {}
        for name, (build, fn, jit) in kernel_functions().items():
            args = [build(w) for w in weights]

            def chain(x, args, fn=fn):
                return tf.add_n([tf.reduce_sum(fn(x, *a)) for a in args])  # every output used

            call = tf.function(chain, jit_compile=jit)
            try:
                call(x, args).numpy()
            except (tf.errors.OpError, TypeError, ValueError) as e:
                table[name, (k, n)] = f"fails: {type(e).__name__}"
                continue
            calls[name] = (call, args)
        times = {name: [] for name in calls}
        for _ in range(repeats):  # interleaved rounds: a shared machine loads every kernel alike
            for name, (call, args) in calls.items():
                start = time.perf_counter()
                call(x, args).numpy()
                times[name].append((time.perf_counter() - start) / copies * 1e3)
        table.update({(name, (k, n)): statistics.median(t) for name, t in times.items()})
        del weights, calls
    names = list(kernel_functions())
    header = " | ".join(f"{f'1x{k}x{n}':>12}" for k, n in SHAPES)
    print(f"{'kernel':<44} | {header}")
    for name in names:
        cells = []
        for shape in SHAPES:
            v, base = table[name, shape], table["fp32 XLA", shape]
            cells.append(f"{v:>6.3f} {base / v:>4.2f}x" if isinstance(v, float) else f"{v[:12]:>12}")
        print(f"{name:<44} | " + " | ".join(cells))
    print("(ratio: fp32 XLA time / this time; > 1 is faster than float32)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--agreement-prefixes", type=int, default=8)
    parser.add_argument("--kernels", action="store_true", help="also run the kernel study")
    parser.add_argument("--only-kernels", action="store_true", help="run the kernel study only")
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()
    from benchmarks.machine import cpu_info

    flags = cpu_info()[1]
    print("int8 flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_vnni", "avx_vnni",
                                                                                   "amx_int8")))
    if not args.only_kernels:
        decoding(args.steps, args.repeats, args.agreement_prefixes)
    if args.kernels or args.only_kernels:
        kernels(args.repeats)


if __name__ == "__main__":
    main()
