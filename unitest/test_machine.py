"""benchmarks.machine: every benchmark names the CPU it ran on and its bf16 / AMX flags."""

import ast
from pathlib import Path

from benchmarks.machine import FLAGS, cpu_info, describe_machine

ROOT = Path(__file__).resolve().parents[1]

INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile
"""
AMD = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"


def test_cpu_model_and_flags(tmp_path):
    (tmp_path / "intel").write_text(INTEL)
    (tmp_path / "amd").write_text(AMD)
    assert cpu_info(tmp_path / "intel") == ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                                            {"fpu", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                             "avx512_bf16", "amx_bf16", "amx_tile"})
    line = describe_machine(tmp_path / "amd")
    assert line.startswith("machine: AMD EPYC 7B13, ") and "avx2 yes" in line and "avx512_bf16 no" in line
    assert all(f"{flag} " in line for flag in FLAGS)
    assert "flags unknown" in describe_machine(tmp_path / "missing")


def test_cpu_info_reads_the_first_processor_only(tmp_path, monkeypatch):
    """A many-core machine's /proc/cpuinfo repeats each processor's block: reading stops after the first one's
    (a file whose later blocks are 8 MB, and one with no line end at all, are read no further)."""
    many = tmp_path / "many"
    many.write_text(INTEL.split("\n\n")[0] + "\n\n" + "processor\t: 1\nflags\t\t: " + "x" * (8 << 20) + "\n")
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def readline(self, limit):
            line = self.f.readline(limit)
            reads.append(len(line))
            return line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import custom_layers.cpu_features as cpu_features

    monkeypatch.setattr(cpu_features, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    model, flags = cpu_info(many)
    assert model.startswith("Intel(R) Xeon(R)") and "amx_bf16" in flags and sum(reads) < 1000
    (tmp_path / "one_line").write_text("flags : avx2 " + "y" * (4 << 20))
    assert len(cpu_info(tmp_path / "one_line")[1]) == 2  # bounded: the first MAX_CPUINFO_BYTES of the line


def test_machine_line_names_bf16_and_amx(tmp_path, monkeypatch):
    """The line says whether bfloat16 is native (AMX or AVX512_BF16), emulated by oneDNN (AVX-512), or on
    TensorFlow's own kernels (AVX2 only: oneDNN has none), names a user's ONEDNN_MAX_CPU_ISA, and lists the
    int8 flags."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    (tmp_path / "intel").write_text(INTEL)
    (tmp_path / "amd").write_text(AMD)
    (tmp_path / "cooper").write_text(AMD.replace("AMD EPYC 7B13", "Xeon 8380H").replace(
        "fma", "fma avx512f avx512bw avx512vl avx512dq avx512_bf16"))
    intel = describe_machine(tmp_path / "intel")
    assert "amx_bf16 yes" in intel and "amx_int8 no" in intel and "avx512_vnni no" in intel
    assert intel.endswith("; bfloat16 native")
    assert describe_machine(tmp_path / "cooper").endswith("; bfloat16 native")
    assert describe_machine(tmp_path / "amd").endswith(
        "; bfloat16 on TensorFlow's own kernels, oneDNN has none here (slower than float32)")
    (tmp_path / "skylake").write_text(AMD.replace("fma", "fma avx512f avx512bw avx512vl avx512dq"))
    assert describe_machine(tmp_path / "skylake").endswith("; bfloat16 emulated by oneDNN (slower than float32)")
    assert describe_machine(tmp_path / "missing").endswith("bfloat16 unknown")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert describe_machine(tmp_path / "amd").endswith(
        "; bfloat16 on TensorFlow's own kernels, oneDNN has none here (slower than float32); ONEDNN_MAX_CPU_ISA=AVX2")
    skylake = describe_machine(tmp_path / "skylake")  # TensorFlow still hands oneDNN bfloat16 there
    assert skylake.endswith("ONEDNN_MAX_CPU_ISA=AVX2") and ("bfloat16 refused here" in skylake) == oneDNN_on()


def oneDNN_on():
    from tensorflow.python.util import _pywrap_util_port

    return _pywrap_util_port.IsMklEnabled()


def test_every_benchmark_prints_its_machine():
    """Each script of benchmarks/ with a ``main`` calls `print_machine` in it."""
    scripts = [p for p in sorted((ROOT / "benchmarks").glob("*.py"))
               if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)]
    assert len(scripts) >= 9
    for path in scripts:
        main = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "print_machine" in calls, f"{path.name} does not print the machine it runs on"
