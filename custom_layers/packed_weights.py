"""Weights fixed for the life of a model, and oneDNN matmuls that keep such weights packed.

oneDNN's matmul wants its weights in a blocked layout (AMX tiles). TensorFlow's kernel reorders the plain
(out, in) kernel into that layout at every call, unless it is told that the weight never changes: then it
reorders once, on its first call, and keeps the packed copy in that graph node's kernel. Measured on an Intel
Xeon with AMX (2 cores), GPT-2's 48 block matmuls of one decoding step, bfloat16, 16 rows: 19.5 ms with the
reorder, 13.0 ms packed; 80 rows: 34 -> 22.5 ms (`benchmarks/bench_clipcap.py`'s bf16 column for the whole).

TensorFlow marks a weight as such only when it is a graph constant, or for every matmul of the process
(``TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1``, which would silently keep stale weights for any model trained or
reloaded in that process). `packed_linear` marks exactly one matmul node instead; its correctness rests on
two guarantees, both checked:

- the weights never change: they are the variables of a model whose weights are frozen (`freeze_weights`,
  applied to every bfloat16 twin by `models.precision`; an assignment raises `FrozenWeightsError`), and
- each node always reads the same weights: the kernel must be read from a variable in the graph being built
  (a ``ReadVariableOp``), not passed in (a function shared by several blocks would hand one node every
  block's kernel), and the op is refused in eager mode, where one kernel object serves every call of a shape.

Only on a CPU with oneDNN on (`available`: TensorFlow's x86 builds, unless ``TF_ENABLE_ONEDNN_OPTS=0``), and
no GPU in use; for bfloat16 only where oneDNN has bfloat16 kernels (AVX-512 or AVX-NE-CONVERT, not capped by
``ONEDNN_MAX_CPU_ISA``: `custom_layers.cpu_features.onednn_runs_bfloat16`). On an AVX2-only CPU the op would
throw from inside TensorFlow's kernel and abort the process; `packed_linear` refuses it there, and decoding
runs unpacked, on TensorFlow's own bfloat16 kernels. The packed copy lives as long as the traced function
holding the node (one per decoding shape): ~250 MB for GPT-2 124M in bfloat16.

Example::

    twin = freeze_weights(cast_model(gpt2, "bfloat16"))   # models.precision does this for precision="bfloat16"
    y = packed_linear(x, variable.value, bias.value)       # inside a tf.function
"""

import keras
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.framework import kernels, op_def_library
from tensorflow.python.util import _pywrap_util_port

from custom_layers import cpu_features

#: TensorFlow's oneDNN matmul with a bias (and an activation) fused; ``is_filter_const`` makes it keep its weight
#: packed (TensorFlow's layout pass makes the same node from MatMul + BiasAdd, with is_filter_const only for a
#: constant weight)
_OP = "_MklNativeFusedMatMul"
_LABEL = b"MklNameChangeOp"  # the kernel label the layout pass gives the ops it renames
#: the activations the fused kernel applies (name of our function -> oneDNN post-op)
ACTIVATIONS = {None: (), "gelu_approximate": ("GeluApproximate",)}
_DTYPES = (tf.float32, tf.bfloat16)


class FrozenWeightsError(ValueError):
    """An assignment to a weight of a frozen model (`freeze_weights`)."""


class FrozenVariable(keras.Variable):
    """A Keras variable that refuses assignment: the class `freeze_weights` gives a model's weights."""

    def assign(self, value):
        raise FrozenWeightsError(
            f"{self.path}: this model's weights are fixed (a bfloat16 twin's, cast once at load; its decoding "
            "keeps them packed in oneDNN's layout): change the float32 model's weights, then cast it again "
            "(ClipCap.load(..., precision=...) or to_precision)")

    def assign_add(self, value):
        return self.assign(value)

    def assign_sub(self, value):
        return self.assign(value)

    def _direct_assign(self, value):
        return self.assign(value)


def freeze_weights(model):
    """Make every weight of the Keras ``model`` refuse assignment (`FrozenVariable`); returns ``model``.
    Reading is unchanged. Raises TypeError for a weight that is not a plain Keras variable."""
    for variable in model.weights:
        if type(variable) is not keras.Variable and not isinstance(variable, FrozenVariable):
            raise TypeError(f"cannot freeze {variable.path}: a {type(variable).__name__}, not a keras.Variable")
        variable.__class__ = FrozenVariable
    return model


