"""ClipCap mappers: a CLIP image embedding (B, D) -> a GPT-2 prefix (B, K, C).

Exactly the computations of the released ClipCap implementation (arXiv 2111.09734):

- `ClipCapMLP` (COCO / Conceptual Captions weights): Linear(D -> K*C/2) -> tanh -> Linear(-> K*C), reshaped to
  (K, C) (prefix token j is output features [C*j, C*j + C)). ``num_hidden_layers=0`` is the single
  Linear(D -> K*C) of older checkpoints with K > 10 (``clip_project.weight/bias``).
- `ClipCapTransformerMapper` (the transformer weights): ``linear`` Linear(D -> L*C) reshaped to (L, C),
  concatenated with a learned ``prefix_const`` (K, C), then pre-LayerNorm layers without positions, mask or
  final norm; the output is the last K positions.

Layer names mirror the checkpoint's module names (``model_0`` <- ``clip_project.model.0``,
``layers_3/attn/to_keys_values`` <- ``clip_project.transformer.layers.3.attn.to_keys_values``), so that
`utils.convert.clipcap` maps keys one to one.

`ClipCapBackbone` holds a mapper and GPT-2 (and the normalisation policy) as one serializable Keras model.
The mapper types are named in `mapper_registry.MAPPERS` (readable without Keras); `build_mapper` /
`mapping_type_of` / `mapper_config` read it, and each class's ``get_config`` holds its arguments.

Example::

    mapper = ClipCapTransformerMapper(prefix_size=640, prefix_length=40, clip_length=40, n_embd=768)
    prefix = mapper(np.zeros((2, 640), "float32"))      # (2, 40, 768)
"""

import keras
from keras import ops

from custom_architectures.transformers_arch.gpt2_arch import GPT2  # noqa: F401 (registered: a backbone's child)
from custom_architectures.transformers_arch.mapper_registry import MAPPERS, mapper_type
from custom_layers.attention import dot_product_attention, heads_first, merge_heads, split_heads
from custom_layers.shared_steps import shared_step


