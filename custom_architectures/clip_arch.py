"""OpenAI's CLIP in Keras 3: both image encoders, the text encoder and the contrastive logit scale.

- `VisionTransformer`: (B, n_px, n_px, 3) -> (B, output_dim). Patch conv without bias, class token,
  positions, ``ln_pre``, residual attention blocks, ``ln_post`` on the class token, ``proj``.
- `ModifiedResNet`: (B, n_px, n_px, 3) -> (B, output_dim). 3-conv stem + average pooling, anti-aliased
  Bottleneck stages, attention pooling.
- `TextTransformer`: (B, T) token ids -> (B, embed_dim), causal, features of the end-of-text token (the
  highest id of each row, as OpenAI takes it).
- `CLIPModel`: the three together with ``logit_scale``; ``logits(image_features, text_features)``.

Images are channels-last (NHWC). Layer names are OpenAI's module names (``conv1``,
``transformer.resblocks.3``, ``layer2.0``, ``attnpool`` ...), which is what the converter maps keys with.
`clip_config_from_shapes` infers the whole configuration from a checkpoint's key -> shape mapping exactly as
OpenAI's ``clip.model.build_model`` does, so any OpenAI checkpoint (B/32, B/16, L/14, L/14@336, RN50, RN101,
RN50x4, RN50x16, RN50x64) builds without naming its variant.

Example::

    config = clip_config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    model = build_clip(config)                      # CLIPModel, random weights
    feats = model.visual(keras.ops.zeros((2, 224, 224, 3)))   # (2, 512) for ViT-B/32
"""

import re
from collections.abc import Mapping

import keras
from keras import ops

from custom_layers.clip_layers import (
    AttentionPool2d,
    Bottleneck,
    ClassTokenAndPositions,
    EndOfTextPooling,
    PositionalEmbedding,
    ResidualAttentionBlock,
    batch_norm,
    layer_norm,
)


@keras.saving.register_keras_serializable(package="image_captioning")
class VisionTransformer(keras.Model):
    """CLIP's ViT image encoder (OpenAI ``VisionTransformer``), channels-last.

    Args mirror OpenAI's: ``input_resolution`` (n_px), ``patch_size``, ``width``, ``layers``, ``heads``,
    ``output_dim`` (the joint embedding size).
    """

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, **kwargs):
        grid = input_resolution // patch_size
        images = keras.Input((input_resolution, input_resolution, 3), name="images")
        x = keras.layers.Conv2D(width, patch_size, strides=patch_size, use_bias=False, name="conv1")(images)
        x = keras.layers.Reshape((grid * grid, width), name="flatten")(x)  # (B, grid^2, C), row-major
        x = ClassTokenAndPositions(grid * grid + 1, width, name="embeddings")(x)  # (B, grid^2 + 1, C)
        x = layer_norm("ln_pre")(x)
        for i in range(layers):
            x = ResidualAttentionBlock(width, heads, name=f"transformer.resblocks.{i}")(x)
        x = layer_norm("ln_post")(x[:, 0])  # (B, C) class token
        x = keras.layers.Dense(output_dim, use_bias=False, name="proj")(x)  # (B, output_dim)
        super().__init__(inputs=images, outputs=x, **kwargs)
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.width = width
        self.num_layers = layers
        self.heads = heads
        self.output_dim = output_dim

    def get_config(self):
        config = super().get_config()
        config.update(input_resolution=self.input_resolution, patch_size=self.patch_size, width=self.width,
                      layers=self.num_layers, heads=self.heads, output_dim=self.output_dim)
        return config

    @classmethod
    def from_config(cls, config):  # the constructor's kwargs (Functional's would read a layer graph)
        return cls(**config)


