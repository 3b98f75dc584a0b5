"""The numeric precisions a model can run in: ONE registry, `PRECISIONS` (name -> how to apply it).

``ClipCap.load(..., precision=...)``, ``CLIP.load(..., precision=...)``, their ``to_precision`` methods and the
``--precision`` option of ``caption``, ``batch``, ``serve`` and ``export`` all read this registry; the command
line accepts a name or one of its aliases (``fp32``, ``bf16``), nothing else.

- ``float32`` (alias ``fp32``, the default): the model as saved.
- ``int8``: GPT-2's block projections and tied LM head with int8 weights per output channel (per vocabulary
  row for the head), dequantized inside the matmul (`custom_architectures.quantization`,
  `custom_layers.quantized`): for one-image latency (decoding one row is memory-bound). The mapper and the
  CLIP stay float32. Unlike bfloat16 it is saved (``save`` writes the int8 values and their scales; the
  folder loads as int8) and it is inference only.
- ``bfloat16`` (alias ``bf16``): every Keras layer rebuilt under Keras' ``"bfloat16"`` dtype policy, the
  float32 weights cast once at load (`cast_model`: nothing is cast per step, the KV cache is bfloat16 too).
  Matmuls and convolutions run in bfloat16 with float32 accumulation (oneDNN's AMX / AVX512_BF16 kernels);
  layer norms (Keras' and `custom_layers.inference_ops.layer_norm` compute in float32), attention's
  softmax (`custom_layers.attention`) and GPT-2's logits (`GPT2.lm_logits`, hence every sampler's
  log-probabilities and scores) are float32; the head's matmul output is rounded to bfloat16 by TensorFlow's
  CPU kernel, so each row's largest logits are recomputed in float32 (`refine_top_logits`). CLIP's transformer blocks (`custom_layers.clip_layers`) run
  everything between their bfloat16 matmuls (layer norms, QuickGELU, biases, residual sums, softmax) as
  XLA-fused float32 kernels inside the plain graph. What leaves a model (CLIP embeddings, prefixes, scores)
  is float32. Fast where the CPU has ``amx_bf16`` or ``avx512_bf16`` (`custom_layers.cpu_features`);
  elsewhere it runs correctly, slower than float32, and `warn_if_slow` says so at load (on an AVX2-only CPU on
  TensorFlow's own kernels: oneDNN has no bfloat16 there, and decoding keeps no packed weights). `check_runnable` refuses
  it, before anything is read, where it cannot run: oneDNN without bfloat16 kernels (capped below them by
  ``ONEDNN_MAX_CPU_ISA``) on a CPU where TensorFlow still hands it bfloat16 ops (they would crash the process or fail).

A bfloat16 model is an inference twin: its weights are frozen (`custom_layers.packed_weights.freeze_weights`;
assigning raises), so that its compiled decoding steps keep them packed in oneDNN's layout, and training
refuses it. A model in another precision than float32 has another identity (`precision_identity`: its cached
captions are not float32's). A bfloat16 model is not saved (``save`` refuses: the float32 weights it was cast from are
the model; load them again with the precision wanted); an int8 one is (``savable``).

``precision=None`` (the API's and the command line's default) means "as saved": float32, or int8 for a folder
saved from an int8 model.

Adding a precision is one entry: a `Precision` whose ``apply`` takes a float32 Keras model and returns the
model to run (a twin, or the same one changed in place).

Example::

    precision = resolve_precision("bf16")          # PRECISIONS["bfloat16"]
    backbone = precision.apply(backbone)           # a bfloat16 twin of a float32 Keras model
"""

import dataclasses
import hashlib
import logging
from collections.abc import Callable

from custom_layers.cpu_features import (
    BFLOAT16_FLAGS,
    cpu_info,
    onednn_isa_cap,
    onednn_runs_bfloat16,
    tensorflow_sends_bfloat16_to_onednn,
)

logger = logging.getLogger(__name__)

DEFAULT_PRECISION = "float32"


@dataclasses.dataclass(frozen=True)
class Precision:
    """One entry of `PRECISIONS`.

    Attributes:
        name: the canonical name (``precision=`` and ``--precision`` values, the identity's suffix).
        aliases: other names the command line and the API accept for it (``bf16``).
        apply: float32 Keras model -> the Keras model to run in this precision.
        native_flags: /proc/cpuinfo flags of which one makes it fast on a CPU (empty: fast everywhere);
            without any, `warn_if_slow` warns at load.
        xla: whether a model in this precision compiles with XLA under ``jit_compile="auto"``; False: its
            compiled form is a plain TensorFlow graph (oneDNN's kernels). bfloat16: False, XLA's CPU backend
            has no AMX / AVX512_BF16 matmuls (measured here: ViT-B/32 4.5 img/s under XLA vs 19.3 in graph
            mode; greedy decoding 6.1 s vs 2.7 s), while TensorFlow's graph mode runs oneDNN's.
        summary: one line for ``--help`` and the docs.
        clip: whether it applies to the CLIP too (int8: GPT-2 only; a `CLIP` refuses it).
        savable: whether a model in it is saved as it is (int8's values and scales), rather than refused.
        version: of how ``apply`` turns float32 weights into this precision's, part of `precision_identity`:
            bump it when that changes (e.g. int8's rounding), so no result of the old weights answers the new.
        blocker: None, or a function of no argument returning why this precision cannot run in this process
            (a sentence), or None where it can: `check_runnable` raises with it before any weight is read.
    """

    name: str
    aliases: tuple
    apply: Callable
    native_flags: tuple = ()
    xla: bool = True
    summary: str = ""
    clip: bool = True
    savable: bool = False
    version: int = 1
    blocker: Callable | None = None


