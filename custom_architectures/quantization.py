"""Int8 copies of float models for one-image decoding (``precision="int8"``, `custom_layers.quantized`).

`quantize_gpt2` builds a GPT-2 of the same config with ``quantization="int8"``: every block's ``c_attn``,
``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` kernel becomes int8 per output channel, the tied ``wte``
(token embedding and LM head) int8 per vocabulary row; biases, layer norms and positions stay float32.
`quantize_backbone` does it for a ClipCap backbone (the mapper stays float: it runs once per image).
The float model is left unchanged.

Example::

    backbone8 = quantize_backbone(backbone)
    logits = backbone8.gpt2.call_with_cache(prefix, backbone8.gpt2.init_cache(1, 77), 0)[0]
"""

import keras

from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
from custom_architectures.transformers_arch.gpt2_arch import GPT2


def is_quantized(gpt2):
    """Whether a GPT-2 holds int8 weights."""
    return getattr(gpt2, "quantization", None) is not None


def quantize_gpt2(gpt2):
    """A new `GPT2` with int8 weights computed from the float ``gpt2`` (same config, same name)."""
    if is_quantized(gpt2):
        raise ValueError(f"{gpt2.name} is already quantized ({gpt2.quantization})")
    config = gpt2.get_config()
    config.pop("quantization", None)
    quantized = GPT2.from_config({**config, "quantization": "int8"})
    quantized.wte.set_from_embeddings(gpt2.wte.embeddings)
    quantized.wpe.embeddings.assign(gpt2.wpe.embeddings)
    quantized.ln_f.set_weights(gpt2.ln_f.get_weights())
    for source, target in zip(gpt2.h, quantized.h, strict=True):
        target.ln_1.set_weights(source.ln_1.get_weights())
        target.ln_2.set_weights(source.ln_2.get_weights())
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            group, layer = name.split(".")
            getattr(getattr(target, group), layer).set_from_linear(getattr(getattr(source, group), layer))
    return quantized


def quantize_backbone(backbone):
    """A new `ClipCapBackbone` sharing ``backbone``'s mapper, with `quantize_gpt2` of its GPT-2."""
    if not isinstance(backbone, ClipCapBackbone):
        raise TypeError(f"quantize_backbone needs a ClipCapBackbone, got {type(backbone).__name__}")
    config = backbone.get_config()
    return ClipCapBackbone(backbone.mapper, quantize_gpt2(backbone.gpt2),
                           normalize_prefix=backbone.normalize_prefix, name=config.get("name"))


def check_trainable(model):
    """Raise a clear error when ``model`` (a backbone or a GPT-2) holds int8 weights: they cannot be trained."""
    gpt2 = getattr(model, "gpt2", model)
    if isinstance(gpt2, keras.Model) and is_quantized(gpt2):
        raise ValueError("this model holds int8 weights (precision='int8'), which are for inference only: train "
                         "the float32 model (ClipCap.load(name) without precision) and quantize after")