@keras.saving.register_keras_serializable(package="image_captioning")
class ModifiedResNet(keras.Model):
    """CLIP's ResNet image encoder (OpenAI ``ModifiedResNet``), channels-last.

    Args mirror OpenAI's: ``layers`` (blocks per stage, 4 ints), ``output_dim``, ``heads`` (of the attention
    pool), ``input_resolution``, ``width`` (stem width; the feature map has ``32 * width`` channels).
    ``fold_batch_norm``: every BatchNorm folded into the conv before it (biased convs, no ``bn*`` /
    ``downsample.1`` layers): the same function with ~40% fewer layers and variables, so faster to build
    and load (not to run: the convolutions are the work). What the converter builds; False (OpenAI's
    layout, one BN layer per BN module) is the default so that every config written before rebuilds as it
    was.
    """

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64, fold_batch_norm=False,
                 **kwargs):
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths, got {layers}")
        fold_batch_norm = bool(fold_batch_norm)

        def conv_norm_relu(x, filters, i, **conv_kwargs):  # conv{i} -> bn{i} (or folded into conv{i}) -> relu
            x = keras.layers.Conv2D(filters, 3, use_bias=fold_batch_norm, name=f"conv{i}", **conv_kwargs)(x)
            if not fold_batch_norm:
                x = batch_norm(f"bn{i}")(x)
            return keras.layers.ReLU(name=f"relu{i}")(x)

        images = keras.Input((input_resolution, input_resolution, 3), name="images")
        # the 3-layer stem; PyTorch pads the strided 3x3 conv by 1 on every side (not Keras' "same")
        x = keras.layers.ZeroPadding2D(1, name="conv1_pad")(images)
        x = conv_norm_relu(x, width // 2, 1, strides=2)
        x = conv_norm_relu(x, width // 2, 2, padding="same")
        x = conv_norm_relu(x, width, 3, padding="same")
        x = keras.layers.AveragePooling2D(2, name="avgpool")(x)  # (B, n_px/4, n_px/4, width)
        inplanes = width
        for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2)), start=1):
            planes = width * 2 ** (stage - 1)
            for b in range(blocks):
                x = Bottleneck(inplanes, planes, stride if b == 0 else 1, fold_batch_norm=fold_batch_norm,
                               name=f"layer{stage}.{b}")(x)
                inplanes = planes * Bottleneck.expansion
        # (B, n_px/32, n_px/32, 32 width)
        x = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim, name="attnpool")(x)
        super().__init__(inputs=images, outputs=x, **kwargs)
        self.layer_counts = layers
        self.output_dim = output_dim
        self.heads = heads
        self.input_resolution = input_resolution
        self.width = width
        self.fold_batch_norm = fold_batch_norm

    def get_config(self):
        config = super().get_config()
        config.update(layers=list(self.layer_counts), output_dim=self.output_dim, heads=self.heads,
                      input_resolution=self.input_resolution, width=self.width,
                      fold_batch_norm=self.fold_batch_norm)
        return config

    @classmethod
    def from_config(cls, config):  # the constructor's kwargs (Functional's would read a layer graph)
        return cls(**config)


@keras.saving.register_keras_serializable(package="image_captioning")
class TextTransformer(keras.Model):
    """CLIP's text encoder: (B, T) int token ids, T <= context_length -> (B, embed_dim).

    token_embedding + positional_embedding, causal residual attention blocks, ``ln_final``, the features
    at the end-of-text token (the highest id in each row), ``text_projection``.
    """

    def __init__(self, embed_dim, context_length, vocab_size, width, heads, layers, **kwargs):
        tokens = keras.Input((None,), dtype="int32", name="token_ids")
        x = keras.layers.Embedding(vocab_size, width, name="token_embedding")(tokens)  # (B, T, C)
        x = PositionalEmbedding(context_length, width, name="positional_embedding")(x)
        for i in range(layers):
            x = ResidualAttentionBlock(width, heads, causal=True, name=f"transformer.resblocks.{i}")(x)
        x = layer_norm("ln_final")(x)
        x = EndOfTextPooling(name="eot_pooling")(x, tokens)  # (B, C)
        x = keras.layers.Dense(embed_dim, use_bias=False, name="text_projection")(x)  # (B, embed_dim)
        super().__init__(inputs=tokens, outputs=x, **kwargs)
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.heads = heads
        self.num_layers = layers

    def get_config(self):
        config = super().get_config()
        config.update(embed_dim=self.embed_dim, context_length=self.context_length, vocab_size=self.vocab_size,
                      width=self.width, heads=self.heads, layers=self.num_layers)
        return config

    @classmethod
    def from_config(cls, config):  # the constructor's kwargs (Functional's would read a layer graph)
        return cls(**config)


