"""How often bfloat16 gives float32's captions: ``precision="bfloat16"`` vs float32, same weights, same photos.

For each model and decoding method, the photos are captioned (CLIP encoding, mapper, decoding) by the float32
model (its compiled decoding) and by the same model loaded in bfloat16 (`models.precision`) in both of its
decoding forms: a shape's first calls (uncompiled) and later ones (the compiled plain graph, whose steps keep
the weights packed); the table gives, per form:

- exact captions: the share of photos whose best caption is the same (the same tokens);
- token agreement: the mean, over photos, of the share of positions where the two captions hold the same
  token (over the longer of the two: a length difference counts as disagreement);
- CLIP rel diff: max |bf16 - fp32| / max |fp32| of the image embeddings;
- score diff: the mean |bf16 - fp32| of the best captions' scores (mean log-probability per token) where the
  captions are the same.

Photos: the 16 ``skimage.data`` photographs of ``benchmarks/bench_clipcap.py`` and ``demo/*.jpg``.
Models: by default random full-size weights (CLIP RN50x4 + transformer mapper + GPT-2 124M, and CLIP ViT-B/32
+ MLP mapper + GPT-2 124M, as ``bench_clipcap`` builds them, with the parity suites' init scale so that
next-token choices are not near-ties; ``--logit-offset -100`` moves their logits to a trained GPT-2's scale,
where bfloat16's rounding step is 0.5); ``--model NAME_OR_DIR`` (repeatable) runs saved models instead (a
converted official model such as ``coco``, when it is in the model store: real weights, real captions).

Run from the repository root::

    python -m benchmarks.bf16_agreement                       # random full-size weights, ~5 min on 2 cores
    python -m benchmarks.bf16_agreement --model coco --model coco_transformer
    python -m benchmarks.bf16_agreement --logit-offset -100   # random weights, logits at a trained GPT-2's scale
"""

import argparse
import os
import tempfile
from pathlib import Path

# torchvision (imported by the clip package) must come before TensorFlow
import torch  # noqa: F401, I001  (before TensorFlow; `use_threads` sets its threads)
import torchvision  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np

from benchmarks.bench_clipcap import CONFIGS, agreement, build, photos
from benchmarks.machine import print_machine, use_threads

ROOT = Path(__file__).resolve().parents[1]


def demo_photos():
    """The repository's demo photographs (PIL images, in name order)."""
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((ROOT / "demo").glob("*.jpg"))]


#: bf16's decoding forms, as ``generate(compile_now=...)`` picks them: a shape's first calls run uncompiled, later
#: ones the compiled plain graph, whose steps keep the weights packed (`custom_layers.packed_weights`)
FORMS = {"first calls (uncompiled)": False, "later calls (compiled)": True}


def compare(fp32, bf16, images, method, max_length, beam_size):
    """One row's figures per bf16 form (`FORMS`): {form: (exact captions, token agreement, CLIP rel diff, mean
    score diff)}, against float32's compiled decoding (its forms agree to float32 rounding)."""
    kw = dict(method=method, beam_size=beam_size, max_length=max_length)
    e32, e16 = fp32.encode_images(images), bf16.encode_images(images)
    want = fp32.generate(e32, compile_now=True, **kw)
    clip_diff = float(np.abs(e16 - e32).max() / np.abs(e32).max())
    figures = {}
    for form, compile_now in FORMS.items():
        got = bf16.generate(e16, compile_now=compile_now, **kw)
        exact, tokens = agreement(got, want)
        same = [abs(a[0]["score"] - b[0]["score"]) for a, b in zip(got, want) if a[0]["tokens"] == b[0]["tokens"]]
        figures[form] = (exact, tokens, clip_diff, float(np.mean(same)) if same else float("nan"))
    return figures


def models(args, directory):
    """(label, float32 model, bfloat16 model) for each model to compare."""
    from models.image_captioning.clip_cap import ClipCap

    if args.model:
        for name in args.model:
            yield name, ClipCap.load(name), ClipCap.load(name, precision="bfloat16")
        return
    from testing.tiny_models import train_tiny_tokenizer

    tokenizer_dir = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))
    for config in args.configs:
        clip_name, kind = CONFIGS[config]
        _, _, fp32, bf16 = build(clip_name, kind, directory, tokenizer_dir, logit_offset=args.logit_offset)
        offset = f", logits around {args.logit_offset:g}" if args.logit_offset else ""
        yield f"{clip_name} + {kind} (random weights{offset})", fp32, bf16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a saved ClipCap (name or folder) instead of random weights")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logit-offset", type=float, default=0.0,
                        help="move the random GPT-2's logits there, as a trained one's lie around -100 "
                        "(bench_clipcap.offset_logits): bfloat16 rounds them at that scale")
    args = parser.parse_args()
    print_machine()
    use_threads(args.threads)

    images = photos() + demo_photos()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for label, fp32, bf16 in models(args, directory):
            for method in ("greedy", "beam"):
                figures = compare(fp32, bf16, images, method, args.max_length, args.beam_size)
                rows += [(label, method, form, *values) for form, values in figures.items()]
                print(f"  done: {label}, {method}", flush=True)
            del fp32, bf16
    print(f"\nbfloat16 vs float32 on {len(images)} photographs (16 skimage.data + demo/), best caption, at most "
          f"{args.max_length} tokens, the model's stop token; beam: {args.beam_size} beams\n")
    print("| model | method | bf16 decoding | exact captions | token agreement | CLIP rel diff | score diff (same "
          "captions) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, method, form, exact, tokens, clip_diff, score_diff in rows:
        print(f"| {label} | {method} | {form} | {100 * exact:.0f}% | {100 * tokens:.1f}% | {clip_diff:.1e} | "
              f"{score_diff:.3f} |")


if __name__ == "__main__":
    main()
