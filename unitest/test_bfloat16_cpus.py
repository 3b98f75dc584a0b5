"""``precision="bfloat16"`` on every kind of CPU this project runs on, not only the one running the tests.

oneDNN has bfloat16 kernels only on CPUs with AVX-512 (emulated, or native with AVX512_BF16 / AMX) or
AVX-NE-CONVERT. On an AVX2-only CPU (AMD Zen 2 / Zen 3: some of this project's machines) TensorFlow keeps its
own (Eigen) bfloat16 kernels, but an op handed to oneDNN there throws from inside TensorFlow's kernel and
aborts the process (measured: ``ONEDNN_MAX_CPU_ISA=AVX2``, which caps oneDNN as such a CPU does, aborted on
the first packed bfloat16 matmul). So:

- the rules: which flags give oneDNN bfloat16 (`custom_layers.cpu_features.onednn_runs_bfloat16`) and when
  TensorFlow hands bfloat16 ops to oneDNN (`tensorflow_sends_bfloat16_to_onednn`), on the flags of real CPUs;
- an AVX2-only CPU (flags faked in this process): no packed weights (`packed_linear` refuses bfloat16 with a
  ValueError instead of aborting), and a bfloat16 ClipCap still decodes, compiled, close to float32;
- TensorFlow's own bfloat16 kernels (``TF_ENABLE_ONEDNN_OPTS=0``: what an AVX2-only CPU runs, in a process
  of its own): the bfloat16 model captions, close to float32;
- oneDNN capped below bfloat16 (``ONEDNN_MAX_CPU_ISA=AVX2``) on a CPU where TensorFlow still hands it
  bfloat16 ops (the one setting that cannot run): loading in bfloat16 is refused before anything is read,
  with the cause, and float32 still captions; on a CPU without AVX-512 the cap changes nothing and bfloat16
  runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port

from custom_layers import cpu_features, packed_weights
from models import precision

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [str(p) for p in sorted((ROOT / "demo").glob("*.jpg"))[:3]]

#: /proc/cpuinfo flags of the CPUs named (the ones that matter here)
SAPPHIRE_RAPIDS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
SKYLAKE_SP = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}  # bfloat16 emulated by oneDNN
ZEN3 = {"avx", "avx2", "fma", "sse4_2"}  # AVX2 only
SIERRA_FOREST = {"avx2", "fma", "avx_vnni", "avx_ne_convert"}  # AVX2 with AVX-NE-CONVERT, no AVX-512


def _fake_cpu(monkeypatch, flags, model="AMD EPYC 7B13"):
    """This process sees a CPU with these flags (what packed_weights and models.precision read)."""
    monkeypatch.setattr(cpu_features, "cpu_info", lambda *a: (model, set(flags)))
    monkeypatch.setattr(precision, "cpu_info", lambda *a: (model, set(flags)))


def test_which_cpus_oneDNN_runs_bfloat16_on():
    runs = cpu_features.onednn_runs_bfloat16
    for flags in (SAPPHIRE_RAPIDS, ZEN4, SKYLAKE_SP, SIERRA_FOREST):
        assert runs(flags, environ={})
    assert not runs(ZEN3, environ={}) and not runs(set(), environ={})  # unknown flags count as no
    assert not runs({"avx512f"}, environ={})  # AVX-512 without BW/VL/DQ (Knights Landing): not avx512_core
    # a user's cap: the ISA names oneDNN reads, in either variable, in any case
    for cap in ("AVX2", "avx2", "SSE41", "AVX2_VNNI"):
        assert not runs(ZEN4, environ={"ONEDNN_MAX_CPU_ISA": cap})
    assert not runs(ZEN4, environ={"DNNL_MAX_CPU_ISA": "avx2"})
    assert runs(ZEN4, environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"})  # ONEDNN_ first
    assert runs(ZEN4, environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})
    assert runs(SIERRA_FOREST, environ={"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"})
    assert not runs(ZEN4, environ={"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"})  # that ISA is not on a Zen 4

    sends = cpu_features.tensorflow_sends_bfloat16_to_onednn  # TensorFlow's CPUID test ignores the cap
    assert sends(ZEN4) and sends(SKYLAKE_SP) and sends(SIERRA_FOREST) and not sends(ZEN3)


def test_bfloat16_is_refused_where_onednn_is_capped_below_it(monkeypatch, tmp_path):
    """The blocked setting, decided from the flags and the environment: refused before any file is read (the
    model path does not exist), with the cause and what to do; not refused without the cap, on an AVX2-only
    CPU, or for float32."""
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP

    if not _pywrap_util_port.IsMklEnabled():
        pytest.skip("oneDNN is off in this process: nothing is handed to it")
    missing = str(tmp_path / "no-such-model")
    _fake_cpu(monkeypatch, ZEN4)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    for load in (lambda: ClipCap.load(missing, precision="bf16"), lambda: CLIP.load(missing, precision="bf16")):
        with pytest.raises(precision.PrecisionUnavailableError, match="ONEDNN_MAX_CPU_ISA=AVX2.*abort") as error:
            load()
        assert "TF_ENABLE_ONEDNN_OPTS=0" in str(error.value) and isinstance(error.value, RuntimeError)
    assert precision.check_runnable("float32").name == "float32"
    assert precision.bfloat16_blocker(ZEN3) is None  # AVX2 only: TensorFlow keeps bfloat16 to itself
    knights_landing = {"avx2", "avx512f"}  # AVX-512 for TensorFlow, no avx512_core for oneDNN: blocked uncapped
    assert "no bfloat16 kernels on this CPU" in precision.bfloat16_blocker(knights_landing, environ={})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert precision.check_runnable("bf16").name == "bfloat16"


def _agree(got, want, vocab):
    """Captions of a bfloat16 run against float32's: valid tokens and scores; identical token lists score within
    0.1 nat (the bound of test_precision.py); returns how many are identical."""
    same = 0
    for mine, theirs in zip(got, want, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert np.isfinite(a["score"]) and a["score"] <= 0 and all(0 <= t < vocab for t in a["tokens"])
            if a["tokens"] == b["tokens"]:
                same += 1
                assert abs(a["score"] - b["score"]) < 0.1
    return same


def test_an_avx2_only_cpu_decodes_bfloat16_without_packed_weights(tiny_model_dir, monkeypatch):
    """On AVX2-only flags: `available` says no for bfloat16 (float32 is unaffected), `packed_linear` refuses
    bfloat16 with a ValueError naming the cause (it would abort the process), and a bfloat16 ClipCap decodes
    greedy and beam search compiled (the plain-graph loop that packs where it can, refused here if it tried)
    with results close to float32's."""
    from models.image_captioning.clip_cap import ClipCap

    if precision.bfloat16_blocker():  # the flags faked below do not change what TensorFlow hands to oneDNN
        pytest.skip(f"this process cannot run bfloat16: {precision.bfloat16_blocker()}")
    _fake_cpu(monkeypatch, ZEN3)
    assert not packed_weights.available(tf.bfloat16)
    assert packed_weights.available(tf.float32) or not _pywrap_util_port.IsMklEnabled()  # float32: unaffected
    kernel = tf.Variable(tf.ones((16, 8), tf.bfloat16))
    with pytest.raises(ValueError, match="AMD EPYC 7B13.*AVX-512.*abort"):
        tf.function(lambda x: packed_linear_of(x, kernel))(tf.ones((2, 8), tf.bfloat16))

    fp32 = ClipCap.load(str(tiny_model_dir))
    bf16 = ClipCap.load(str(tiny_model_dir), precision="bf16")
    assert not bf16.decoder.packs_weights()
    embeddings = fp32.encode_images(PHOTOS)
    for method, options in (("greedy", {}), ("beam", {"beam_size": 3, "num_captions": 2})):
        want = fp32.generate(embeddings, method=method, max_length=6, **options)
        got = bf16.generate(embeddings, method=method, max_length=6, compile_now=True, **options)
        assert _agree(got, want, bf16.gpt2.vocab_size) >= 1, method