@keras.saving.register_keras_serializable(package="image_captioning")
class CLIPModel(keras.Model):
    """The image encoder (``visual``), the text encoder (``text``, None for an image-only model) and
    ``logit_scale`` (log of the inverse softmax temperature).

    ``call((images, token_ids))`` returns ``logits_per_image`` (B_img, B_txt) as OpenAI's ``CLIP.forward``.
    ``config`` is the flat dict `clip_config_from_shapes` returns (``vision_layers`` an int for a ViT, a
    list of 4 ints for a ResNet; ``text_layers`` 0 for an image-only model), read from the towers; `build_clip`
    builds a model from it. ``get_config`` serializes the towers themselves (as keras-hub's ``CLIPBackbone``),
    so ``keras.saving.deserialize_keras_object`` rebuilds the same model.

    Args:
        visual: a `VisionTransformer` or a `ModifiedResNet` with OpenAI's head rule (see `clip_config_from_towers`).
        text: a `TextTransformer`, or None.
    """

    def __init__(self, visual, text=None, **kwargs):
        super().__init__(**kwargs)
        self.config = clip_config_from_towers(visual, text)  # validates the pair before anything is tracked
        self.visual = visual
        self.text = text
        self.logit_scale = self.add_weight(shape=(), initializer="zeros", name="logit_scale")
        self.built = True  # every weight exists (the towers are built): save_weights / load_weights work as is

    @property
    def is_vit(self):
        return isinstance(self.visual, VisionTransformer)

    def encode_image(self, images):  # (B, n_px, n_px, 3) -> (B, D)
        return self.visual(images, training=False)

    def encode_text(self, token_ids):  # (B, T) -> (B, D)
        if self.text is None:
            raise ValueError("this CLIP model was converted without its text encoder (image-only)")
        return self.text(token_ids, training=False)

    def logits(self, image_features, text_features):
        """exp(logit_scale) * cosine similarity: (B_img, D), (B_txt, D) -> (B_img, B_txt)."""
        image_features = image_features / ops.norm(image_features, axis=-1, keepdims=True)
        text_features = text_features / ops.norm(text_features, axis=-1, keepdims=True)
        return ops.exp(self.logit_scale) * ops.matmul(image_features, ops.transpose(text_features))

    def call(self, inputs):
        images, token_ids = inputs
        return self.logits(self.encode_image(images), self.encode_text(token_ids))

    def get_config(self):
        config = super().get_config()
        config.update(visual=keras.layers.serialize(self.visual),
                      text=None if self.text is None else keras.layers.serialize(self.text))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["visual"] = keras.layers.deserialize(config["visual"])
        if config.get("text") is not None:
            config["text"] = keras.layers.deserialize(config["text"])
        return cls(**config)


def clip_config_from_towers(visual, text=None):
    """The flat CLIP config (as `clip_config_from_shapes` returns it) describing these towers, plus
    ``"fold_batch_norm": True`` for a ResNet whose BatchNorms are folded (so that `build_clip` rebuilds it so).

    The flat config does not store the image encoder's heads: OpenAI's rule (ViT: width // 64; ResNet
    attention pool: 32 * width // 64) is implied, so towers with other heads are refused (ValueError) rather
    than described by a config that `build_clip` would rebuild differently.
    """
    if isinstance(visual, VisionTransformer):
        config = {"embed_dim": visual.output_dim, "image_resolution": visual.input_resolution,
                  "vision_layers": visual.num_layers, "vision_width": visual.width,
                  "vision_patch_size": visual.patch_size}
        rule = visual.width // 64
    elif isinstance(visual, ModifiedResNet):
        config = {"embed_dim": visual.output_dim, "image_resolution": visual.input_resolution,
                  "vision_layers": list(visual.layer_counts), "vision_width": visual.width,
                  "vision_patch_size": None}
        if visual.fold_batch_norm:  # absent = OpenAI's layout, as in every config written before the flag
            config["fold_batch_norm"] = True
        rule = visual.width * 32 // 64
    else:
        raise TypeError(f"visual must be a VisionTransformer or a ModifiedResNet, got {type(visual).__name__}")
    if visual.heads != rule:
        raise ValueError(f"the image encoder has {visual.heads} heads; a CLIP config implies OpenAI's {rule} for "
                         f"width {visual.width}")
    if text is None:
        config.update(context_length=0, vocab_size=0, text_width=0, text_heads=0, text_layers=0)
        return config
    if not isinstance(text, TextTransformer):
        raise TypeError(f"text must be a TextTransformer or None, got {type(text).__name__}")
    if text.embed_dim != visual.output_dim:
        raise ValueError(f"the text encoder projects to {text.embed_dim}, the image encoder to {visual.output_dim}")
    config.update(context_length=text.context_length, vocab_size=text.vocab_size, text_width=text.width,
                  text_heads=text.heads, text_layers=text.num_layers)
    return config


