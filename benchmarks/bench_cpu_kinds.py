"""float32 and bfloat16 as this CPU runs them, and as an AVX2-only CPU would (emulated on this one), side by side.

Some machines of this project's kind have AVX2 only (AMD Zen 2 / Zen 3): oneDNN has no bfloat16 kernel there,
so TensorFlow runs bfloat16 on its own (Eigen) kernels and decoding keeps no packed weights
(`custom_layers.cpu_features`). Each row runs in a process of its own, whose environment makes it:

- ``float32`` / ``bfloat16``: this CPU as it is;
- ``float32, AVX2 only``: oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) and XLA's code generation too
  (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``): the float32 kernels an AVX2-only CPU gets;
- ``bfloat16, AVX2 only``: TensorFlow's own kernels (``TF_ENABLE_ONEDNN_OPTS=0``: what TensorFlow runs
  bfloat16 with on an AVX2-only CPU) and XLA capped at AVX2. TensorFlow's pip build compiles those kernels for
  one baseline on every x86 CPU, so their speed here stands for an AVX2-only machine's, up to clock and
  memory.

Model: CLIP ViT-B/32 + MLP mapper (K = 10) + GPT-2 124M, random full-size weights (as in
``benchmarks/bench_clipcap.py``); 16 photographs of ``skimage.data``. Columns (images per second, best of
``--repeats`` after a compiled warm-up): CLIP encoding from the images (preprocessing included), greedy and
beam search (5 beams) decoding from the same embeddings, 20 tokens without early stop; then each bfloat16 row
against the float32 row of the same CPU kind.

Run from the repository root (4 minutes on 2 cores, measured)::

    python -m benchmarks.bench_cpu_kinds
    python -m benchmarks.bench_cpu_kinds --repeats 3 --threads 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: row label -> (precision, environment added to the worker's)
ROWS = {
    "float32": ("float32", {}),
    "bfloat16": ("bfloat16", {}),
    "float32, AVX2 only": ("float32", {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}),
    "bfloat16, AVX2 only": ("bfloat16", {"TF_ENABLE_ONEDNN_OPTS": "0", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}),
}
COLUMNS = ("encode", "greedy", "beam")


def worker(precision, repeats, threads, max_length=20, beam_size=5):
    """In this process: build the model in ``precision``, time it; print one ``RESULT {json}`` line."""
    import torch  # noqa: I001 - torch and torchvision before TensorFlow (ARCHITECTURE.md)
    import torchvision  # noqa: F401

    from benchmarks.bench_clipcap import TorchCLIP, bench_clip_config, best_of, photos, ref
    from benchmarks.machine import describe_machine, use_threads
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import train_tiny_tokenizer

    use_threads(threads)
    images = photos()
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        clip = TorchCLIP(**bench_clip_config("ViT-B/32")).float().eval()
        clip_path = os.path.join(directory, "clip.pt")
        torch.save(clip.state_dict(), clip_path)
        checkpoint = ref.save_official(ref.build_random_clipcap("mlp", "real", seed=1), os.path.join(directory, "m.pt"))
        tokenizer = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))
        model = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=tokenizer)
        if precision != "float32":
            model.to_precision(precision)

    result = {"machine": describe_machine(), "packed": model.decoder.packs_weights()}
    result["encode"] = len(images) / best_of(lambda: model.encode_images(images), repeats)
    embeddings = model.encode_images(images)
    for method in ("greedy", "beam"):
        options = dict(method=method, beam_size=beam_size, max_length=max_length, stop_token=None, compile_now=True)
        result[method] = len(images) / best_of(lambda o=options: model.generate(embeddings, **o), repeats)
    print("RESULT " + json.dumps(result), flush=True)


def run_row(label, args):
    precision, extra = ROWS[label]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS")}
    env.update(extra, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    command = [sys.executable, "-m", "benchmarks.bench_cpu_kinds", "--worker", precision,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: the worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  done: {label}", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--worker", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats, args.threads)
    from benchmarks.machine import print_machine

    print_machine()
    results = {label: run_row(label, args) for label in args.rows}
    print(f"\nCLIP ViT-B/32 + MLP K=10 + GPT-2 124M, random weights; 16 photographs, {args.threads} threads, best of "
          f"{args.repeats}; images per second (encode: from the images; decode: 20 tokens, no early stop)\n")
    print("| row | packed weights | encode | greedy | beam 5 | encode / fp32 | greedy / fp32 | beam 5 / fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, result in results.items():
        reference = results.get(label.replace("bfloat16", "float32")) if label.startswith("bfloat16") else None
        ratios = [f"{result[c] / reference[c]:.2f}x" if reference else "" for c in COLUMNS]
        print(f"| {label} | {'yes' if result['packed'] else 'no'} | "
              + " | ".join(f"{result[c]:.2f}" for c in COLUMNS) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
