"""Batched decoding against transformers' cached ``GPT2LMHeadModel.generate``, interleaved, and the tiered
"auto" calls of a new shape.

GPT-2 124M with random weights (the same in both: ours converted from the PyTorch model), a prefix of K
random embeddings per image (ClipCap's transformer mapper: K = 40), 16 images, 20 generated tokens without
early stop (no stop token, no EOS). Greedy and beam search (5 beams). Each round runs ours (the compiled
`PrefixDecoder` loop) then transformers on the same prefix; the table gives the median of the rounds and
the ratio (transformers' seconds / ours: > 1 means ours is faster), so a busy machine slows both alike.

The second table times calls 1..6 (``--tier-calls``) of a shape never seen before under ``jit_compile="auto"``:
1 runs uncompiled, 2 recurs (uncompiled too; the loop is then compiled in the background, starting in idle
time or with call 4), the next calls run uncompiled until the compiled loop is ready, then compiled
(`custom_architectures.compile_policy.tier`). ``--tier-pause S`` waits S seconds before each call after
the first (a notebook's pause between cells).
Each round takes a fresh decoder (the shape is new to it) and first times two uncompiled calls
(``jit_compile=False``) as its reference; the table gives, per call, the median over rounds of its seconds
and of its ratio to the round's reference (the target: calls 1-3 <= 1.1x, the uncompiled time plus noise; back to
back, calls 4-5 run beside the build).

Run from the repository root (about 5 minutes on 2 quiet cores)::

    python -m benchmarks.bench_decode
    python -m benchmarks.bench_decode --rounds 5 --methods beam --no-tiering
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: I001  (torch + torchvision before TensorFlow: see ARCHITECTURE.md)
import torchvision  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel

# isort: split
import numpy as np

from benchmarks.machine import print_machine, use_threads
from custom_architectures.generation_utils import Beam, Greedy, PrefixDecoder
from utils.convert.hf_gpt2 import load_gpt2


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_generate(model, prefix, max_length, beams):
    """transformers' cached generate from embeddings, greedy or beam, exactly max_length new tokens."""
    with torch.no_grad():
        return model.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                              max_new_tokens=max_length, min_new_tokens=max_length, do_sample=False,
                              num_beams=beams, pad_token_id=0)


def compare(decoder, torch_model, prefix, method, args):
    """(ours s, transformers s, rounds of both) for one method: medians of interleaved rounds."""
    sampler = Greedy() if method == "greedy" else Beam(beam_size=args.beam_size)
    beams = 1 if method == "greedy" else args.beam_size
    prefix_torch = torch.from_numpy(prefix)

    def ours():
        return decoder(prefix, sampler, max_length=args.max_length, stop_token_id=None, jit_compile=True)

    def theirs():
        return hf_generate(torch_model, prefix_torch, args.max_length, beams)

    compile_s = _timed(ours)  # compiles the loop
    theirs()  # warm-up
    rounds = [(_timed(ours), _timed(theirs)) for _ in range(args.rounds)]
    ours_s, theirs_s = (float(np.median(column)) for column in zip(*rounds, strict=True))
    return ours_s, theirs_s, rounds, compile_s


def tiering_round(gpt2, prefix, args):
    """One round: (reference s, [(seconds, ran compiled) for calls 1..args.tier_calls])."""
    decoder = PrefixDecoder(gpt2)
    sampler = Greedy()
    warm = prefix[:1]  # another shape first: the process's one-off costs (block trace) are not the shape's
    decoder(warm, sampler, max_length=args.max_length, jit_compile="auto")

    def call(jit_compile):
        return _timed(lambda: decoder(prefix, sampler, max_length=args.max_length, jit_compile=jit_compile))

    reference = float(np.median([call(False) for _ in range(2)]))
    calls = []
    for i in range(args.tier_calls):
        if i:
            time.sleep(args.tier_pause)
        compiled = decoder.ready(len(prefix), prefix.shape[1], args.max_length, sampler)
        calls.append((call("auto"), compiled))
    decoder.wait_for_builds()
    return reference, calls


def tiering(gpt2, prefix, args):
    """`tiering_round` ``args.tier_rounds`` times: the rounds, each as returned."""
    return [tiering_round(gpt2, prefix, args) for _ in range(args.tier_rounds)]


def print_tiering(rounds, args):
    print(f"\njit_compile='auto', a new shape ({args.images} images, greedy), {len(rounds)} rounds (each a fresh "
          f"decoder): calls 1..{args.tier_calls} against the round's uncompiled reference (median of 2 "
          f"jit_compile=False calls just before call 1), {args.tier_pause:g} s pause before each call after the "
          f"first; medians over rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| call | seconds | / reference | / call 1 | ran compiled (rounds) | per round / reference |")
    print("|---:|---:|---:|---:|---:|---|")
    for i in range(args.tier_calls):
        seconds = [calls[i][0] for _, calls in rounds]
        ratios = [calls[i][0] / reference for reference, calls in rounds]
        to_first = [calls[i][0] / calls[0][0] for _, calls in rounds]
        compiled = sum(calls[i][1] for _, calls in rounds)
        print(f"| {i + 1} | {np.median(seconds):.2f} | {np.median(ratios):.2f}x | {np.median(to_first):.2f}x | "
              f"{compiled}/{len(rounds)} | {', '.join(f'{r:.2f}' for r in ratios)} |")
    print("\nreference seconds per round: " + ", ".join(f"{reference:.2f}" for reference, _ in rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prefix-length", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["greedy", "beam"], choices=["greedy", "beam"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tiering", action="store_true", help="skip the tiered-'auto' table")
    parser.add_argument("--tier-rounds", type=int, default=3, help="rounds of the tiered-'auto' table")
    parser.add_argument("--tier-calls", type=int, default=6, help="calls per round of the tiered-'auto' table")
    parser.add_argument("--tier-pause", type=float, default=0.0,
                        help="seconds before each tiered call after the first (a notebook's pause between cells)")
    parser.add_argument("--only-tiering", action="store_true", help="the tiered-'auto' table only")
    args = parser.parse_args()
    print_machine()
    use_threads(args.threads)

    torch.manual_seed(0)
    torch_model = GPT2LMHeadModel(GPT2Config()).eval()
    gpt2 = load_gpt2(torch_model.state_dict())
    prefix = np.random.default_rng(0).normal(0.0, 1.0, (args.images, args.prefix_length, 768)).astype(np.float32)
    decoder = PrefixDecoder(gpt2)

    print(f"\nGPT-2 124M (random weights), {args.images} images, prefix K={args.prefix_length}, {args.max_length} "
          f"tokens without early stop, {args.threads} threads, medians of {args.rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| method | ours s | transformers generate s | transformers / ours | ours compile s | rounds (ours, theirs) |")
    print("|---|---:|---:|---:|---:|---|")
    for method in [] if args.only_tiering else args.methods:
        ours_s, theirs_s, rounds, compile_s = compare(decoder, torch_model, prefix, method, args)
        label = method if method == "greedy" else f"beam {args.beam_size}"
        shown = ", ".join(f"({a:.2f}, {b:.2f})" for a, b in rounds)
        print(f"| {label} | {ours_s:.2f} | {theirs_s:.2f} | {theirs_s / ours_s:.2f}x | {compile_s:.0f} | {shown} |",
              flush=True)

    if args.no_tiering:
        return
    print_tiering(tiering(gpt2, prefix, args), args)


if __name__ == "__main__":
    main()