def build_visual(config):
    """The image encoder described by a CLIP config (see `clip_config_from_shapes`; a ResNet's optional
    ``fold_batch_norm``, default False, builds it with its BatchNorms folded into the convolutions)."""
    if isinstance(config["vision_layers"], (list, tuple)):
        return ModifiedResNet(
            layers=config["vision_layers"],
            output_dim=config["embed_dim"],
            heads=config["vision_width"] * 32 // 64,
            input_resolution=config["image_resolution"],
            width=config["vision_width"],
            fold_batch_norm=bool(config.get("fold_batch_norm", False)),
            name="visual",
        )
    return VisionTransformer(
        input_resolution=config["image_resolution"],
        patch_size=config["vision_patch_size"],
        width=config["vision_width"],
        layers=config["vision_layers"],
        heads=config["vision_width"] // 64,
        output_dim=config["embed_dim"],
        name="visual",
    )


def build_text(config):
    """The text encoder described by a CLIP config (see `clip_config_from_shapes`)."""
    return TextTransformer(
        embed_dim=config["embed_dim"],
        context_length=config["context_length"],
        vocab_size=config["vocab_size"],
        width=config["text_width"],
        heads=config["text_heads"],
        layers=config["text_layers"],
        name="text",
    )


def build_clip(config):
    """A `CLIPModel` (random weights) from a flat config dict (``text_layers`` 0: image-only)."""
    text = build_text(config) if config.get("text_layers") else None
    return CLIPModel(build_visual(config), text, name="clip")


def _count(keys, pattern):
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.fullmatch(k))})


def clip_config_from_shapes(shapes: Mapping[str, tuple], visual_only=False) -> dict:
    """Infer a CLIP configuration from a checkpoint's ``{key: shape}``, as OpenAI's ``build_model`` does.

    A ViT is recognised by ``visual.proj``; otherwise the ResNet keys are required. Heads are not stored
    in the weights: OpenAI's rule (width // 64; ResNet attention pool: 32 * width // 64) is applied.
    Raises ``KeyError`` naming the first key that is missing (the converter turns it into a clear error).
    With ``visual_only`` the text keys are not read and ``text_layers`` is 0.
    """
    keys = list(shapes)
    if "visual.proj" in shapes:
        vision_width, _, patch, _ = shapes["visual.conv1.weight"]
        vision_layers = _count(keys, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")
        positions = shapes["visual.positional_embedding"][0]
        grid = round((positions - 1) ** 0.5)
        if grid * grid + 1 != positions:
            raise ValueError(f"visual.positional_embedding has {positions} rows, not a square grid + 1")
        config = {
            "embed_dim": shapes["visual.proj"][1],
            "image_resolution": patch * grid,
            "vision_layers": vision_layers,
            "vision_width": vision_width,
            "vision_patch_size": patch,
        }
    else:
        vision_layers = [_count(keys, rf"visual\.layer{b}\.(\d+)\..*") for b in (1, 2, 3, 4)]
        vision_width = shapes["visual.layer1.0.conv1.weight"][0]
        positions = shapes["visual.attnpool.positional_embedding"][0]
        grid = round((positions - 1) ** 0.5)
        if grid * grid + 1 != positions:
            raise ValueError(f"visual.attnpool.positional_embedding has {positions} rows, not a square grid + 1")
        config = {
            "embed_dim": shapes["visual.attnpool.c_proj.weight"][0],
            "image_resolution": grid * 32,
            "vision_layers": vision_layers,
            "vision_width": vision_width,
            "vision_patch_size": None,
        }
    if visual_only:
        config.update(context_length=0, vocab_size=0, text_width=0, text_heads=0, text_layers=0)
        return config
    if shapes["text_projection"][1] != config["embed_dim"]:
        raise ValueError(
            f"text_projection projects to {shapes['text_projection'][1]}, the image encoder to {config['embed_dim']}"
        )
    text_width = shapes["ln_final.weight"][0]
    config.update(
        context_length=shapes["positional_embedding"][0],
        vocab_size=shapes["token_embedding.weight"][0],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=_count(keys, r"transformer\.resblocks\.(\d+)\..*"),
    )
    return config
