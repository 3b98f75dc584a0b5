"""What this machine's CPU can do fast: its model name and /proc/cpuinfo flags (the first processor's, bounded).

Shared by the library (``precision="bfloat16"`` warns at load where the CPU has no bf16 instructions:
`models.precision`) and by ``benchmarks/machine.py`` (every benchmark prints the CPU and its flags first).
bfloat16 matmuls and convolutions are fast where the CPU has AMX (``amx_bf16``: Intel Sapphire Rapids and
later) or AVX512_BF16 (``avx512_bf16``: Cooper Lake, AMD Zen 4 and later). Elsewhere they are correct but
slower than float32: on other AVX-512 CPUs oneDNN emulates them with float32 instructions plus conversions; on
a CPU without AVX-512 (AVX2 only: AMD Zen 2 / Zen 3, Intel before Skylake-SP) oneDNN has no bfloat16 kernel at
all, and TensorFlow runs its bfloat16 ops on its own (Eigen) kernels instead (`onednn_runs_bfloat16`,
`tensorflow_sends_bfloat16_to_onednn`). An op handed to oneDNN where it has no bfloat16 kernel throws from
inside TensorFlow's kernel, which aborts the process: `custom_layers.packed_weights` and `models.precision`
check these first.

Example::

    model, flags = cpu_info()           # ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", {"avx2", ...})
    has_fast_bfloat16(flags)            # True where amx_bf16 or avx512_bf16 is present
    onednn_runs_bfloat16(flags)         # True where oneDNN has bfloat16 kernels (AVX-512, or AVX-NE-CONVERT)
"""

import os
import platform

CPUINFO = "/proc/cpuinfo"
#: /proc/cpuinfo of a many-core machine is ~100 KB: read at most this much (the first processor is enough)
MAX_CPUINFO_BYTES = 1 << 20
#: the flags that give a CPU native bfloat16 matmuls (any one is enough)
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")
#: oneDNN's instruction sets with bfloat16 kernels (its ISA name -> the /proc/cpuinfo flags it needs, all of
#: them): ``avx512_core`` (every AVX-512 CPU since Skylake-SP, AMD Zen 4; bfloat16 native with avx512_bf16 or
#: AMX, emulated otherwise) and ``avx2_vnni_2`` (Intel's AVX-NE-CONVERT cores, e.g. Sierra Forest)
ONEDNN_BFLOAT16_ISAS = {
    "AVX512_CORE": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "AVX2_VNNI_2": ("avx_vnni", "avx_ne_convert"),
}
#: values of oneDNN's ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) that cap it below both of those
ISA_CAPS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


def cpu_info(path=CPUINFO):
    """``(model name, set of flags)`` of the first processor in ``path`` (Linux' /proc/cpuinfo); the model is
    `platform.processor()` (or "unknown") and the flags empty where the file cannot be read (macOS, Windows).
    Reads up to the end of the first processor's block (a few KB whatever the number of cores: the library
    asks at load and while tracing), `MAX_CPUINFO_BYTES` at most."""
    model, flags, budget = None, set(), MAX_CPUINFO_BYTES
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            while budget > 0 and (line := f.readline(budget)):
                budget -= len(line)
                key, _, value = line.partition(":")
                key = key.strip()
                if not key and flags:  # a blank line after the flags: the first processor's block is over
                    break
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM
                    flags = set(value.split())
    except OSError:
        return platform.processor() or "unknown", set()
    return model or platform.processor() or "unknown", flags


def has_fast_bfloat16(flags):
    """Whether a CPU with these /proc/cpuinfo ``flags`` runs bfloat16 matmuls natively (`BFLOAT16_FLAGS`).
    Unknown flags (an empty set: no /proc/cpuinfo) count as no."""
    return any(flag in flags for flag in BFLOAT16_FLAGS)


def onednn_isa_cap(environ=None):
    """The instruction-set cap a user gave oneDNN (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``), upper
    case, or None."""
    environ = os.environ if environ is None else environ
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = environ.get(name, "").strip()
        if value:
            return value.upper()
    return None


def onednn_runs_bfloat16(flags, environ=None):
    """Whether oneDNN has bfloat16 kernels on a CPU with these /proc/cpuinfo ``flags``: the CPU has the flags
    of one of `ONEDNN_BFLOAT16_ISAS` and no ``ONEDNN_MAX_CPU_ISA`` in ``environ`` (default ``os.environ``)
    caps oneDNN below it. False on an AVX2-only CPU, and for unknown flags (no /proc/cpuinfo)."""
    cap = onednn_isa_cap(environ)
    if cap in ISA_CAPS_WITHOUT_BFLOAT16:
        return False
    isas = {cap: ONEDNN_BFLOAT16_ISAS[cap]} if cap == "AVX2_VNNI_2" else ONEDNN_BFLOAT16_ISAS
    return any(all(flag in flags for flag in needed) for needed in isas.values())


def tensorflow_sends_bfloat16_to_onednn(flags):
    """Whether TensorFlow (with oneDNN on) rewrites a graph's bfloat16 matmuls and convolutions into oneDNN's
    kernels on a CPU with these ``flags``: its own test (``IsBF16SupportedByOneDNNOnThisCPU``: AVX512F or
    AVX_NE_CONVERT, from CPUID), which does not read ``ONEDNN_MAX_CPU_ISA``; elsewhere it keeps its Eigen
    kernels."""
    return "avx512f" in flags or "avx_ne_convert" in flags
