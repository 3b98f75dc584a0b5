"""What this machine's CPU can do fast: its model name and /proc/cpuinfo flags (read once per call, bounded).

Shared by the library (``precision="bfloat16"`` warns at load where the CPU has no bf16 instructions:
`models.precision`) and by ``benchmarks/machine.py`` (every benchmark prints the CPU and its flags first).
bfloat16 matmuls and convolutions are fast where the CPU has AMX (``amx_bf16``: Intel Sapphire Rapids and
later) or AVX512_BF16 (``avx512_bf16``: Cooper Lake, AMD Zen 4 and later); elsewhere oneDNN emulates them
with float32 instructions plus conversions, which is correct but slower than float32.

Example::

    model, flags = cpu_info()           # ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", {"avx2", ...})
    has_fast_bfloat16(flags)            # True where amx_bf16 or avx512_bf16 is present
"""

import platform

CPUINFO = "/proc/cpuinfo"
#: /proc/cpuinfo of a many-core machine is ~100 KB: read at most this much (the first processor is enough)
MAX_CPUINFO_BYTES = 1 << 20
#: the flags that give a CPU native bfloat16 matmuls (any one is enough)
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_info(path=CPUINFO):
    """``(model name, set of flags)`` of the first processor in ``path`` (Linux' /proc/cpuinfo); the model is
    `platform.processor()` (or "unknown") and the flags empty where the file cannot be read (macOS, Windows)."""
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


def has_fast_bfloat16(flags):
    """Whether a CPU with these /proc/cpuinfo ``flags`` runs bfloat16 matmuls natively (`BFLOAT16_FLAGS`).
    Unknown flags (an empty set: no /proc/cpuinfo) count as no."""
    return any(flag in flags for flag in BFLOAT16_FLAGS)
