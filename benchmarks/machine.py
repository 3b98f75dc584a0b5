"""Which machine a benchmark ran on: every script in `benchmarks/` prints this line first, so that a table
always carries its CPU (an AVX2-only AMD EPYC and an Intel Xeon with AVX512_BF16 and AMX give different
numbers, bf16 above all).

Example::

    from benchmarks.machine import print_machine
    print_machine()   # machine: Intel(R) Xeon(R) Processor, 2 CPUs; avx2 yes, fma yes, avx512f yes, ...
"""

import os
import sys

from custom_layers.cpu_features import (
    CPUINFO,
    cpu_info,
    has_fast_bfloat16,
    onednn_isa_cap,
    onednn_runs_bfloat16,
)
from models.precision import bfloat16_blocker

#: the /proc/cpuinfo flags that decide fp32 / bf16 / int8 matmul speed here
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def describe_machine(path=CPUINFO):
    """One line: the CPU model (the CPU reading is `custom_layers.cpu_features`, which the library's bf16 warning
    uses too), the CPUs this process may use, whether each of `FLAGS` is present, whether bfloat16 matmuls
    are native here (``precision="bfloat16"`` is then faster than float32), emulated by oneDNN, or on
    TensorFlow's own kernels (no oneDNN bfloat16: an AVX2-only CPU; both slower) or refused
    (`models.precision.bfloat16_blocker`), and a user's ``ONEDNN_MAX_CPU_ISA`` cap."""
    model, flags = cpu_info(path)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not flags:
        return f"machine: {model}, {cpus} CPUs; flags unknown; bfloat16 unknown"
    known = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)
    if bfloat16_blocker(flags):
        bf16 = "refused here (oneDNN has no bfloat16 kernels here, and TensorFlow would hand it bfloat16 ops)"
    elif has_fast_bfloat16(flags):
        bf16 = "native"
    elif onednn_runs_bfloat16(flags):
        bf16 = "emulated by oneDNN (slower than float32)"
    else:
        bf16 = "on TensorFlow's own kernels, oneDNN has none here (slower than float32)"
    cap = onednn_isa_cap()
    return f"machine: {model}, {cpus} CPUs; {known}; bfloat16 {bf16}" + (f"; ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def print_machine():
    """Print `describe_machine` (a benchmark's first line of output)."""
    print(describe_machine(), flush=True)


def use_threads(threads, inter_op=None):
    """The same number of threads on both sides of a comparison: TensorFlow's intra-op pool and its inter-op
    pool (``inter_op``, default the same), and torch's when the script loaded it."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads if inter_op is None else inter_op)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
