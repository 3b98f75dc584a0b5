"""The building blocks of OpenAI's CLIP, channels-last, named after OpenAI's modules.

- `MultiHeadAttention`: PyTorch's ``nn.MultiheadAttention`` with the packed ``in_proj`` split into
  ``q_proj`` / ``k_proj`` / ``v_proj`` and an ``out_proj`` (optionally causal).
- `ResidualAttentionBlock`: pre-LN transformer block (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``,
  QuickGELU, ``mlp.c_proj``) shared by the vision transformer and the text transformer.
- `Bottleneck`: the ModifiedResNet block; a stride > 1 average-pools after ``conv2`` and in front of the
  1x1 ``downsample.0`` conv (anti-aliased downsampling) instead of striding a convolution.
- `AttentionPool2d`: ModifiedResNet's head: multi-head attention of the mean feature over the feature map
  (plus a learned positional embedding), then ``c_proj``.
- `ClassTokenAndPositions` / `PositionalEmbedding`: the ViT's class token + positions and the text
  transformer's positions, as weights named like OpenAI's parameters.
- `EndOfTextPooling`: the text features at each row's end-of-text token (its highest id).

Every layer mirrors the PyTorch module's attribute names so converters map keys by name, and every
normalisation uses PyTorch's epsilon (1e-5), not Keras' default.

In bfloat16 (``precision="bfloat16"``, `models.precision`) `ResidualAttentionBlock` and `MultiHeadAttention`
compute the same function in another graph form: bfloat16 matmuls (oneDNN's AMX / AVX512_BF16 kernels, float32
accumulation) and, between them, a few XLA-fused float32 kernels (`fused_elementwise`: layer norms, QuickGELU,
biases, residual sums, softmax) instead of ~40 bfloat16 / float32 TensorFlow kernels per block, which took
half of a bf16 ViT-B/32's time. Float32 layers run the plain form.

Traced into a graph inside `custom_layers.shared_steps.shared_steps` (a compiled encoder's), a tower's
`ResidualAttentionBlock`s run as calls of one traced function with each block's weights as arguments.

Example::

    block = ResidualAttentionBlock(width=768, heads=12, name="transformer.resblocks.0")
    y = block(keras.ops.ones((2, 50, 768)))  # (B, T, C)
"""

import keras
import tensorflow as tf
from keras import backend, ops

from custom_layers.activations import quick_gelu
from custom_layers.attention import (
    causal_bias,
    dot_product_attention,
    heads_first,
    merge_heads,
    split_heads,
)
from custom_layers.inference_ops import layer_norm as layer_norm_values
from custom_layers.inference_ops import variable_value
from custom_layers.shared_steps import shared_step

TORCH_EPSILON = 1e-5  # nn.LayerNorm / nn.BatchNorm2d default


def layer_norm(name):
    """``nn.LayerNorm(width)`` with PyTorch's epsilon."""
    return keras.layers.LayerNormalization(epsilon=TORCH_EPSILON, name=name)


def onednn_bfloat16(layer):
    """Whether ``layer`` computes in bfloat16, where the blocks take the graph form that TensorFlow's oneDNN
    kernels run fast (`ResidualAttentionBlock._call_bfloat16`); float32 layers keep their plain form."""
    return backend.standardize_dtype(layer.compute_dtype) == "bfloat16"


def fused_elementwise(fn):
    """``fn`` compiled by XLA into fused CPU kernels when it is traced into a graph (a ``tf.function``);
    plain TensorFlow ops when run eagerly (no compilation for a one-off eager call).

    For the elementwise work between a bfloat16 model's oneDNN matmuls: XLA fuses a layer norm's casts,
    reductions and affine map into one or two loops (measured ~2x less CPU time than TensorFlow's kernels
    for (16, 50, 768)); its bfloat16 matmuls are slow, so only this part is compiled."""
    compiled = tf.function(fn, jit_compile=True, reduce_retracing=True)

    def call(*args):
        return fn(*args) if tf.executing_eagerly() else compiled(*args)

    call.__doc__ = fn.__doc__
    return call


@fused_elementwise
def norm(x, gamma, beta, epsilon):
    """``layer_norm(x)`` computed in float32 (``gamma``, ``beta`` float32), returned in x's dtype."""
    return tf.cast(layer_norm_values(tf.cast(x, tf.float32), gamma, beta, epsilon), x.dtype)


