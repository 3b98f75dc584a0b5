"""`Linear`: a float projection whose kernel is stored ``(units, in)``, as torch's ``nn.Linear``; ``y = x @ W^T + b``.

GPT-2's block projections (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) use it instead of
``keras.layers.Dense`` (kernel ``(in, units)``). Same values, another memory layout: the decoding step is a
product of 16-80 rows with each kernel, and there the CPU matmuls (XLA's and oneDNN's) read a ``(units, in)``
kernel with ``transpose_b`` faster than an ``(in, units)`` one: 48 block products of 12 GPT-2 124M layers
(the model's 340 MB) took 33.4 ms a step against 41.5 at 16 rows, 58.4 against 71.2 at 80 rows (torch:
30.0 / 58.4; measured by the lead's matmul study, 2 threads). It is also the layout of `Int8Dense` and of
the tied LM head ``wte`` (V, C), so every projection of the decoder is read the same way.

Saved GPT-2s written before this layout (their GPT-2 config has no ``weights_layout``) still load: their
kernels are ``(in, units)`` and `Linear.load_own_variables` transposes them while Keras reads the file
(`custom_architectures.transformers_arch.gpt2_arch.GPT2`, ``weights_layout="in_out"``).

Example::

    proj = Linear(3 * 768, name="c_attn")
    y = proj(x)                                              # x (B, T, 768) -> (B, T, 2304)
    proj.kernel.shape                                        # (2304, 768)
"""

import keras
import numpy as np
import tensorflow as tf

#: a kernel stored (units, in): what `Linear` holds and what it saves
OUT_IN = "out_in"
#: a kernel stored (in, units): ``keras.layers.Dense``'s layout, that of GPT-2 files saved before `Linear`
IN_OUT = "in_out"
KERNEL_LAYOUTS = (OUT_IN, IN_OUT)


@keras.saving.register_keras_serializable(package="image_captioning")
class Linear(keras.layers.Layer):
    """``keras.layers.Dense(units)`` without activation, kernel stored ``(units, in)``: ``y = x @ kernel^T + bias``.

    Args:
        units: output width.
        use_bias: whether a bias (units,) is added.
        kernel_initializer, bias_initializer: Keras initialisers (their serialized form is in the config).
        stored_layout: the layout of the kernel in the weights file this layer will read (`load_own_variables`):
            `OUT_IN` (default: the layer's own) or `IN_OUT` (a file written when the layer was a
            ``keras.layers.Dense``: transposed as it is read). Not part of the config: a saved ``Linear`` is
            always `OUT_IN`; `GPT2` sets it from its own config's ``weights_layout``.
    """

    def __init__(self, units, use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 stored_layout=OUT_IN, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.stored_layout = check_kernel_layout(stored_layout)

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(self.units, fan_in), initializer=self.kernel_initializer)
        self.bias = (self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)
                     if self.use_bias else None)
        self.built = True

    def call(self, x):
        dtype = tf.as_dtype(self.compute_dtype)
        y = linear(x, _value(self.kernel, dtype))
        return y if self.bias is None else tf.nn.bias_add(y, _value(self.bias, dtype))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def load_own_variables(self, store):
        """Keras' read of this layer's tensors (``"0"``: kernel, ``"1"``: bias); an `IN_OUT` kernel is
        transposed first, and its shape checked to be the transpose of this layer's (ValueError)."""
        if self.stored_layout == IN_OUT:
            kernel = np.asarray(store["0"])
            if kernel.shape[::-1] != tuple(self.kernel.shape):
                raise ValueError(f"{self.path}: a stored (in, out) kernel of shape {kernel.shape} for a kernel "
                                 f"(out, in) of shape {tuple(self.kernel.shape)}")
            store = {**{key: store[key] for key in store.keys()}, "0": np.ascontiguousarray(kernel.T)}
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def linear(x, kernel, bias=None, activation=None):
    """activation(x (..., in) @ kernel (out, in)^T + bias (out,)) -> (..., out): one 2-D
    ``matmul(..., transpose_b=True)`` on x flattened to rows (no transposed copy of the kernel is made;
    `Linear.call` and the cached decoding step's `custom_layers.inference_ops.dense` both run it).

    The bias and the activation (a function of a tensor, or None) apply to the 2-D product, before it is
    reshaped back: in a plain graph TensorFlow's remapper then fuses matmul, bias and a ``tf.nn.gelu`` into one
    oneDNN kernel (`custom_layers.inference_ops.gpt2_gelu`); under XLA it is the same program."""
    units, fan_in = kernel.shape
    y = tf.matmul(x if x.shape.rank == 2 else tf.reshape(x, (-1, fan_in)), kernel, transpose_b=True)  # (rows, out)
    y = y if bias is None else tf.nn.bias_add(y, bias)
    y = y if activation is None else activation(y)
    if x.shape.rank == 2:
        return y
    lead = x.shape[:-1]
    lead = lead.as_list() if lead.is_fully_defined() else tf.shape(x)[:-1]
    return tf.reshape(y, tf.concat([lead, [units]], 0) if tf.is_tensor(lead) else [*lead, units])


def _value(variable, dtype):
    value = variable.value
    return value if value.dtype == dtype else tf.cast(value, dtype)


def check_kernel_layout(layout):
    """``layout`` itself when it is one of `KERNEL_LAYOUTS`, else a ValueError naming them."""
    if layout not in KERNEL_LAYOUTS:
        raise ValueError(f"kernel layout {layout!r}: expected one of {KERNEL_LAYOUTS}")
    return layout
