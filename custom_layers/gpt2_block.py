"""GPT-2's pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

Sub-layer names mirror the PyTorch module (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``).

Example::

    block = GPT2Block(n_embd=768, n_head=12, name="h_0")
    y = block(x, attention_bias=bias)          # (B, T, C)
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from custom_layers.activations import gelu_new  # noqa: E402
from custom_layers.gpt2_attention import GPT2Attention  # noqa: E402


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2MLP(keras.layers.Layer):
    """``c_proj(gelu_new(c_fc(x)))`` with residual dropout; hidden width ``4 * n_embd`` as in GPT-2."""

    def __init__(self, n_embd, n_inner=None, resid_pdrop=0.0, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.n_embd = n_embd
        self.n_inner = n_inner or 4 * n_embd
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        init = keras.initializers.RandomNormal(stddev=initializer_range)
        self.c_fc = keras.layers.Dense(self.n_inner, kernel_initializer=init, name="c_fc")
        self.c_proj = keras.layers.Dense(n_embd, kernel_initializer=init, name="c_proj")
        self.dropout = keras.layers.Dropout(resid_pdrop, name="dropout")

    def build(self, input_shape=None):
        self.c_fc.build((None, None, self.n_embd))
        self.c_proj.build((None, None, self.n_inner))
        self.built = True

    def call(self, x, training=False):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))), training=training)  # (B, T, C)

    def get_config(self):
        config = super().get_config()
        config.update(n_embd=self.n_embd, n_inner=self.n_inner, resid_pdrop=self.resid_pdrop,
                      initializer_range=self.initializer_range)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2Block(keras.layers.Layer):
    """One GPT-2 transformer block (pre-LayerNorm attention and MLP, each with a residual)."""

    def __init__(self, n_embd, n_head, layer_norm_epsilon=1e-5, attn_pdrop=0.0, resid_pdrop=0.0,
                 initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.n_embd = n_embd
        self.n_head = n_head
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        self.ln_1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="ln_1")
        self.attn = GPT2Attention(n_embd, n_head, attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop,
                                  initializer_range=initializer_range, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="ln_2")
        self.mlp = GPT2MLP(n_embd, resid_pdrop=resid_pdrop, initializer_range=initializer_range, name="mlp")

    def build(self, input_shape=None):
        shape = (None, None, self.n_embd)
        for layer in (self.ln_1, self.attn, self.ln_2, self.mlp):
            layer.build(shape)
        self.built = True

    def call(self, x, attention_bias=None, training=False):
        """x (B, T, C), attention_bias additive, broadcastable to (B, H, T, T) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x), attention_bias=attention_bias, training=training)
        return x + self.mlp(self.ln_2(x), training=training)

    def call_with_cache(self, x, layer_cache, cache_index, attention_bias):
        """Inference on a chunk x (B, T, C) with this block's cache; returns (y (B, T, C), layer_cache)."""
        h, layer_cache = self.attn.call_with_cache(self.ln_1(x), layer_cache, cache_index, attention_bias)
        x = x + h
        return x + self.mlp(self.ln_2(x)), layer_cache

    def get_config(self):
        config = super().get_config()
        config.update(
            n_embd=self.n_embd, n_head=self.n_head, layer_norm_epsilon=self.layer_norm_epsilon,
            attn_pdrop=self.attn_pdrop, resid_pdrop=self.resid_pdrop, initializer_range=self.initializer_range,
        )
        return config