def _floating_policy(value):
    """Whether a serialized ``dtype`` entry of a Keras config is a floating dtype policy (float32 etc.)."""
    if isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
        value = value.get("config", {}).get("name")
    return isinstance(value, str) and value in ("float32", "float16", "bfloat16", "mixed_bfloat16",
                                                "mixed_float16", "float64")


def _with_policy(config, policy):
    """A serialized Keras config with every layer's floating ``dtype`` policy replaced by ``policy`` (input
    layers keep theirs: the model takes float32 and int32 inputs as before and casts them itself)."""
    if isinstance(config, list):
        return [_with_policy(v, policy) for v in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "InputLayer":
        return config
    return {k: (policy if k == "dtype" and _floating_policy(v) else _with_policy(v, policy))
            for k, v in config.items()}


def cast_model(model, policy):
    """A twin of the built Keras ``model`` whose every layer runs under the Keras dtype ``policy``
    (``"bfloat16"``: bfloat16 weights and compute), holding ``model``'s weights cast once.

    The twin is rebuilt from ``model``'s config with Keras' global dtype policy set to ``policy`` for the
    duration of the rebuild (sub-layers built in a constructor take the global policy), then restored. Keras
    keeps that policy per thread (its global state is a ``threading.local``): a model built meanwhile in
    another thread stays float32 (`unitest/test_precision_threads.py`). Passing the policy per layer instead
    would need every composite layer to hand its ``dtype_policy`` to the sub-layers it builds."""
    import keras

    config = _with_policy(keras.saving.serialize_keras_object(model), policy)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        twin = keras.saving.deserialize_keras_object(config)
    finally:
        keras.config.set_dtype_policy(previous)
    weights = model.get_weights()
    if len(twin.weights) != len(weights):  # a model that creates its weights when first called
        raise ValueError(f"cannot cast {type(model).__name__} to {policy}: its rebuilt twin has "
                         f"{len(twin.weights)} weights, not {len(weights)} (weights created on first call)")
    twin.set_weights(weights)
    return twin


def _as_is(model):
    return model


def _bfloat16(model):
    from custom_layers.packed_weights import freeze_weights

    # frozen: the plain-graph decoding loop keeps the weights packed in oneDNN's layout (packed_weights)
    return freeze_weights(cast_model(model, "bfloat16"))


def bfloat16_blocker(flags=None, environ=None):
    """Why bfloat16 cannot run in this process, or None (``flags``: /proc/cpuinfo's, default this CPU's;
    ``environ``: default ``os.environ``). TensorFlow (oneDNN on) hands bfloat16 matmuls and convolutions to
    oneDNN on a CPU with AVX-512 by its own CPUID test; where oneDNN has no bfloat16 kernel (capped below them by
    ``ONEDNN_MAX_CPU_ISA``, or AVX-512 without BW/VL/DQ), the first such op throws inside TensorFlow's kernel.
    Measured with ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AMD Zen 4: an eager bf16 matmul killed the process (a
    segmentation fault), the packed decoding matmul aborted it, an eager bf16 convolution raised an
    ``AbortedError``. An AVX2-only CPU is not blocked: there TensorFlow keeps its own bfloat16 kernels."""
    from tensorflow.python.util import _pywrap_util_port

    flags = cpu_info()[1] if flags is None else flags
    if (not _pywrap_util_port.IsMklEnabled() or not tensorflow_sends_bfloat16_to_onednn(flags)
            or onednn_runs_bfloat16(flags, environ)):
        return None
    cap = onednn_isa_cap(environ)
    why = (f"oneDNN is capped at ONEDNN_MAX_CPU_ISA={cap}, below its bfloat16 kernels (AVX512_CORE)" if cap else
           "oneDNN has no bfloat16 kernels on this CPU (AVX-512 without AVX512BW/VL/DQ)")
    return (f"{why}, while TensorFlow hands bfloat16 ops to oneDNN here (the CPU has AVX-512 or AVX-NE-CONVERT): the "
            "first one would abort or crash the process, or fail. " + ("Unset the cap (or set it to AVX512_CORE or above), " if cap else "")
            + "set TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's own kernels, slower), or use float32")


def _int8(backbone):
    from custom_architectures.quantization import quantize_backbone

    return quantize_backbone(backbone)


#: name -> `Precision`; the one list of precisions (the command line's choices come from it)
PRECISIONS = {
    "float32": Precision("float32", ("fp32",), _as_is, (),
                         summary="float32 weights and compute, the model as saved (the default)"),
    # version 2: CLIP's blocks compute their layer norms, QuickGELU, biases and residual sums in fused float32
    # kernels (custom_layers.clip_layers), so features differ from version 1's in the last bits; version 3:
    # GPT-2's MLP runs matmul, bias and GELU as one oneDNN kernel (custom_layers.inference_ops.gpt2_gelu);
    # version 4: the compiled decoding steps' matmuls keep their weights packed (custom_layers.packed_weights),
    # another oneDNN kernel, and the twin's weights are frozen; version 5: the head's largest logits of each row
    # are recomputed in float32 (GPT2.lm_logits, refine_top_logits) instead of rounded to bfloat16
    "bfloat16": Precision("bfloat16", ("bf16",), _bfloat16, BFLOAT16_FLAGS, xla=False,
                          summary="bfloat16 weights, matmuls and convolutions (float32 accumulation, layer norms, softmax "
                          "and log-probabilities): fast where the CPU has AMX or AVX512_BF16", version=5,
                          blocker=bfloat16_blocker),
    "int8": Precision("int8", (), _int8, (), clip=False, savable=True,
                      summary="GPT-2's weights in int8 per output channel (mapper and CLIP float32): one-image "
                      "latency; saved as int8, inference only"),
}


def precision_names():
    """Every name `resolve_precision` accepts: the canonical names, then their aliases."""
    return [*PRECISIONS, *(alias for p in PRECISIONS.values() for alias in p.aliases)]


def resolve_precision(name):
    """The `Precision` of a name or alias (``"bf16"`` -> ``PRECISIONS["bfloat16"]``); None: float32 (callers
    that load a folder read None as "as saved" first).

    Raises:
        ValueError: an unknown name (the message lists the accepted ones).
    """
    if name is None:
        name = DEFAULT_PRECISION
    if isinstance(name, Precision):
        name = name.name
    if isinstance(name, str):
        for precision in PRECISIONS.values():
            if name == precision.name or name in precision.aliases:
                return precision
    raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(precision_names())}")


