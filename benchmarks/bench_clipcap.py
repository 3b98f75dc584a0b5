"""ClipCap captioning throughput: our batched, KV-cached, XLA-compiled decoding vs the official way vs
transformers' ``GPT2LMHeadModel.generate``, side by side on the same random full-size weights, CPU.

Models (random weights, the released sizes): CLIP RN50x4 + transformer mapper (K = L = 40, 8 layers) +
GPT-2 124M, and CLIP ViT-B/32 + MLP mapper (K = 10) + GPT-2 124M. Inputs: 16 photographs of
``skimage.data``. Greedy and beam search (5 beams), 20 generated tokens, no early stop (our stop token is
disabled, the official decoders get an unreachable stop id, transformers gets no EOS id), so every column
does the same number of steps.

Columns (images per second; the decode rows start from the same CLIP embeddings / prefixes):

- ours: `ClipCap` (one batch of 16: CLIP encoding, mapper, compiled decoding loop);
- official: the released ClipCap code path (``testing/clipcap_official.py``): one image at a time,
  no KV cache, the whole sequence recomputed each step (``generate2`` / ``generate_beam``). It is slow, so
  it runs on fewer images (said in the table);
- transformers: ``GPT2LMHeadModel.generate(inputs_embeds=prefix, ...)``, batched over the 16 images with its
  KV cache (greedy, and ``num_beams=5``); the end-to-end row adds OpenAI's batched CLIP encoding.

- ours bf16: the same model loaded in bfloat16 (``ClipCap.load(..., precision="bfloat16")``, here
  ``to_precision``: bf16 weights, matmuls and convolutions, float32 layer norms, softmax and scores), timed
  in the same rounds as ours (interleaved), with its agreement with ours on these photos: the rate of
  identical captions and the mean token agreement (position by position over the float32 caption's tokens;
  a length difference counts as disagreement). ``--no-bf16`` skips it.

Also printed: decode FLOP/s of our loop (matmul FLOPs of the prefill and of every step, lm head included)
as a fraction of this machine's measured fp32 matmul peak (a large TF matmul).

A second table runs the concurrent pipeline, ``model.predict`` over 64 photographs (the 16 and their
rotations by 90, 180 and 270 degrees; batches of 16, greedy, 20 tokens, no map.json), next to its stages
run alone one after the other over the same images: preprocessing (``clip.preprocess``), CLIP encoding
(``clip.encode_pixels``) and decoding (``model.generate``). *pipeline / sum* > 1 is what the overlap of the
stages gains; *pipeline / official* compares with the official way's end-to-end greedy speed of the first
table. Encoding and decoding both run near the matmul peak on both cores, so the overlap can only hide
preprocessing and the decoder's idle time, never exceed the sum of the compute.

Run from the repository root (about 10 minutes on 2 cores)::

    python -m benchmarks.bench_clipcap
    python -m benchmarks.bench_clipcap --configs mlp --official-images 4 --threads 2
    python -m benchmarks.bench_clipcap --pipeline-only     # the predict table alone (official speed not measured)
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

from PIL import Image

from benchmarks.flops import matmul_peak
from benchmarks.machine import print_machine, use_threads
from testing import clipcap_official as ref
from testing.clip_configs import bench_clip_config

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "brick")
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


def rotated(images):
    """The images and their rotations by 90, 180 and 270 degrees (4x as many distinct inputs)."""
    turns = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return [im if turn is None else im.transpose(turn) for turn in turns for im in images]


def bench_pipeline(model, images, args, batch_size=16):
    """Seconds of ``model.predict`` over `images` and of its stages run alone, one after the other:
    ``{"preprocess", "encode", "decode", "pipeline"}``, each the best of ``args.repeats`` rounds; a round
    runs the stages alone then the pipeline, so a busy machine slows both sides alike."""
    import numpy as np

    gen_kw = dict(method="greedy", max_length=args.max_length, stop_token=None)
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    clip = model.clip
    for _ in range(2):  # warm-up: under "auto" a shape's second call starts its background build
        model.generate(model.encode_images(batches[0]), **gen_kw)
    model.wait_for_builds()  # compilation excluded
    times = dict.fromkeys(("preprocess", "encode", "decode", "pipeline"), float("inf"))
    for _ in range(args.repeats):
        start = time.perf_counter()
        pixels = [np.stack([clip.preprocess(im) for im in batch]) for batch in batches]
        times["preprocess"] = min(times["preprocess"], time.perf_counter() - start)
        start = time.perf_counter()
        embeddings = [clip.encode_pixels(p) for p in pixels]
        times["encode"] = min(times["encode"], time.perf_counter() - start)
        start = time.perf_counter()
        for e in embeddings:
            model.generate(e, **gen_kw)
        times["decode"] = min(times["decode"], time.perf_counter() - start)
        times["pipeline"] = min(times["pipeline"], _timed(lambda: model.predict(
            images, batch_size=batch_size, save=False, progress=False, **gen_kw)))
    return times


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeats):
    fn()  # warm-up: compilation and caches excluded
    return min(_timed(fn) for _ in range(repeats))


def best_of_each(fns, repeats, models=()):
    """Best time of each function of ``{name: fn}``, after two warm-up calls each (under "auto" a shape's
    second call starts its background build) and the background builds of ``models`` (`ClipCap`s) done, the
    functions taking turns within each of ``repeats`` rounds (a busy machine slows all of them alike)."""
    for fn in fns.values():
        fn()
        fn()
    for model in models:
        model.wait_for_builds()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return best


def agreement(candidates, reference):
    """(exact caption rate, mean token agreement) of ``generate`` results against ``reference``'s: the best
    caption of each image; tokens compared position by position over the reference's length (a shorter or
    longer caption disagrees where it differs)."""
    exact, tokens = [], []
    for mine, theirs in zip(candidates, reference):
        a, b = mine[0]["tokens"], theirs[0]["tokens"]
        exact.append(a == b)
        same = sum(x == y for x, y in zip(a, b))
        tokens.append(same / max(len(a), len(b), 1))
    return sum(exact) / len(exact), sum(tokens) / len(tokens)


def decode_flops(gpt2, k, max_length, rows_per_image):
    """Matmul FLOPs per image of our decode: prefill of K positions (head on the last one only), then
    max_length - 1 steps for `rows_per_image` rows (attention over the cache included)."""
    c, layers, v = gpt2.n_embd, gpt2.n_layer, gpt2.vocab_size
    per_token_body = 2 * layers * 12 * c * c  # qkv 3C^2 + proj C^2 + mlp 8C^2
    slots = k + max_length - 1
    prefill = k * per_token_body + 2 * layers * 2 * k * slots * c + 2 * c * v
    step = per_token_body + 2 * layers * 2 * slots * c + 2 * c * v
    return prefill + rows_per_image * (max_length - 1) * step


def offset_logits(gpt, offset, seed=2):
    """Give a random GPT-2 (torch ``GPT2LMHeadModel``) logits around ``offset``, as a trained GPT-2's lie
    around -100 (its final hidden states and its token embeddings share a direction): wte and ln_f's bias each
    gain a unit vector u, times 1 and ``offset`` (each logit then gains ``offset``, plus token and row terms
    of a few units). Still a random model: what it changes is the scale bfloat16 rounds logits at."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(gpt.config.n_embd, generator=generator)
    u /= u.norm()
    with torch.no_grad():
        gpt.transformer.wte.weight += u  # tied: lm_head.weight is the same tensor
        gpt.transformer.ln_f.bias += offset * u