def packed_linear_of(x, kernel):
    return packed_weights.packed_linear(x, kernel.value(), tf.zeros((16,), tf.bfloat16))


#: run in a process of its own: float32 and bfloat16 captions of the same photos as JSON, or the refusal
SCRIPT = """
import json, sys
from models.image_captioning.clip_cap import ClipCap
from models.precision import PrecisionUnavailableError
photos, directory = {photos!r}, {directory!r}
fp32 = ClipCap.load(directory)
embeddings = fp32.encode_images(photos)
out = {{"fp32": fp32.generate(embeddings, max_length=6)}}
try:
    bf16 = ClipCap.load(directory, precision="bf16")
except PrecisionUnavailableError as e:
    out["refused"] = str(e)
else:
    out["bf16"] = bf16.generate(embeddings, max_length=6, compile_now=True)
    out["bf16_images"] = bf16.caption(photos, max_length=6)
    out["packed"] = bf16.decoder.packs_weights()
print("RESULT " + json.dumps(out, default=float))
"""


def _run(tiny_model_dir, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    environ.update(env, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(photos=PHOTOS, directory=str(tiny_model_dir))],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # a crash (a signal: negative) never
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_tensorflows_own_bfloat16_kernels_caption(tiny_model_dir):
    """``TF_ENABLE_ONEDNN_OPTS=0``: every bfloat16 op on TensorFlow's own kernels, as on an AVX2-only CPU; the
    model loads, decodes compiled and captions files, close to float32, with no packed weights."""
    out = _run(tiny_model_dir, TF_ENABLE_ONEDNN_OPTS="0")
    assert "refused" not in out and out["packed"] is False
    assert _agree(out["bf16"], out["fp32"], vocab=10**9) >= 1
    assert out["bf16_images"] == [c[0]["text"] for c in out["bf16"]]  # files in, the same captions out


def test_onednn_capped_below_bfloat16(tiny_model_dir):
    """``ONEDNN_MAX_CPU_ISA=AVX2``, a real process: where TensorFlow hands bfloat16 ops to oneDNN (this CPU has
    AVX-512) bfloat16 is refused at load with the cause, float32 captions; on a CPU without AVX-512 nothing is
    handed to oneDNN, and bfloat16 captions (unpacked). Either way the process ends normally."""
    out = _run(tiny_model_dir, ONEDNN_MAX_CPU_ISA="AVX2")
    assert out["fp32"] and all(c[0]["tokens"] is not None for c in out["fp32"])
    sends = _pywrap_util_port.IsMklEnabled() and cpu_features.tensorflow_sends_bfloat16_to_onednn(
        cpu_features.cpu_info()[1])
    if sends:
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in out["refused"] and "bf16" not in out
    else:
        assert "refused" not in out and out["packed"] is False and _agree(out["bf16"], out["fp32"], 10**9) >= 1