@fused_elementwise
def residual_norm(x, residual, gamma, beta, epsilon):
    """(x + residual, layer_norm(x + residual)) in x's dtype, summed and normalised in float32 (``gamma``,
    ``beta`` float32)."""
    total = tf.cast(x, tf.float32) + tf.cast(residual, tf.float32)
    return tf.cast(total, x.dtype), tf.cast(layer_norm_values(total, gamma, beta, epsilon), x.dtype)


@fused_elementwise
def bias_quick_gelu(x, bias):
    """``quick_gelu(x + bias)`` in float32 (``bias`` float32), returned in x's dtype."""
    return tf.cast(quick_gelu(tf.cast(x, tf.float32) + bias), x.dtype)


@fused_elementwise
def bias_residual(x, y, bias):
    """``x + (y + bias)`` in float32 (``bias`` float32), returned in x's dtype: a Dense's bias and the
    residual sum after it."""
    return tf.cast(tf.cast(x, tf.float32) + (tf.cast(y, tf.float32) + bias), x.dtype)


@fused_elementwise
def attention_heads(q, k, v, q_bias, k_bias, v_bias, heads):
    """Projections without their biases (B, T, H D) -> queries (B, Tq, H, D) plus bias, times D^-1/2, and
    keys, values (B, H, Tk, D) plus bias (`custom_layers.attention`'s layout), in the inputs' dtype."""
    def split(x, bias):
        return split_heads(tf.cast(x, tf.float32) + bias, heads)

    q_heads = split(q, q_bias)
    q_heads = q_heads * (q_heads.shape[-1] ** -0.5)
    return (tf.cast(q_heads, q.dtype), tf.cast(heads_first(split(k, k_bias)), k.dtype),
            tf.cast(heads_first(split(v, v_bias)), v.dtype))


@fused_elementwise
def attention_softmax(scores, causal):
    """``softmax(scores)`` over the keys in float32 (``causal``: a query attends to keys at or before its
    position, `custom_layers.attention.causal_bias`), returned in the scores' dtype. (B, H, Tq, Tk)."""
    logits = tf.cast(scores, tf.float32)
    if causal:
        logits = logits + causal_bias(tf.range(tf.shape(logits)[2]), tf.range(tf.shape(logits)[3]))
    return tf.cast(tf.nn.softmax(logits, axis=-1), scores.dtype)


def compiles_per_shape(model):
    """Whether ``model`` (a Keras functional model) holds bfloat16 `ResidualAttentionBlock` layers, whose
    graph form has XLA-compiled parts (`fused_elementwise`): a traced function of it compiles those once per
    input shape, so its callers pad batches to few shapes (as for a model compiled with XLA)."""
    return any(isinstance(layer, ResidualAttentionBlock) and onednn_bfloat16(layer) for layer in model.layers)


def batch_norm(name):
    """``nn.BatchNorm2d`` in inference mode over the channels-last axis, PyTorch's epsilon."""
    return keras.layers.BatchNormalization(axis=-1, epsilon=TORCH_EPSILON, momentum=0.9, name=name)