class PrecisionUnavailableError(RuntimeError):
    """A precision that cannot run in this process (`Precision.blocker`): raised by `check_runnable`."""


def check_runnable(precision):
    """Raise `PrecisionUnavailableError` (a RuntimeError: the command line's exit 3) saying why, where
    ``precision`` (a name or a `Precision`) cannot run in this process; loading calls it before reading any
    weight. Returns the `Precision`."""
    precision = resolve_precision(precision)
    reason = precision.blocker() if precision.blocker is not None else None
    if reason:
        raise PrecisionUnavailableError(f"precision {precision.name} cannot run here: {reason}")
    return precision


def warn_if_slow(precision, cpuinfo=None):
    """Log one warning line when ``precision`` needs CPU flags this machine lacks (it still runs, slower);
    returns whether it warned. ``cpuinfo``: the file to read instead of /proc/cpuinfo (tests)."""
    if not precision.native_flags:
        return False
    model, flags = cpu_info() if cpuinfo is None else cpu_info(cpuinfo)
    if any(flag in flags for flag in precision.native_flags):
        return False
    how = ("emulated by oneDNN" if tensorflow_sends_bfloat16_to_onednn(flags) else
           "on TensorFlow's own kernels (oneDNN has none for it without AVX-512: decoding several times slower; "
           "float32 is faster here)")
    logger.warning("precision %s: this CPU (%s) has none of %s, so it runs %s and slower than float32 "
                   "(results are correct)", precision.name, model, "/".join(precision.native_flags), how)
    return True


def precision_identity(identity, precision, part=None):
    """A model's identity (``"sha256:<hex>"``, `models.image_captioning.identity`) in ``precision``: the same
    for float32; otherwise the SHA-256 of the float32 identity and the precision's name, so that results of
    a bfloat16 run are never taken for float32's (nor the reverse). ``part``: the precision is that of one
    part only (``"clip"``: a CLIP running in another precision than the model's). None stays None."""
    precision = resolve_precision(precision)
    if identity is None or (precision.name == DEFAULT_PRECISION and part is None):
        return identity
    of = "" if part is None else f"{part}\n"
    digest = hashlib.sha256(f"clipcap-precision-1\n{identity}\n{of}{precision.name}\n{precision.version}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def precision_name(text):
    """argparse ``type=`` of ``--precision``: a name or alias of `PRECISIONS` -> the canonical name; anything
    else an ``argparse.ArgumentTypeError`` listing the accepted ones (usage error, exit 2)."""
    import argparse

    try:
        return resolve_precision(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_precision_argument(parser):
    """Add ``--precision`` (names and aliases from `PRECISIONS` only; default None: as saved) to a parser."""
    choices = ", ".join(f"{p.name} ({'/'.join(p.aliases)}): {p.summary}" for p in PRECISIONS.values())
    choices = choices.replace(" (): ", ": ")
    parser.add_argument("--precision", type=precision_name, default=None, metavar="NAME",
                        help=f"the numeric precision the model runs in: {choices}. Default: as saved (float32, or "
                             "int8 for a folder saved from an int8 model). Results of another precision than "
                             "float32 are cached apart")
