"""Which machine a benchmark ran on: every script in `benchmarks/` prints this line first, so that a table
always carries its CPU (an AVX2-only AMD EPYC and an Intel Xeon with AVX512_BF16 and AMX give different
numbers, bf16 above all).

Example::

    from benchmarks.machine import print_machine
    print_machine()   # machine: Intel(R) Xeon(R) Processor, 2 CPUs; avx2 yes, fma yes, avx512f yes, ...
"""

import os
import platform

#: the /proc/cpuinfo flags that decide fp32 / bf16 matmul speed here
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

CPUINFO = "/proc/cpuinfo"
#: /proc/cpuinfo of a many-core machine is ~100 KB: read at most this much (the first processor is enough)
MAX_CPUINFO_BYTES = 1 << 20


def cpu_info(path=CPUINFO):
    """``(model name, set of flags)`` of the first processor in ``path`` (Linux' /proc/cpuinfo); the model is
    `platform.processor()` (or "unknown") and the flags empty where the file cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_CPUINFO_BYTES)
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = set(value.split())
    return model or platform.processor() or "unknown", flags


def describe_machine(path=CPUINFO):
    """One line: the CPU model, the CPUs this process may use, and whether each of `FLAGS` is present."""
    model, flags = cpu_info(path)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    known = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS) if flags else "flags unknown"
    return f"machine: {model}, {cpus} CPUs; {known}"


def print_machine():
    """Print `describe_machine` (a benchmark's first line of output)."""
    print(describe_machine(), flush=True)