@keras.saving.register_keras_serializable(package="image_captioning")
class ClipCapMLP(keras.Model):
    """The MLP mapper: Linear -> tanh -> Linear (or a single Linear with ``num_hidden_layers=0``).

    Args:
        prefix_size: D, the CLIP embedding size (512 for ViT-B/32).
        prefix_length: K, the number of prefix positions fed to GPT-2.
        n_embd: C, GPT-2's width.
        num_hidden_layers: 1 for the released MLP (hidden width K*C/2), 0 for the legacy single Linear.
    """

    def __init__(self, prefix_size=512, prefix_length=10, n_embd=768, num_hidden_layers=1, **kwargs):
        super().__init__(**kwargs)
        if num_hidden_layers not in (0, 1):
            raise ValueError(f"num_hidden_layers must be 0 (single Linear) or 1 (MLP), got {num_hidden_layers}")
        self.prefix_size = prefix_size
        self.prefix_length = prefix_length
        self.n_embd = n_embd
        self.num_hidden_layers = num_hidden_layers
        out = prefix_length * n_embd
        if num_hidden_layers == 1:
            self.model_0 = keras.layers.Dense(out // 2, name="model_0")
            self.model_2 = keras.layers.Dense(out, name="model_2")
            self.model_0.build((None, prefix_size))
            self.model_2.build((None, out // 2))
        else:
            self.linear = keras.layers.Dense(out, name="linear")
            self.linear.build((None, prefix_size))
        self.built = True

    def call(self, embeddings):
        x = ops.convert_to_tensor(embeddings, "float32")  # (B, D)
        if self.num_hidden_layers == 1:
            x = self.model_2(ops.tanh(self.model_0(x)))  # (B, K*C)
        else:
            x = self.linear(x)  # (B, K*C)
        return ops.reshape(x, (-1, self.prefix_length, self.n_embd))  # (B, K, C)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.prefix_length, self.n_embd)

    def get_config(self):
        config = super().get_config()
        config.update(prefix_size=self.prefix_size, prefix_length=self.prefix_length, n_embd=self.n_embd,
                      num_hidden_layers=self.num_hidden_layers)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class MapperAttention(keras.layers.Layer):
    """Self-attention of the mapper: bias-free ``to_queries`` and ``to_keys_values`` (keys = first C outputs,
    values = next C; head h uses dims [h*Dh, (h+1)*Dh) of each), softmax(q.k / sqrt(Dh)), ``project``."""

    def __init__(self, dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_queries = keras.layers.Dense(dim, use_bias=False, name="to_queries")
        self.to_keys_values = keras.layers.Dense(2 * dim, use_bias=False, name="to_keys_values")
        self.project = keras.layers.Dense(dim, name="project")
        for layer in (self.to_queries, self.to_keys_values, self.project):
            layer.build((None, None, dim))
        self.built = True

    def call(self, x):
        b, n = ops.shape(x)[0], ops.shape(x)[1]
        h, dh = self.num_heads, self.head_dim
        q = split_heads(self.to_queries(x), h)  # (B, N, H, Dh)
        kv = ops.reshape(self.to_keys_values(x), (b, n, 2, h, dh))  # (B, N, 2, H, Dh)
        k, v = heads_first(kv[:, :, 0]), heads_first(kv[:, :, 1])  # (B, H, N, Dh) each
        out = dot_product_attention(q, k, v)  # (B, N, H, Dh)
        return self.project(merge_heads(out))  # (B, N, C)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class MapperMLP(keras.layers.Layer):
    """``fc1`` (C -> ratio*C) -> ReLU -> ``fc2`` (-> C)."""

    def __init__(self, dim, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.fc1 = keras.layers.Dense(hidden_dim, name="fc1")
        self.fc2 = keras.layers.Dense(dim, name="fc2")
        self.fc1.build((None, None, dim))
        self.fc2.build((None, None, hidden_dim))
        self.built = True

    def call(self, x):
        return self.fc2(ops.relu(self.fc1(x)))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, hidden_dim=self.hidden_dim)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class MapperLayer(keras.layers.Layer):
    """One pre-norm layer: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, dim, num_heads, hidden_dim, layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.hidden_dim = dim, num_heads, hidden_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.norm1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm1")
        self.attn = MapperAttention(dim, num_heads, name="attn")
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm2")
        self.mlp = MapperMLP(dim, hidden_dim, name="mlp")
        self.norm1.build((None, None, dim))
        self.norm2.build((None, None, dim))
        self.built = True

    def call(self, x):
        step = shared_step(self)
        if step is not None:  # traced inside `shared_steps` (the compiled mapper): one function serves all layers
            return step(self, x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, hidden_dim=self.hidden_dim,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="image_captioning")
class ClipCapTransformerMapper(keras.Model):
    """The transformer mapper of the released ``transformer_weights.pt`` (K = L = 40, 8 layers).

    Args:
        prefix_size: D, the CLIP embedding size (640 for RN50x4).
        prefix_length: K, the learned constant positions whose outputs form the prefix.
        clip_length: L, the positions the CLIP embedding is projected to.
        n_embd: C, GPT-2's width.
        num_layers: mapper layers (8 in the release).
        num_heads: attention heads (8 in the release; cannot be read from a checkpoint's shapes).
        mlp_ratio: hidden width of each layer's MLP relative to C (2 in the release).
    """

    def __init__(self, prefix_size=640, prefix_length=40, clip_length=40, n_embd=768, num_layers=8, num_heads=8,
                 mlp_ratio=2.0, layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.prefix_size = prefix_size
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.n_embd = n_embd
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.linear = keras.layers.Dense(clip_length * n_embd, name="linear")
        self.linear.build((None, prefix_size))
        self.prefix_const = self.add_weight(shape=(prefix_length, n_embd), initializer="random_normal",
                                            name="prefix_const")
        self.transformer_layers = [
            MapperLayer(n_embd, num_heads, int(n_embd * mlp_ratio), layer_norm_epsilon, name=f"layers_{i}")
            for i in range(num_layers)
        ]
        self.built = True

    def call(self, embeddings):
        x = ops.convert_to_tensor(embeddings, "float32")  # (B, D)
        b = ops.shape(x)[0]
        x = ops.reshape(self.linear(x), (b, self.clip_length, self.n_embd))  # (B, L, C)
        const = ops.broadcast_to(self.prefix_const[None], (b, self.prefix_length, self.n_embd))  # (B, K, C)
        x = ops.concatenate([x, const], axis=1)  # (B, L+K, C)
        for layer in self.transformer_layers:
            x = layer(x)
        return x[:, self.clip_length :]  # (B, K, C)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.prefix_length, self.n_embd)

    def get_config(self):
        config = super().get_config()
        config.update(prefix_size=self.prefix_size, prefix_length=self.prefix_length,
                      clip_length=self.clip_length, n_embd=self.n_embd, num_layers=self.num_layers,
                      num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


_KERAS_KEYS = ("name", "trainable", "dtype")
_GPT2_ARCH_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")


def build_mapper(mapping_type, **kwargs):
    """A `MAPPERS` name ('mlp', 'linear', 'transformer', ...) -> the mapper; kwargs are the mapper's constructor
    kwargs (those of `mapper_config` without ``mapping_type``)."""
    entry = mapper_type(mapping_type)
    return entry.resolve()(**kwargs, **entry.fixed)


def mapping_type_of(mapper) -> str:
    """The `MAPPERS` name of a mapper instance."""
    for name, entry in MAPPERS.items():
        if type(mapper) is entry.resolve() and all(getattr(mapper, k) == v for k, v in entry.fixed.items()):
            return name
    raise ValueError(f"{type(mapper).__name__} is not a registered ClipCap mapper (mapper_registry.MAPPERS)")


def mapper_config(mapper) -> dict:
    """``{"mapping_type", **architecture}``: the mapper's ``get_config`` without Keras' own entries (name,
    trainable, dtype) and without what the type fixes, so ``build_mapper(**mapper_config(m))`` rebuilds it."""
    kind = mapping_type_of(mapper)
    config = {k: v for k, v in mapper.get_config().items() if k not in _KERAS_KEYS and k not in MAPPERS[kind].fixed}
    return {"mapping_type": kind, **config}


@keras.saving.register_keras_serializable(package="image_captioning")
class ClipCapBackbone(keras.Model):
    """The whole ClipCap network: CLIP embedding (B, D) -> mapper prefix (B, K, C) -> GPT-2.

    Inference (`prefix`, then cached decoding on ``gpt2``), teacher-forced logits and training all go through
    this one model, so the normalisation policy and the forward pass exist once.

    Args:
        mapper: a mapper of `MAPPERS` (its ``n_embd`` must be GPT-2's width).
        gpt2: the `GPT2` language model.
        normalize_prefix: L2-normalise the CLIP embedding before the mapper (``x / ||x||``, no epsilon: a zero
            vector has no direction and gives NaN; `ClipCap` refuses one before it gets here). The released
            transformer weights expect it, the MLP weights do not.

    Example::

        backbone = ClipCapBackbone(build_mapper("mlp", prefix_size=512, prefix_length=10, n_embd=768), GPT2())
        logits = backbone(embeddings, token_ids)          # (B, K+T, V)
    """

    def __init__(self, mapper, gpt2, normalize_prefix=False, **kwargs):
        kwargs.setdefault("name", "clipcap_backbone")
        super().__init__(**kwargs)
        mapping_type_of(mapper)  # a registered mapper, or a clear error
        if int(mapper.n_embd) != int(gpt2.n_embd):
            raise ValueError(f"the mapper produces {mapper.n_embd}-d prefix embeddings, GPT-2 is {gpt2.n_embd} wide")
        self.mapper = mapper
        self.gpt2 = gpt2
        self.normalize_prefix = bool(normalize_prefix)
        self.built = True

    @property
    def prefix_length(self) -> int:
        return int(self.mapper.prefix_length)

    @property
    def prefix_size(self) -> int:
        return int(self.mapper.prefix_size)

    def prefix(self, embeddings, training=False):
        """CLIP embeddings (B, D) -> GPT-2 prefix (B, K, C): the normalisation policy, then the mapper."""
        x = ops.convert_to_tensor(embeddings, "float32")  # (B, D)
        if self.normalize_prefix:
            x = x / ops.norm(x, axis=-1, keepdims=True)
        return self.mapper(x, training=training)  # (B, K, C)

    def call(self, embeddings, token_ids, padding_mask=None, training=False):
        """Teacher-forced logits (B, K+T, V) of GPT-2 on [prefix(embeddings), token_ids (B, T)].

        ``padding_mask`` (B, K+T): 1 = real, 0 = pad. ``training`` turns GPT-2's dropout on (the mappers
        have none; prefix-only training passes False and takes gradients for the mapper only)."""
        prefix = self.prefix(embeddings, training=training)
        return self.gpt2(token_ids=token_ids, inputs_embeds=prefix, padding_mask=padding_mask, training=training)

    def describe(self) -> dict:
        """A flat JSON-able description: `mapper_config` entries, ``normalize_prefix`` and ``gpt2`` (GPT-2's
        architecture: sizes and epsilon; dropout rates and initialisation are in `get_config`)."""
        gpt2 = {k: v for k, v in self.gpt2.get_config().items() if k in _GPT2_ARCH_KEYS}
        return {**mapper_config(self.mapper), "normalize_prefix": self.normalize_prefix, "gpt2": gpt2}

    def get_config(self):
        config = super().get_config()
        config.update(mapper=keras.saving.serialize_keras_object(self.mapper),
                      gpt2=keras.saving.serialize_keras_object(self.gpt2), normalize_prefix=self.normalize_prefix)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        mapper = keras.saving.deserialize_keras_object(config.pop("mapper"))
        gpt2 = keras.saving.deserialize_keras_object(config.pop("gpt2"))
        return cls(mapper, gpt2, **config)
