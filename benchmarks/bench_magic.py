"""Seconds per caption of MAGIC search (``method="magic"``) next to greedy and beam search, CPU.

Models: ``--size tiny`` (the tests' tiny ClipCap and CLIP) or ``--size real`` (random full-size weights:
CLIP ViT-B/32 with its 12-layer text tower, MLP mapper K = 10, GPT-2 124M; built as in
``benchmarks/bench_clipcap.py``). Random CLIP embeddings in; every method generates ``--max-length`` tokens
(no stop token, so each does the same number of steps; MAGIC's COCO setting is 16). Each row: one warm-up
call (compilation), then the best of ``--repeats``; MAGIC's rows also give the share of the time spent in
CLIP's text tower (detokenize + CLIP tokenize + text tower, the ``guide``).

Run from the repository root::

    python -m benchmarks.bench_magic --size tiny
    python -m benchmarks.bench_magic --size real --batch-sizes 1 4 --magic-ks 10 45
"""

import argparse
import os
import tempfile
import time
import warnings

import torch  # noqa: I001 - torchvision before TensorFlow
import torchvision  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np

from benchmarks.machine import print_machine, use_threads


def build_real(directory, tokenizer_dir):
    """Random full-size ClipCap (MLP, GPT-2 124M) with a random ViT-B/32 CLIP that keeps its text tower."""
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese import CLIP
    from testing import clipcap_official as ref
    from testing.clip_configs import bench_clip_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports pkg_resources (deprecated)
        from clip.model import CLIP as TorchCLIP

    torch.manual_seed(0)
    torch_clip = TorchCLIP(**bench_clip_config("ViT-B/32", transformer_layers=12)).float().eval()
    clip_path = os.path.join(directory, "clip.pt")
    torch.save(torch_clip.state_dict(), clip_path)
    checkpoint = ref.save_official(ref.build_random_clipcap("mlp", "real", seed=1), os.path.join(directory, "m.pt"))
    model = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=tokenizer_dir)
    model.clip = CLIP.from_pretrained(clip_path)
    return model


def build_tiny(directory):
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model
    from models.siamese import CLIP
    from testing.tiny_models import build_tiny_files

    files = build_tiny_files(directory)
    convert_model(ClipCap, files["checkpoint"], files["clip"], files["tokenizer"], os.path.join(directory, "model"),
                  name="tiny")
    return ClipCap.load(os.path.join(directory, "model"), clip=CLIP.from_pretrained(files["clip"]))


def timed_guide(model):
    """Wrap the model's MAGIC guide so that its seconds are counted in the returned list."""
    spent = [0.0]
    make_guide = model._magic_guide

    def counting(embeddings):
        guide = make_guide(embeddings)

        def timed(rows, token_lists):
            start = time.perf_counter()
            try:
                return guide(rows, token_lists)
            finally:
                spent[0] += time.perf_counter() - start

        return timed

    model._magic_guide = counting
    return spent


def measure(model, embeddings, args, spent, **kwargs):
    """(seconds per caption, share in the guide) for one method: a warm-up call, then the best of repeats."""
    run = lambda: model.generate(embeddings, max_length=args.max_length, stop_token=None, compile_now=True,  # noqa: E731
                                 **kwargs)
    run()
    best, share = np.inf, 0.0
    for _ in range(args.repeats):
        spent[0] = 0.0
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, share = seconds, spent[0] / seconds
    return best / len(embeddings), share


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--magic-ks", type=int, nargs="+", default=[45])
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print_machine()
    use_threads(args.threads)
    from testing.tiny_models import train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        if args.size == "tiny":
            model = build_tiny(directory)
        else:
            model = build_real(directory, train_tiny_tokenizer(os.path.join(directory, "tokenizer")))
    spent = timed_guide(model)
    dim = model.clip.embed_dim
    print(f"{args.size} model, {args.max_length} tokens per caption (no early stop), {args.threads} threads, CPU\n")
    print("| images per batch | method | s / caption | x beam | CLIP text share |")
    print("|---:|---|---:|---:|---:|")
    for batch in args.batch_sizes:
        embeddings = np.random.default_rng(0).normal(0, 0.5, (batch, dim)).astype(np.float32)
        rows = [("greedy", {"method": "greedy"}), (f"beam {args.beam_size}", {"method": "beam",
                                                                             "beam_size": args.beam_size})]
        rows += [(f"magic k={k}", {"method": "magic", "magic_k": k}) for k in args.magic_ks]
        beam = None
        for label, kwargs in rows:
            seconds, share = measure(model, embeddings, args, spent, **kwargs)
            beam = seconds if label.startswith("beam") else beam
            ratio = f"{seconds / beam:.1f}" if beam else "-"
            print(f"| {batch} | {label} | {seconds:.3f} | {ratio} | "
                  f"{f'{share:.0%}' if label.startswith('magic') else '-'} |", flush=True)


if __name__ == "__main__":
    main()
