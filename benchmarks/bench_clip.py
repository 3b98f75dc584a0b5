"""CLIP image encoding throughput: Keras (tf.function, with and without XLA) vs OpenAI's PyTorch model, CPU.

Same random weights on both sides (converted with `utils.convert.openai_clip`), a batch of preprocessed
pixels, both frameworks on the same number of threads. Prints a markdown table (images/s, ratio Keras /
PyTorch) and the max relative difference of the embeddings, so the two sides are known to do the same work.

Run from the repository root::

    python -m benchmarks.bench_clip                      # ViT-B/32 and RN50x4, batch 16, 2 threads
    python -m benchmarks.bench_clip --models ViT-B/32 --repeats 5 --threads 4
"""

import argparse
import os
import time

# torchvision (imported by the clip package) must be loaded before TensorFlow: the other order segfaults
import torch  # noqa: I001
import torchvision  # noqa: F401
from clip.model import CLIP as TorchCLIP

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODELS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None),
}
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=1)


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


def bench_model(name, batch_size, repeats):
    from utils.convert.openai_clip import clip_from_state_dict

    torch.manual_seed(0)
    reference = TorchCLIP(**MODELS[name], **TEXT).float().eval()
    state_dict = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    model = clip_from_state_dict(state_dict, visual_only=True)
    n_px = MODELS[name]["image_resolution"]
    pixels = torch.randn(batch_size, 3, n_px, n_px, generator=torch.Generator().manual_seed(1))
    pixels_nhwc = tf.constant(pixels.permute(0, 2, 3, 1).numpy())

    def run_torch():
        with torch.inference_mode():
            return reference.visual(pixels)

    graph = tf.function(lambda x: model.visual(x, training=False), jit_compile=False)
    xla = tf.function(lambda x: model.visual(x, training=False), jit_compile=True)
    results = time_interleaved(
        {"torch": run_torch, "graph": lambda: graph(pixels_nhwc).numpy(), "xla": lambda: xla(pixels_nhwc).numpy()},
        repeats,
    )
    expected = run_torch().numpy()
    diffs = {
        kind: float(np.abs(fn(pixels_nhwc).numpy() - expected).max() / np.abs(expected).max())
        for kind, fn in (("graph", graph), ("xla", xla))
    }
    return {k: batch_size / v for k, v in results.items()}, diffs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    rows = []
    for name in args.models:
        speeds, diffs = bench_model(name, args.batch_size, args.repeats)
        best = max(("graph", "xla"), key=speeds.get)
        rows.append((name, speeds, diffs, best))
        print(f"{name}: done", flush=True)

    print(f"\nCLIP image encoding, batch {args.batch_size}, {args.threads} threads, best of {args.repeats} "
          f"(torch {torch.__version__}, tensorflow {tf.__version__})\n")
    print("| model | PyTorch img/s | Keras tf.function img/s | Keras XLA img/s | best Keras / PyTorch | max rel diff |")
    print("|---|---|---|---|---|---|")
    for name, speeds, diffs, best in rows:
        print(
            f"| {name} | {speeds['torch']:.2f} | {speeds['graph']:.2f} | {speeds['xla']:.2f} | "
            f"{speeds[best] / speeds['torch']:.2f}x ({'XLA' if best == 'xla' else 'tf.function'}) | "
            f"{max(diffs.values()):.1e} |"
        )


if __name__ == "__main__":
    main()
