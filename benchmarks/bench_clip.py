"""CLIP image encoding throughput: Keras (tf.function, with and without XLA) vs OpenAI's PyTorch model, CPU.

Same random weights on both sides (converted with `utils.convert.openai_clip`), a batch of preprocessed
pixels, both frameworks on the same number of threads. Prints a markdown table (images/s, ratio Keras /
PyTorch) and the max relative difference of the embeddings, so the two sides are known to do the same work.

Also printed: the encoder's FLOPs per image (`benchmarks.flops`), the FLOP/s of PyTorch and of the best
Keras mode over this machine's measured fp32 matmul peak, and the library's bfloat16 path
(``CLIP.to_precision("bfloat16")``, what ``CLIP.load(..., precision="bfloat16")`` runs: bf16 weights cast once,
bf16 matmuls and convolutions, float32 layer norms and softmax, compiled as a plain graph under
``jit_compile="auto"``): its speed next to the best fp32 mode and its max relative difference from fp32, its
FLOP/s over the same matmul's bf16 peak, and that bf16 peak over the fp32 one: the most bf16 can gain on this
CPU for an encoder that runs at the matmul peak in both (AMX: ~5x; AVX512_BF16 alone, AMD Zen 4: ~1.8x). The
machine's load average is printed with the table: the ratios are measured side by side, the absolute numbers
depend on the load.

Run from the repository root::

    python -m benchmarks.bench_clip                      # ViT-B/32 and RN50x4, batch 16, 2 threads
    python -m benchmarks.bench_clip --models ViT-B/32 --repeats 5 --threads 4
    python -m benchmarks.bench_clip --no-bf16            # fp32 only
    python -m benchmarks.bench_clip --device gpu         # both frameworks on the first GPU (CUDA builds)
"""

import argparse
import os
import sys
import time

# torchvision (imported by the clip package) must be loaded before TensorFlow: the other order segfaults
import torch  # noqa: I001
import torchvision  # noqa: F401
from clip.model import CLIP as TorchCLIP


def _device_arg(argv):
    """``--device`` read before TensorFlow is imported: a CPU run hides the GPUs from both frameworks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    return parser.parse_known_args(argv)[0].device


DEVICE = _device_arg(sys.argv[1:])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if DEVICE == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.flops import image_encoder_flops, matmul_probe  # noqa: E402
from benchmarks.machine import print_machine  # noqa: E402
from testing.clip_configs import bench_clip_config  # noqa: E402

MODELS = ("ViT-B/32", "RN50x4")  # OpenAI's image towers (`testing.clip_configs.bench_clip_config`)


def time_interleaved(fns, repeats):
    """Best wall time of each function over `repeats` rounds, after one warm-up call each (compilation
    excluded). The functions take turns within a round, so a busy machine slows all of them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bfloat16_clip(model):
    """The library's bfloat16 CLIP of a float32 `CLIPModel` (`models.precision`: weights cast once)."""
    from models.siamese.clip import CLIP

    return CLIP(model, jit_compile="auto").to_precision("bfloat16")


