"""Where int8's compiled kernel should live: one module-level ``tf.function`` (today's
`custom_layers.quantized.compiled_kernel`) against one per owner (a model's or a layer's own
``tf.function(fused_int8_matmul, jit_compile=True)``, made again for every model loaded).

For each of ``--owners`` owners in turn: the time of the first and second calls at GPT-2's one-row shapes
(x (1, K) @ q (N, K): 768x2304, 768x3072, 3072x768, 768x768; each first call of a shape compiles an XLA
program), and the process's resident memory once the owner is dropped (TensorFlow keeps an XLA function's
programs in the device's compilation cache, for the process, keyed by the function: an owner's programs
outlive it). Then the module-level function again at the same shapes.

    python -m benchmarks.bench_int8_owner [--owners 6]
"""

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from custom_layers.quantized import compiled_kernel, fused_int8_matmul, quantize_rows

SHAPES = ((2304, 768), (3072, 768), (768, 3072), (768, 768))  # (N, K) of GPT-2 124M's int8 kernels


def resident_mib():
    """This process's resident memory (Linux /proc/self/statm), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def call_all(kernel, weights, rows):
    """Seconds to call ``kernel`` once at every shape (results fetched)."""
    start = time.perf_counter()
    for q, scale in weights:
        kernel(rows[q.shape[1]], q, scale).numpy()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=6)
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()
    weights = [quantize_rows(tf.random.normal(shape, seed=i)) for i, shape in enumerate(SHAPES)]
    rows = {k: tf.random.normal((1, k), seed=k) for k in {shape[1] for shape in SHAPES}}
    module_first, module_second = call_all(compiled_kernel, weights, rows), call_all(compiled_kernel, weights, rows)
    base = resident_mib()
    print(f"\n{len(SHAPES)} one-row shapes per call; memory: resident growth since the module-level warm-up\n")
    print("| kernel | first calls (s) | second calls (ms) | resident after (MiB) |")
    print("|---|---:|---:|---:|")
    print(f"| module-level (warm-up) | {module_first:.3f} | {module_second * 1e3:.1f} | +0.0 |")
    firsts = []
    for owner in range(args.owners):
        kernel = tf.function(fused_int8_matmul, jit_compile=True, autograph=False)
        first, second = call_all(kernel, weights, rows), call_all(kernel, weights, rows)
        del kernel
        gc.collect()
        firsts.append(first)
        print(f"| owner {owner + 1}'s own | {first:.3f} | {second * 1e3:.1f} | +{resident_mib() - base:.1f} |")
    again = call_all(compiled_kernel, weights, rows)
    print(f"| module-level, again | {again:.3f} | | +{resident_mib() - base:.1f} |")
    print(f"\nper new owner: {statistics.median(firsts):.3f} s of compiling (median) where the module-level kernel "
          f"takes {again * 1e3:.1f} ms; {(resident_mib() - base) / args.owners:.1f} MiB kept per owner dropped")


if __name__ == "__main__":
    main()
