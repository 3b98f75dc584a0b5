"""ClipCap captioning throughput: our batched, KV-cached, XLA-compiled decoding vs the official way vs
transformers' ``GPT2LMHeadModel.generate``, side by side on the same random full-size weights, CPU.

Models (random weights, the released sizes): CLIP RN50x4 + transformer mapper (K = L = 40, 8 layers) +
GPT-2 124M, and CLIP ViT-B/32 + MLP mapper (K = 10) + GPT-2 124M. Inputs: 16 photographs of
``skimage.data``. Greedy and beam search (5 beams), 20 generated tokens, no early stop (our stop token is
disabled, the official decoders get an unreachable stop id, transformers gets no EOS id), so every column
does the same number of steps.

Columns (images per second; the decode rows start from the same CLIP embeddings / prefixes):

- ours: `ClipCap` (one batch of 16: CLIP encoding, mapper, compiled decoding loop);
- official: the released ClipCap code path (``unitest/reference/clipcap_official.py``): one image at a time,
  no KV cache, the whole sequence recomputed each step (``generate2`` / ``generate_beam``). It is slow, so
  it runs on fewer images (said in the table);
- transformers: ``GPT2LMHeadModel.generate(inputs_embeds=prefix, ...)``, batched over the 16 images with its
  KV cache (greedy, and ``num_beams=5``); the end-to-end row adds OpenAI's batched CLIP encoding.

Also printed: decode FLOP/s of our loop (matmul FLOPs of the prefill and of every step, lm head included)
as a fraction of this machine's measured fp32 matmul peak (a large TF matmul).

Run from the repository root (about 10 minutes on 2 cores)::

    python -m benchmarks.bench_clipcap
    python -m benchmarks.bench_clipcap --configs mlp --official-images 4 --threads 2
"""

import argparse
import os
import tempfile
import time
import warnings

# torchvision (imported by transformers' PyTorch models and the clip package) must come before TensorFlow
import torch  # noqa: I001
import torchvision  # noqa: F401

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from clip.clip import _transform
    from clip.model import CLIP as TorchCLIP

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from unitest.reference import clipcap_official as ref  # noqa: E402

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "brick")
CLIPS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None),
}
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=1)
CONFIGS = {
    "transformer": ("RN50x4", "transformer"),
    "mlp": ("ViT-B/32", "mlp"),
}