def build(clip_name, kind, directory, tokenizer_dir, logit_offset=0.0):
    """Random full-size torch CLIP + official ClipCap, saved in the official formats and converted;
    ``logit_offset``: GPT-2's logits moved there (`offset_logits`)."""
    from models.image_captioning.clip_cap import ClipCap

    torch.manual_seed(0)
    torch_clip = TorchCLIP(**bench_clip_config(clip_name)).float().eval()
    clip_path = os.path.join(directory, f"{kind}_clip.pt")
    torch.save(torch_clip.state_dict(), clip_path)
    torch_model = ref.build_random_clipcap(kind, "real", seed=1)
    if logit_offset:
        offset_logits(torch_model.gpt, logit_offset)
    checkpoint = ref.save_official(torch_model, os.path.join(directory, f"{kind}.pt"))
    model = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=tokenizer_dir)
    bf16 = ClipCap.from_pretrained(checkpoint, clip=clip_path, tokenizer=tokenizer_dir).to_precision("bfloat16")
    return torch_clip, torch_model, model, bf16


def bench_config(name, args, directory, tokenizer_dir, images, peak):
    """(rows of the first table, row of the pipeline table) for one model kind."""
    clip_name, kind = CONFIGS[name]
    torch_clip, torch_model, model, bf16 = build(clip_name, kind, directory, tokenizer_dir)
    if not args.bf16:
        bf16 = None
    pipeline = None
    if not args.no_pipeline:
        pipeline = (f"{clip_name} + {kind}", bench_pipeline(model, rotated(images), args))
        print(f"  done: {pipeline[0]}, pipeline", flush=True)
    if args.pipeline_only:
        return [], pipeline
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
        fns = {"decode": lambda kw=gen_kw: model.generate(embeddings, **kw),
               "e2e": lambda kw=gen_kw: model.caption(images, **kw)}
        if bf16 is not None:
            fns.update({"bf16 decode": lambda kw=gen_kw: bf16.generate(embeddings, **kw),
                        "bf16 e2e": lambda kw=gen_kw: bf16.caption(images, **kw)})
        times = best_of_each(fns, args.repeats, models=[m for m in (model, bf16) if m is not None])
        ours_decode, ours_e2e = times["decode"], times["e2e"]
        agree = None
        if bf16 is not None:
            agree = agreement(bf16.generate(bf16.encode_images(images), **gen_kw),
                              model.generate(embeddings, **gen_kw))
        official_dec = _timed(lambda m=n_official: official_decode(prefix_torch[:m])) / n_official
        official_e2e = official_dec + _timed(lambda m=n_official: [torch_embed([im]) for im in images[:m]]) / n_official
        hf_dec = best_of(lambda: hf_decode(prefix_torch), 1)
        hf_e2e = hf_dec + _timed(lambda: torch_embed(images))
        flops = decode_flops(model.gpt2, model.prefix_length, length, beams) * n / ours_decode
        label = f"{clip_name} + {kind} K={model.prefix_length}, {method}" + (f" {beams}" if beams > 1 else "")
        for stage, ours_s, off_s, hf_s, bf16_s in (
                ("decode", ours_decode, official_dec * n, hf_dec, times.get("bf16 decode")),
                ("end to end", ours_e2e, official_e2e * n, hf_e2e, times.get("bf16 e2e"))):
            rows.append((label, stage, n / ours_s, n / off_s, n / hf_s, off_s / ours_s, hf_s / ours_s,
                         n_official, flops / peak if stage == "decode" else None, compile_s,
                         None if bf16_s is None else (n / bf16_s, ours_s / bf16_s, off_s / bf16_s, agree)))
        print(f"  done: {label}", flush=True)
    return rows, pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--official-images", type=int, default=4, help="images run the official way (greedy)")
    parser.add_argument("--official-beam-images", type=int, default=2, help="images run the official way (beam)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline-only", action="store_true", help="only the predict-over-64-photos table")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the predict-over-64-photos table")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip the bfloat16 columns (ours loaded with precision='bfloat16')")
    args = parser.parse_args()
    print_machine()

    use_threads(args.threads)
    from testing.tiny_models import train_tiny_tokenizer

    images = photos()
    peak = matmul_peak()
    rows, pipelines = [], []
    with tempfile.TemporaryDirectory() as directory:
        tokenizer_dir = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))  # decoding only
        for name in args.configs:
            config_rows, pipeline = bench_config(name, args, directory, tokenizer_dir, images, peak)
            rows += config_rows
            pipelines += [pipeline] if pipeline else []

    print(f"\n{len(images)} photographs (skimage.data), {args.max_length} generated tokens without early stop, "
          f"torch and TF on {args.threads} threads; fp32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s\n")
    if not rows:
        return print_pipelines(pipelines, rows, 4 * len(images))
    print("| model, method | stage | ours img/s | official img/s | transformers img/s | ours / official "
          "| ours / transformers | decode FLOP/s / peak | compile s | bf16 img/s | bf16 / fp32 | bf16 / official "
          "| bf16 agreement: exact captions, tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, stage, ours, off, hf, r_off, r_hf, n_off, eff, compile_s, half in rows:
        bf16 = " | | | "
        if half is not None:
            speed, vs_fp32, vs_official, (exact, tokens) = half
            bf16 = (f"{speed:.2f} | {vs_fp32:.2f}x | {vs_official:.1f}x | "
                    + (f"{100 * exact:.0f}%, {100 * tokens:.1f}%" if stage == "decode" else ""))
        print(f"| {label} | {stage} | {ours:.2f} | {off:.3f} ({n_off} img) | {hf:.2f} | {r_off:.1f}x | "
              f"{r_hf:.2f}x | {'' if eff is None else f'{100 * eff:.0f}%'} | "
              f"{'' if stage != 'decode' else f'{compile_s:.0f}'} | {bf16} |")
    if pipelines:
        print_pipelines(pipelines, rows, 4 * len(images))


def print_pipelines(pipelines, rows, n):
    """The predict-over-n-photos table; the official greedy end-to-end speed comes from `rows` (if run)."""
    official = {label.split(" K=")[0]: off for label, stage, _, off, *_ in rows
                if stage == "end to end" and label.endswith("greedy")}
    print(f"\npredict over {n} photographs, batches of 16, greedy; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n")
    print("| model | preprocess img/s | encode img/s | decode img/s | sum of stages img/s | pipeline img/s "
          "| pipeline / sum | pipeline / official |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, t in pipelines:
        total = t["preprocess"] + t["encode"] + t["decode"]
        ratio = f"{n / t['pipeline'] / official[label]:.1f}x" if label in official else ""
        print(f"| {label} | {n / t['preprocess']:.1f} | {n / t['encode']:.2f} | {n / t['decode']:.2f} | "
              f"{n / total:.2f} | {n / t['pipeline']:.2f} | {total / t['pipeline']:.2f}x | {ratio} |")


if __name__ == "__main__":
    main()
