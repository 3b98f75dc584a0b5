"""What re-ranking by CLIP (``rerank="clip"``) costs next to beam search alone, and what the text encoder
costs a `ClipCap.load`, on random weights, CPU.

Models: the tests' tiny model (``testing.tiny_models``), and with ``--real`` the released sizes: CLIP
ViT-B/32 (random, OpenAI's format, converted) + MLP mapper (K = 10) + GPT-2 124M. Inputs: the demo photos
(``demo/*.jpg``). For each model: ``generate`` with beam search (5 beams) and the same with
``rerank="clip"`` (the text encoder over the B * 5 candidates), both compiled (a warm-up call first), the
best of ``--repeats``; the table gives both times and their ratio, and says on every photo whether the
chosen caption is the candidate with the best CLIPScore. The load rows compare `ClipCap.load` of the same
model saved with its text encoder (read lazily, when re-ranking first needs it) and image-only, and time
that first `CLIP.load_text`.

Run from the repository root (tiny: ~1 minute; ``--real``: ~5 minutes on 2 cores)::

    python -m benchmarks.bench_rerank [--real] [--repeats 3]
"""

import argparse
import glob
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (torch and torchvision before TensorFlow: see unitest/conftest.py)
import torchvision  # noqa: F401

from benchmarks.machine import print_machine

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tiny_model(directory):
    from testing.tiny_models import build_tiny_model

    return build_tiny_model(directory), Path(directory) / "tiny_clip.pt"


def real_model(directory):
    """A saved ClipCap of the released MLP size with a random ViT-B/32 (OpenAI's format, converted)."""
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model
    from testing import clipcap_official as ref
    from testing.clip_reference import OPENAI_CONFIGS, as_fp16_checkpoint, random_clip_state_dict
    from testing.tiny_models import train_gpt2_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip = directory / "vit_b32.pt"
    torch.save(as_fp16_checkpoint(random_clip_state_dict(OPENAI_CONFIGS["ViT-B/32"])), str(clip))
    tokenizer = train_gpt2_tokenizer(directory / "tokenizer", vocab_size=400)
    model = ref.build_random_clipcap("mlp", "real", seed=0, init_scale=3.0)
    checkpoint = ref.save_official(model, directory / "mlp.pt")
    convert_model(ClipCap, checkpoint, clip, tokenizer, directory / "model", name="real")
    return directory / "model", clip


def measure(label, model_dir, clip_file, photos, repeats, work):
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP

    model = ClipCap.load(str(model_dir))
    image_only = ClipCap.load(str(model_dir), clip=CLIP.from_pretrained(str(clip_file), visual_only=True))
    image_only_dir = image_only.save(Path(work) / f"{label}_image_only")
    ClipCap.load(str(model_dir)), ClipCap.load(image_only_dir)  # page cache warm
    load_lazy = best_of(lambda: ClipCap.load(str(model_dir)), repeats)
    load_image_only = best_of(lambda: ClipCap.load(image_only_dir), repeats)
    start = time.perf_counter()
    model.clip.load_text()
    load_text = time.perf_counter() - start

    embeddings = model.encode_images(photos)
    settings = dict(method="beam", beam_size=5, max_length=20)
    model.generate(embeddings, **settings, compile_now=True)  # compiled before timing
    model.generate(embeddings, **settings, rerank="clip", compile_now=True)
    beam = best_of(lambda: model.generate(embeddings, **settings, compile_now=True), repeats)
    reranked = best_of(lambda: model.generate(embeddings, **settings, rerank="clip", compile_now=True), repeats)
    results = model.generate(embeddings, **settings, num_captions=5, rerank="clip", compile_now=True)
    best_chosen = all(r[0]["clip_score"] == max(c["clip_score"] for c in r) for r in results)
    changed = sum(r[0]["tokens"] != p[0]["tokens"]
                  for r, p in zip(results, model.generate(embeddings, **settings, num_captions=5, compile_now=True)))
    print(f"| {label} | {len(photos)} x 5 | {beam:.3f} | {reranked:.3f} | {reranked / beam:.2f}x | "
          f"{'yes' if best_chosen else 'NO'} ({changed} of {len(photos)} changed) | {load_image_only:.3f} | "
          f"{load_lazy:.3f} | {load_text:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="also the released sizes (ViT-B/32, GPT-2 124M)")
    parser.add_argument("--real-only", action="store_true", help="the released sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_machine()
    photos = sorted(glob.glob(str(ROOT / "demo" / "*.jpg")))
    print("| model | images x beams | beam s | beam + rerank s | ratio | chosen = best CLIPScore | "
          "load image-only s | load with text (lazy) s | first load_text s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        if not args.real_only:
            model_dir, clip = tiny_model(Path(work) / "tiny")
            measure("tiny", model_dir, clip, photos, args.repeats, work)
        if args.real or args.real_only:
            model_dir, clip = real_model(Path(work) / "real")
            measure("ViT-B/32 + GPT-2 124M", model_dir, clip, photos, args.repeats, work)


if __name__ == "__main__":
    main()
