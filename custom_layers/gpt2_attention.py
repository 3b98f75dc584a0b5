"""GPT-2's causal self-attention, with a preallocated key/value cache for compiled decoding.

Layer names mirror the PyTorch module (``c_attn``: fused q/k/v projection, ``c_proj``: output projection),
so a converter maps ``h.{i}.attn.c_attn.weight`` (stored ``(in, out)`` by HF's Conv1D) onto the kernel of a
`custom_layers.linear.Linear` (``(out, in)``: transposed once, at conversion).

The KV-cached inference step of a block, attention included, is
`custom_layers.gpt2_block.cached_block_step` (one function of the weights for every block).

Example::

    attn = GPT2Attention(n_embd=768, n_head=12, name="attn")
    y = attn(x, attention_bias=bias)                                  # (B, T, C)
"""

import keras
from keras import ops

from custom_layers.attention import dot_product_attention, merge_heads
from custom_layers.quantized import check_quantization, projection


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2Attention(keras.layers.Layer):
    """Multi-head causal self-attention of a GPT-2 block.

    Args:
        n_embd: model width C.
        n_head: number of heads H (head_dim = C // H).
        attn_pdrop: dropout on the attention probabilities (training only).
        resid_pdrop: dropout on the output projection (training only).
        initializer_range: stddev of the normal kernel initialiser (GPT-2: 0.02).
    """

    def __init__(self, n_embd, n_head, attn_pdrop=0.0, resid_pdrop=0.0, initializer_range=0.02, quantization=None,
                 **kwargs):
        super().__init__(**kwargs)
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        self.quantization = check_quantization(quantization)
        self.c_attn = projection(3 * n_embd, initializer_range, quantization, name="c_attn")
        self.c_proj = projection(n_embd, initializer_range, quantization, name="c_proj")
        self.attn_dropout = keras.layers.Dropout(attn_pdrop, name="attn_dropout")
        self.resid_dropout = keras.layers.Dropout(resid_pdrop, name="resid_dropout")

    def build(self, input_shape=None):
        self.c_attn.build((None, None, self.n_embd))
        self.c_proj.build((None, None, self.n_embd))
        self.built = True

    def _qkv(self, x):
        """(B, T, C) -> q (B, T, H, D), k and v (B, H, T, D) (the kernel's layout, `custom_layers.attention`)."""
        qkv = self.c_attn(x)  # (B, T, 3C)
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(qkv, (batch, length, 3, self.n_head, self.head_dim))  # (B, T, 3, H, D)
        q = qkv[:, :, 0]  # (B, T, H, D)
        k = ops.transpose(qkv[:, :, 1], (0, 2, 1, 3))  # (B, H, T, D)
        v = ops.transpose(qkv[:, :, 2], (0, 2, 1, 3))  # (B, H, T, D)
        return q, k, v

    def _attend(self, q, k, v, attention_bias, training=False):
        """q (B, T, H, D), k/v (B, H, S, D), bias broadcastable to (B, H, T, S) -> (B, T, C)."""
        out = dot_product_attention(q, k, v, bias=attention_bias, dropout=self.attn_dropout, training=training)
        return merge_heads(out)  # (B, T, C)

    def call(self, x, attention_bias=None, training=False):
        """x (B, T, C); attention_bias additive, broadcastable to (B, H, T, T) (0 = attend)."""
        q, k, v = self._qkv(x)
        out = self._attend(q, k, v, attention_bias, training=training)
        return self.resid_dropout(self.c_proj(out), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_embd=self.n_embd, n_head=self.n_head, attn_pdrop=self.attn_pdrop,
            resid_pdrop=self.resid_pdrop, initializer_range=self.initializer_range,
        )
        if self.quantization is not None:  # absent for float weights: float configs (and identities) unchanged
            config.update(quantization=self.quantization)
        return config