def bench_model(name, batch_size, repeats, bf16=True):
    from utils.convert.openai_clip import clip_from_state_dict

    torch.manual_seed(0)
    reference = TorchCLIP(**bench_clip_config(name)).float().eval()
    torch_device = "cuda" if DEVICE == "gpu" else "cpu"
    state_dict = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    model = clip_from_state_dict(state_dict, visual_only=True)
    n_px = bench_clip_config(name)["image_resolution"]
    pixels = torch.randn(batch_size, 3, n_px, n_px, generator=torch.Generator().manual_seed(1))
    pixels_nhwc = tf.constant(pixels.permute(0, 2, 3, 1).numpy())
    visual, pixels = reference.visual.to(torch_device), pixels.to(torch_device)

    def run_torch():  # .cpu(): the result on the host, as the Keras side's .numpy() (waits for a GPU too)
        with torch.inference_mode():
            return visual(pixels).cpu()

    graph = tf.function(lambda x: model.visual(x, training=False), jit_compile=False)
    xla = tf.function(lambda x: model.visual(x, training=False), jit_compile=True)
    probe, probe_flops = matmul_probe()
    fns = {"peak": probe, "torch": run_torch, "graph": lambda: graph(pixels_nhwc).numpy(), "xla": lambda: xla(pixels_nhwc).numpy()}
    if bf16:
        half = bfloat16_clip(model)
        pixels_np = pixels_nhwc.numpy()
        fns["bf16"] = lambda: half.encode_pixels(pixels_np, compile_now=True)
        bf16_probe, _ = matmul_probe(dtype="bfloat16")
        fns["bf16 peak"] = bf16_probe
    results = time_interleaved(fns, repeats)
    expected = run_torch().numpy()
    diffs = {
        kind: float(np.abs(fn(pixels_nhwc).numpy() - expected).max() / np.abs(expected).max())
        for kind, fn in (("graph", graph), ("xla", xla))
    }
    if bf16:
        fp32 = xla(pixels_nhwc).numpy()
        diffs["bf16"] = float(np.abs(half.encode_pixels(pixels_np, compile_now=True) - fp32).max() / np.abs(fp32).max())
    speeds = {k: batch_size / v for k, v in results.items()}
    speeds["peak"] = probe_flops / results["peak"]  # FLOP/s of the probe, timed between the encoders
    if bf16:
        speeds["bf16 peak"] = probe_flops / results["bf16 peak"]  # the same matmul in bfloat16
    return speeds, diffs, image_encoder_flops(model.visual)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 column")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: PyTorch on cuda, TensorFlow on /GPU:0 (the bf16 column then runs bf16 on the GPU)")
    args = parser.parse_args()
    print_machine()
    if args.device == "gpu" and not (torch.cuda.is_available() and tf.config.list_logical_devices("GPU")):
        parser.error("--device gpu: PyTorch or TensorFlow sees no GPU here")
    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    rows = []
    for name in args.models:
        with tf.device("/GPU:0" if args.device == "gpu" else "/CPU:0"):
            speeds, diffs, flops = bench_model(name, args.batch_size, args.repeats, bf16=args.bf16)
        best = max(("graph", "xla"), key=speeds.get)
        rows.append((name, speeds, diffs, best, flops))
        print(f"{name}: done", flush=True)

    load = os.getloadavg()[0]
    peaks = ", ".join(f"{r[1]['peak'] / 1e9:.0f}" for r in rows)
    bf16_peaks = ", ".join(f"{r[1]['bf16 peak'] / 1e9:.0f}" for r in rows if "bf16 peak" in r[1])
    where = "GPU 0" if args.device == "gpu" else f"{args.threads} threads"
    print(f"\nCLIP image encoding, batch {args.batch_size}, {where}, best of {args.repeats} "
          f"(torch {torch.__version__}, tensorflow {tf.__version__}); fp32 matmul peak measured (a 4096^3 TF "
          f"matmul timed between the encoders): {peaks} GFLOP/s"
          + (f"; bf16: {bf16_peaks} GFLOP/s" if bf16_peaks else "") + "; "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| model | GFLOP/img | PyTorch img/s | Keras tf.function img/s | Keras XLA img/s | best Keras / PyTorch "
          "| PyTorch FLOP/s / peak | Keras FLOP/s / peak | max rel diff | bf16 img/s | bf16 / fp32 | bf16 rel diff "
          "| bf16 FLOP/s / bf16 peak | bf16 peak / fp32 peak |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, speeds, diffs, best, flops in rows:
        # the last column bounds bf16 / fp32 on this CPU for a model that runs at its matmul peak in both
        bf16 = (f"{speeds['bf16']:.2f} | {speeds['bf16'] / speeds[best]:.2f}x | {diffs['bf16']:.1e} | "
                f"{100 * flops * speeds['bf16'] / speeds['bf16 peak']:.0f}% | "
                f"{speeds['bf16 peak'] / speeds['peak']:.2f}x"
                if "bf16" in speeds else " | | | | ")
        print(
            f"| {name} | {flops / 1e9:.2f} | {speeds['torch']:.2f} | {speeds['graph']:.2f} | {speeds['xla']:.2f} | "
            f"{speeds[best] / speeds['torch']:.2f}x ({'XLA' if best == 'xla' else 'tf.function'}) | "
            f"{100 * flops * speeds['torch'] / speeds['peak']:.0f}% | "
            f"{100 * flops * speeds[best] / speeds['peak']:.0f}% | "
            f"{max(diffs['graph'], diffs['xla']):.1e} | {bf16} |"
        )


if __name__ == "__main__":
    main()
