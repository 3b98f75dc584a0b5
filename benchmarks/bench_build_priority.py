"""Where a background build's CPU goes, by thread and niceness (issue 24, item 2: no call slower than the
uncompiled path).

Under ``jit_compile="auto"`` a recurring shape's loop is compiled in a background thread while the uncompiled
path serves the calls (`custom_architectures.compile_policy.tier`). Work of the build at niceness 0 takes the
cores from the calls beside it; work at niceness 19 takes only what they leave idle. This script starts one
build (GPT-2 124M with random weights, 16 images, prefix K = 40, greedy, 20 tokens: bench_decode's tiering
shape), runs no call beside it, and sums each thread's CPU seconds (``/proc/self/task``, sampled every 50 ms)
by the niceness the thread had then. CPU seconds, unlike wall times, do not depend on how busy the machine
is. Linux only.

Run from the repository root (about a minute on 2 quiet cores)::

    python -m benchmarks.bench_build_priority
"""

import argparse
import os
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks.machine import print_machine, use_threads
from custom_architectures.compile_policy import thread_times
from custom_architectures.generation_utils import Greedy, PrefixDecoder
from custom_architectures.transformers_arch.gpt2_arch import GPT2


def build_cpu(decoder, prefix, max_length, interval=0.05):
    """Start the background build of ``prefix``'s shape (two "auto" calls) and sample until it is ready:
    ({(thread id, name): {niceness: CPU s}}, wall seconds of the build)."""
    sampler = Greedy()
    decoder(prefix[:1], sampler, max_length=max_length, jit_compile="auto")  # one-off costs: another shape
    for _ in range(2):  # the second call starts the build when it returns
        decoder(prefix, sampler, max_length=max_length, jit_compile="auto")
    me, ticks = threading.get_native_id(), os.sysconf("SC_CLK_TCK")
    per_thread, last, start = {}, thread_times(), time.perf_counter()
    while True:
        done = decoder.ready(len(prefix), prefix.shape[1], max_length, sampler)
        time.sleep(interval)
        now = thread_times()
        for tid, (name, used, started) in now.items():
            before = last[tid][1] if tid in last and last[tid][2] == started else 0
            if tid == me or used <= before:
                continue
            try:
                niceness = os.getpriority(os.PRIO_PROCESS, tid)
            except OSError:  # ended meanwhile
                continue
            by_nice = per_thread.setdefault((tid, name), {})
            by_nice[niceness] = by_nice.get(niceness, 0.0) + (used - before) / ticks
        last = now
        if done:
            return per_thread, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prefix-length", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print_machine()
    use_threads(args.threads)
    gpt2 = GPT2()
    prefix = np.random.default_rng(0).normal(0.0, 1.0, (args.images, args.prefix_length, 768)).astype(np.float32)
    per_thread, wall = build_cpu(PrefixDecoder(gpt2), prefix, args.max_length)
    totals = {}
    for by_nice in per_thread.values():
        for niceness, seconds in by_nice.items():
            totals[niceness] = totals.get(niceness, 0.0) + seconds
    print(f"\nbackground build of the greedy loop ({args.images} images, K={args.prefix_length}, {args.max_length} "
          f"tokens), no call beside it: {wall:.1f} s wall; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n")
    print("| thread | name | CPU s | at niceness |")
    print("|---:|---|---:|---|")
    for (tid, name), by_nice in sorted(per_thread.items(), key=lambda item: -sum(item[1].values())):
        if sum(by_nice.values()) >= 0.02:
            shown = ", ".join(f"{n}: {s:.2f}" for n, s in sorted(by_nice.items()))
            print(f"| {tid} | {name} | {sum(by_nice.values()):.2f} | {shown} |")
    print("\nCPU s by niceness (niceness 0 is what the calls beside a build lose): "
          + ", ".join(f"{n}: {s:.2f}" for n, s in sorted(totals.items())))


if __name__ == "__main__":
    main()