def weights_frozen(model):
    """Whether every weight of the Keras ``model`` is frozen (`freeze_weights`)."""
    return bool(model.weights) and all(isinstance(v, FrozenVariable) for v in model.weights)


def available(dtype=tf.bfloat16):
    """Whether `packed_linear` can run here on ``dtype`` (float32 or bfloat16): oneDNN on
    (``TF_ENABLE_ONEDNN_OPTS`` not 0, an x86 build), its fused matmul kernel registered, no GPU visible to
    TensorFlow (the kernel is CPU-only), and for bfloat16 a CPU where oneDNN has bfloat16 kernels
    (`custom_layers.cpu_features.onednn_runs_bfloat16`: not an AVX2-only one)."""
    if not _pywrap_util_port.IsMklEnabled() or tf.config.list_logical_devices("GPU"):
        return False
    if tf.as_dtype(dtype) == tf.bfloat16 and not _onednn_bfloat16():
        return False
    registered = kernels.get_registered_kernels_for_op(_OP).kernel
    return any(k.device_type == "CPU" and k.label == _LABEL.decode() for k in registered)


def _onednn_bfloat16():
    return cpu_features.onednn_runs_bfloat16(cpu_features.cpu_info()[1])


def packed_linear(x, kernel, bias, activation=None):
    """activation(x (..., in) @ kernel (out, in)^T + bias (out,)) -> (..., out), as
    `custom_layers.linear.linear`, in one oneDNN kernel that packs ``kernel`` once and keeps it.

    ``kernel``: read from a variable of a frozen model in the graph being built (checked: a ``ReadVariableOp``),
    and the same one each time this node runs; ``activation``: a key of `ACTIVATIONS`. Graph mode only
    (ValueError eagerly; ValueError in bfloat16 where oneDNN has no bfloat16 kernel). The caller checks
    ``available(x.dtype)`` and that the model is frozen."""
    if tf.executing_eagerly():
        raise ValueError("packed_linear is for a traced graph: eagerly one kernel would serve every call of a shape")
    if isinstance(kernel, tf.Variable):  # a Keras variable's value: read it here
        kernel = tf.convert_to_tensor(kernel)
    if kernel.op.type != "ReadVariableOp":
        raise ValueError(f"packed_linear needs a kernel read from a variable in this graph, not a {kernel.op.type} "
                         "(its node keeps the first kernel it sees)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"packed_linear activation {activation!r}: expected one of {list(ACTIVATIONS)}")
    bias = tf.convert_to_tensor(bias)
    if x.dtype not in _DTYPES or kernel.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"packed_linear takes float32 or bfloat16, the same for x, kernel and bias; got "
                         f"{x.dtype.name}, {kernel.dtype.name}, {bias.dtype.name}")
    if x.dtype == tf.bfloat16 and not _onednn_bfloat16():
        model, _ = cpu_features.cpu_info()
        raise ValueError(f"packed_linear in bfloat16 needs oneDNN's bfloat16 kernels, which this CPU ({model}) does "
                         f"not offer here (they need AVX-512 or AVX-NE-CONVERT, and no ONEDNN_MAX_CPU_ISA below them; "
                         f"it is {cpu_features.onednn_isa_cap()}): the op would abort the process. Check "
                         "available(dtype) first")
    units, fan_in = kernel.shape
    rows = x if x.shape.rank == 2 else tf.reshape(x, (-1, fan_in))  # (N, in)
    _, _, op, _ = op_def_library._apply_op_helper(
        _OP, name="packed_linear", a=rows, b=kernel, args=[bias], fused_ops=["BiasAdd", *ACTIVATIONS[activation]],
        transpose_a=False, transpose_b=True, is_filter_const=True, epsilon=1e-4, leakyrelu_alpha=0.2)
    op._set_attr("_kernel", attr_value_pb2.AttrValue(s=_LABEL))
    y = op.outputs[0]  # (N, out)
    if x.shape.rank == 2:
        return y
    lead = x.shape[:-1]
    lead = lead.as_list() if lead.is_fully_defined() else tf.shape(x)[:-1]
    return tf.reshape(y, tf.concat([lead, [units]], 0) if tf.is_tensor(lead) else [*lead, units])