class _NoStop:
    """A tokenizer view for the official decoders whose stop token id is unreachable (-1): no early stop."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return [-1]

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def photos():
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]


def matmul_peak(size=4096, repeats=5):
    """Best fp32 FLOP/s of a (size x size) @ (size x size) TF matmul on this machine."""
    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    fn(a, b)
    best = min(_timed(lambda: fn(a, b).numpy()) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeats):
    fn()  # warm-up: compilation and caches excluded
    return min(_timed(fn) for _ in range(repeats))


def decode_flops(gpt2, k, max_length, rows_per_image):
    """Matmul FLOPs per image of our decode: prefill of K positions (head on the last one only), then
    max_length - 1 steps for `rows_per_image` rows (attention over the cache included)."""
    c, layers, v = gpt2.n_embd, gpt2.n_layer, gpt2.vocab_size
    per_token_body = 2 * layers * 12 * c * c  # qkv 3C^2 + proj C^2 + mlp 8C^2
    slots = k + max_length - 1
    prefill = k * per_token_body + 2 * layers * 2 * k * slots * c + 2 * c * v
    step = per_token_body + 2 * layers * 2 * slots * c + 2 * c * v
    return prefill + rows_per_image * (max_length - 1) * step


def build(clip_name, kind, directory, tokenizer_dir):
    """Random full-size torch CLIP + official ClipCap, saved in the official formats and converted."""
    from models.image_captioning.clip_cap import ClipCap

    torch.manual_seed(0)
    torch_clip = TorchCLIP(**CLIPS[clip_name], **TEXT).float().eval()
    clip_path = os.path.join(directory, f"{kind}_clip.pt")
    torch.save(torch_clip.state_dict(), clip_path)
    torch_model = ref.build_random_clipcap(kind, "real", seed=1)
    checkpoint = ref.save_official(torch_model, os.path.join(directory, f"{kind}.pt"))
    model = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=tokenizer_dir)
    return torch_clip, torch_model, model


def bench_config(name, args, directory, tokenizer_dir, images, peak):
    clip_name, kind = CONFIGS[name]
    torch_clip, torch_model, model = build(clip_name, kind, directory, tokenizer_dir)
    transform = _transform(torch_clip.visual.input_resolution)
    n, length = len(images), args.max_length
    normalize = model.config["normalize_prefix"]
    no_stop = _NoStop(model.tokenizer)
    hf = torch_model.gpt
    hf.generation_config.eos_token_id = None  # 20 tokens for everyone
    hf.generation_config.pad_token_id = 0

    def torch_embed(batch):
        with torch.no_grad():
            e = torch_clip.encode_image(torch.stack([transform(im.convert("RGB")) for im in batch])).float()
            return torch_model.project(ref.normalize_embedding(e) if normalize else e)

    embeddings = model.encode_images(images)
    prefix_torch = torch_embed(images)
    rows = []
    for method, beams in (("greedy", 1), ("beam", args.beam_size)):
        gen_kw = dict(method=method, beam_size=args.beam_size, max_length=length, stop_token=None)
        n_official = args.official_images if method == "greedy" else args.official_beam_images

        def official_decode(prefixes, method=method):
            with torch.no_grad():
                for p in prefixes:
                    if method == "greedy":
                        ref.generate2(torch_model, no_stop, p[None], entry_length=length)
                    else:
                        ref.generate_beam(torch_model, no_stop, args.beam_size, p[None], entry_length=length)

        def hf_decode(prefixes, beams=beams):
            with torch.no_grad():
                hf.generate(inputs_embeds=prefixes, attention_mask=torch.ones(prefixes.shape[:2], dtype=torch.long),
                            max_new_tokens=length, do_sample=False, num_beams=beams)

        start = time.perf_counter()
        model.generate(embeddings, **gen_kw)
        compile_s = time.perf_counter() - start
        ours_decode = best_of(lambda kw=gen_kw: model.generate(embeddings, **kw), args.repeats)
        ours_e2e = best_of(lambda kw=gen_kw: model.caption(images, **kw), args.repeats)
        official_dec = _timed(lambda m=n_official: official_decode(prefix_torch[:m])) / n_official
        official_e2e = official_dec + _timed(lambda m=n_official: [torch_embed([im]) for im in images[:m]]) / n_official
        hf_dec = best_of(lambda: hf_decode(prefix_torch), 1)
        hf_e2e = hf_dec + _timed(lambda: torch_embed(images))
        flops = decode_flops(model.gpt2, model.prefix_length, length, beams) * n / ours_decode
        label = f"{clip_name} + {kind} K={model.prefix_length}, {method}" + (f" {beams}" if beams > 1 else "")
        for stage, ours_s, off_s, hf_s in (("decode", ours_decode, official_dec * n, hf_dec),
                                          ("end to end", ours_e2e, official_e2e * n, hf_e2e)):
            rows.append((label, stage, n / ours_s, n / off_s, n / hf_s, off_s / ours_s, hf_s / ours_s,
                         n_official, flops / peak if stage == "decode" else None, compile_s))
        print(f"  done: {label}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--official-images", type=int, default=4, help="images run the official way (greedy)")
    parser.add_argument("--official-beam-images", type=int, default=2, help="images run the official way (beam)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from unitest.tiny_models import train_tiny_tokenizer

    images = photos()
    peak = matmul_peak()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        tokenizer_dir = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))  # decoding only
        for name in args.configs:
            rows += bench_config(name, args, directory, tokenizer_dir, images, peak)

    print(f"\n{len(images)} photographs (skimage.data), {args.max_length} generated tokens without early stop, "
          f"torch and TF on {args.threads} threads; fp32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s\n")
    print("| model, method | stage | ours img/s | official img/s | transformers img/s | ours / official "
          "| ours / transformers | decode FLOP/s / peak | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, stage, ours, off, hf, r_off, r_hf, n_off, eff, compile_s in rows:
        print(f"| {label} | {stage} | {ours:.2f} | {off:.3f} ({n_off} img) | {hf:.2f} | {r_off:.1f}x | "
              f"{r_hf:.2f}x | {'' if eff is None else f'{100 * eff:.0f}%'} | "
              f"{'' if stage != 'decode' else f'{compile_s:.0f}'} |")


if __name__ == "__main__":
    main()