@keras.saving.register_keras_serializable(package="image_captioning")
class MultiHeadAttention(keras.layers.Layer):
    """Scaled dot-product multi-head attention with separate q / k / v projections.

    ``call(query, key_value=None)``: self-attention when ``key_value`` is None. With ``causal=True`` a
    position attends to itself and earlier positions only (CLIP's text transformer).
    """

    def __init__(self, width, heads, causal=False, **kwargs):
        super().__init__(**kwargs)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width = width
        self.heads = heads
        self.causal = causal
        self.head_dim = width // heads
        self.q_proj = keras.layers.Dense(width, name="q_proj")
        self.k_proj = keras.layers.Dense(width, name="k_proj")
        self.v_proj = keras.layers.Dense(width, name="v_proj")
        self.out_proj = keras.layers.Dense(width, name="out_proj")

    def build(self, query_shape, key_value_shape=None):
        kv_shape = query_shape if key_value_shape is None else key_value_shape
        self.q_proj.build(query_shape)
        self.k_proj.build(kv_shape)
        self.v_proj.build(kv_shape)
        self.out_proj.build(tuple(query_shape[:-1]) + (self.width,))
        self.built = True

    def call(self, query, key_value=None):
        key_value = query if key_value is None else key_value
        if onednn_bfloat16(self):
            return self._call_bfloat16(query, key_value)
        q = split_heads(self.q_proj(query), self.heads)  # (B, Tq, H, Dh)
        k = heads_first(split_heads(self.k_proj(key_value), self.heads))  # (B, H, Tk, Dh)
        v = heads_first(split_heads(self.v_proj(key_value), self.heads))  # (B, H, Tk, Dh)
        bias = None
        if self.causal:
            bias = causal_bias(ops.arange(ops.shape(q)[1]), ops.arange(ops.shape(k)[2]))  # (1, 1, Tq, Tk)
        out = dot_product_attention(q, k, v, bias=bias)  # (B, Tq, H, Dh)
        return self.out_proj(merge_heads(out))  # (B, Tq, C)

    def _call_bfloat16(self, query, key_value):
        """`call` in bfloat16 as TensorFlow runs it fast on oneDNN; the same function (see
        `ResidualAttentionBlock._call_bfloat16`): bfloat16 projections and attention products with float32
        accumulation (oneDNN), the biases, head split and query scale in one XLA-fused kernel
        (`attention_heads`), the softmax (with the causal mask) in float32 in another (`attention_softmax`)."""
        dtype = query.dtype
        kernels = [variable_value(d.kernel, dtype) for d in (self.q_proj, self.k_proj, self.v_proj)]
        biases = [variable_value(d.bias, tf.float32) for d in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = attention_heads(tf.tensordot(query, kernels[0], 1), tf.tensordot(key_value, kernels[1], 1),
                                  tf.tensordot(key_value, kernels[2], 1), *biases, self.heads)
        scores = tf.einsum("bthd,bhsd->bhts", q, k)  # (B, H, Tq, Tk)
        probs = attention_softmax(scores, self.causal)
        out = tf.einsum("bhts,bhsd->bthd", probs, v)  # (B, Tq, H, Dh)
        out = tf.tensordot(merge_heads(out), variable_value(self.out_proj.kernel, dtype), 1)
        return tf.nn.bias_add(out, variable_value(self.out_proj.bias, dtype))  # (B, Tq, C)

    def compute_output_shape(self, query_shape, key_value_shape=None):
        return tuple(query_shape[:-1]) + (self.width,)

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, heads=self.heads, causal=self.causal)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class ResidualAttentionBlock(keras.layers.Layer):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with a 4x QuickGELU MLP (OpenAI's block)."""

    def __init__(self, width, heads, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.heads = heads
        self.causal = causal
        self.ln_1 = layer_norm("ln_1")
        self.attn = MultiHeadAttention(width, heads, causal=causal, name="attn")
        self.ln_2 = layer_norm("ln_2")
        self.c_fc = keras.layers.Dense(width * 4, name="mlp.c_fc")
        self.c_proj = keras.layers.Dense(width, name="mlp.c_proj")

    def build(self, input_shape):
        self.ln_1.build(input_shape)
        self.attn.build(input_shape)
        self.ln_2.build(input_shape)
        self.c_fc.build(input_shape)
        self.c_proj.build(tuple(input_shape[:-1]) + (self.width * 4,))
        self.built = True

    def call(self, x):  # (B, T, C)
        step = shared_step(self)
        if step is not None:  # traced inside `shared_steps`: one traced function serves every block
            return step(self, x)
        if onednn_bfloat16(self):
            return self._call_bfloat16(x)
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(quick_gelu(self.c_fc(self.ln_2(x))))

    @staticmethod
    def _norm_weights(norm):
        """(gamma, beta) of a LayerNormalization in float32."""
        return variable_value(norm.gamma, tf.float32), variable_value(norm.beta, tf.float32)

    def _call_bfloat16(self, x):
        """The block in bfloat16, in the form TensorFlow runs fast on oneDNN; the same function.

        Matmuls are bfloat16 tensordots with float32 accumulation (oneDNN's AMX / AVX512_BF16 kernels), as
        Keras' Dense runs them. Everything between them runs as XLA-fused float32 kernels
        (`fused_elementwise`), one pass over the activations each: layer norm (with the residual sum before
        it), bias + QuickGELU, bias + residual. TensorFlow's own kernels take ~8 bfloat16 / float32 passes
        per layer norm and 3 for QuickGELU. Normalisation statistics and residual sums are float32; the
        residual stream between kernels is bfloat16, as in the plain form.
        """
        dtype = x.dtype
        a = self.attn(norm(x, *self._norm_weights(self.ln_1), self.ln_1.epsilon))
        x, h = residual_norm(x, a, *self._norm_weights(self.ln_2), self.ln_2.epsilon)
        u = tf.tensordot(h, variable_value(self.c_fc.kernel, dtype), 1)  # (B, T, 4 C)
        u = bias_quick_gelu(u, variable_value(self.c_fc.bias, tf.float32))
        y = tf.tensordot(u, variable_value(self.c_proj.kernel, dtype), 1)  # (B, T, C)
        return bias_residual(x, y, variable_value(self.c_proj.bias, tf.float32))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, heads=self.heads, causal=self.causal)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class ClassTokenAndPositions(keras.layers.Layer):
    """Prepends the learned ``class_embedding`` to the patch tokens and adds ``positional_embedding``.

    (B, N, C) -> (B, N + 1, C); N must equal ``num_positions - 1``.
    """

    def __init__(self, num_positions, width, **kwargs):
        super().__init__(**kwargs)
        self.num_positions = num_positions
        self.width = width

    def build(self, input_shape):
        self.class_embedding = self.add_weight(shape=(self.width,), initializer="zeros", name="class_embedding")
        self.positional_embedding = self.add_weight(
            shape=(self.num_positions, self.width), initializer="zeros", name="positional_embedding"
        )
        self.built = True

    def call(self, x):  # (B, N, C)
        cls = ops.broadcast_to(self.class_embedding[None, None, :], (ops.shape(x)[0], 1, self.width))
        x = ops.concatenate([ops.cast(cls, x.dtype), x], axis=1)  # (B, N + 1, C)
        return x + self.positional_embedding[None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_positions, self.width)

    def get_config(self):
        config = super().get_config()
        config.update(num_positions=self.num_positions, width=self.width)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class PositionalEmbedding(keras.layers.Layer):
    """Adds the first T rows of a learned (context_length, C) ``positional_embedding`` to (B, T, C)."""

    def __init__(self, context_length, width, **kwargs):
        super().__init__(**kwargs)
        self.context_length = context_length
        self.width = width

    def build(self, input_shape):
        self.positional_embedding = self.add_weight(
            shape=(self.context_length, self.width), initializer="zeros", name="positional_embedding"
        )
        self.built = True

    def call(self, x):  # (B, T, C)
        return x + self.positional_embedding[None, : ops.shape(x)[1]]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(context_length=self.context_length, width=self.width)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class EndOfTextPooling(keras.layers.Layer):
    """``call(hidden (B, T, C), token_ids (B, T))`` -> (B, C): hidden state at ``argmax(token_ids)``.

    OpenAI's rule: the end-of-text token has the highest id of the vocabulary, so its position is the
    argmax of each row (padding is 0).
    """

    def call(self, hidden, token_ids):
        eot = ops.cast(ops.argmax(token_ids, axis=-1), "int32")  # (B,)
        return ops.take_along_axis(hidden, eot[:, None, None], axis=1)[:, 0]  # (B, C)

    def compute_output_shape(self, hidden_shape, token_ids_shape):
        return (hidden_shape[0], hidden_shape[-1])


@keras.saving.register_keras_serializable(package="image_captioning")
class Bottleneck(keras.layers.Layer):
    """ModifiedResNet's bottleneck (expansion 4), channels-last.

    conv1 1x1 -> bn1 -> relu -> conv2 3x3 -> bn2 -> relu -> avgpool(stride) -> conv3 1x1 -> bn3, plus the
    identity, or ``downsample`` (avgpool(stride) -> 1x1 conv ``downsample.0`` -> ``downsample.1`` BN) when
    the stride or the width changes; then relu. All convolutions have stride 1 and no bias (unless folded).

    With ``fold_batch_norm`` there are no BatchNormalization layers: each inference-mode BN, a per-channel
    affine map, is folded into the convolution before it, which then has a bias (``kernel * s``,
    ``beta - running_mean * s``, ``s = gamma / sqrt(running_var + eps)``; see
    ``utils.convert.openai_clip.fold_batch_norm``). Same outputs, 4 variables and one layer fewer per BN,
    which is what makes the model faster to build and load (CLIP is frozen: its BN statistics never train).
    """

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, fold_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.inplanes = inplanes
        self.planes = planes
        self.stride = stride
        self.fold_batch_norm = bool(fold_batch_norm)
        out = planes * self.expansion
        self.conv1 = self._conv(planes, 1, "conv1")
        self.bn1 = self._norm("bn1")
        self.conv2 = self._conv(planes, 3, "conv2", padding="same")
        self.bn2 = self._norm("bn2")
        self.avgpool = keras.layers.AveragePooling2D(stride, name="avgpool") if stride > 1 else None
        self.conv3 = self._conv(out, 1, "conv3")
        self.bn3 = self._norm("bn3")
        self.has_downsample = stride > 1 or inplanes != out
        if self.has_downsample:
            self.downsample_pool = keras.layers.AveragePooling2D(stride, name="downsample.-1") if stride > 1 else None
            self.downsample_conv = self._conv(out, 1, "downsample.0")
            self.downsample_bn = self._norm("downsample.1")

    def _conv(self, filters, size, name, padding="valid"):
        """A stride-1 conv; biased only when it carries a folded BN."""
        return keras.layers.Conv2D(filters, size, padding=padding, use_bias=self.fold_batch_norm, name=name)

    def _norm(self, name):
        """The BN after a conv, or None when it is folded into the conv."""
        return None if self.fold_batch_norm else batch_norm(name)

    @staticmethod
    def _normed(bn, x, training):
        return x if bn is None else bn(x, training=training)

    def build(self, input_shape):  # (B, H, W, inplanes)
        batch, h, w = input_shape[:3]
        inner = (batch, h, w, self.planes)
        pooled = (batch, None if h is None else h // self.stride, None if w is None else w // self.stride)
        out = pooled + (self.planes * self.expansion,)
        builds = [(self.conv1, input_shape), (self.bn1, inner), (self.conv2, inner), (self.bn2, inner),
                  (self.conv3, pooled + (self.planes,)), (self.bn3, out)]
        if self.has_downsample:
            builds += [(self.downsample_conv, pooled + (self.inplanes,)), (self.downsample_bn, out)]
        for layer, shape in builds:
            if layer is not None:
                layer.build(shape)
        self.built = True

    def call(self, x, training=False):  # (B, H, W, Cin)
        out = ops.relu(self._normed(self.bn1, self.conv1(x), training))
        out = ops.relu(self._normed(self.bn2, self.conv2(out), training))
        if self.avgpool is not None:
            out = self.avgpool(out)  # (B, H/s, W/s, planes)
        out = self._normed(self.bn3, self.conv3(out), training)  # (B, H/s, W/s, 4 planes)
        identity = x
        if self.has_downsample:
            if self.downsample_pool is not None:
                identity = self.downsample_pool(identity)
            identity = self._normed(self.downsample_bn, self.downsample_conv(identity), training)
        return ops.relu(out + identity)

    def compute_output_shape(self, input_shape):
        batch, h, w = input_shape[:3]
        s = self.stride
        return (batch, None if h is None else h // s, None if w is None else w // s, self.planes * self.expansion)

    def get_config(self):
        config = super().get_config()
        config.update(inplanes=self.inplanes, planes=self.planes, stride=self.stride,
                      fold_batch_norm=self.fold_batch_norm)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class AttentionPool2d(keras.layers.Layer):
    """ModifiedResNet's attention pooling: (B, H, W, C) -> (B, output_dim).

    The mean feature is prepended to the H*W features, ``positional_embedding`` (H*W + 1, C) is added, and
    the mean token attends over all H*W + 1 tokens (``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``).
    """

    def __init__(self, spacial_dim, embed_dim, heads, output_dim=None, **kwargs):
        super().__init__(**kwargs)
        self.spacial_dim = spacial_dim
        self.embed_dim = embed_dim
        self.heads = heads
        self.output_dim = output_dim or embed_dim
        self.head_dim = embed_dim // heads
        self.q_proj = keras.layers.Dense(embed_dim, name="q_proj")
        self.k_proj = keras.layers.Dense(embed_dim, name="k_proj")
        self.v_proj = keras.layers.Dense(embed_dim, name="v_proj")
        self.c_proj = keras.layers.Dense(self.output_dim, name="c_proj")

    def build(self, input_shape):
        self.positional_embedding = self.add_weight(
            shape=(self.spacial_dim**2 + 1, self.embed_dim), initializer="zeros", name="positional_embedding"
        )
        tokens = (input_shape[0], None, self.embed_dim)
        for dense in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            dense.build(tokens)
        self.built = True

    def call(self, x):  # (B, H, W, C)
        batch = ops.shape(x)[0]
        x = ops.reshape(x, (batch, self.spacial_dim**2, self.embed_dim))  # (B, HW, C)
        x = ops.concatenate([ops.mean(x, axis=1, keepdims=True), x], axis=1)  # (B, HW + 1, C)
        x = x + self.positional_embedding[None]
        q = split_heads(self.q_proj(x[:, :1]), self.heads)  # (B, 1, H, Dh): the mean token only
        k = heads_first(split_heads(self.k_proj(x), self.heads))  # (B, H, HW + 1, Dh)
        v = heads_first(split_heads(self.v_proj(x), self.heads))  # (B, H, HW + 1, Dh)
        out = ops.reshape(dot_product_attention(q, k, v), (batch, self.embed_dim))  # (B, C)
        return self.c_proj(out)  # (B, output_dim)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(spacial_dim=self.spacial_dim, embed_dim=self.embed_dim, heads=self.heads,
                      output_dim=self.output_dim)
        return config
