"""Int8 copies of float models for one-image decoding (``precision="int8"``, `custom_layers.quantized`).

`quantize_gpt2` builds a GPT-2 of the same config with ``quantization="int8"``: every block's ``c_attn``,
``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` kernel becomes int8 per output channel, the tied ``wte``
(token embedding and LM head) int8 per vocabulary row; biases, layer norms and positions stay float32.
`quantize_backbone` does it for a ClipCap backbone (the mapper stays float: it runs once per image).
The float model is left unchanged. `check_int8_weights` refuses, at load, int8 weights the format does not hold
(a scale not finite and > 0, a q of -128).

Example::

    backbone8 = quantize_backbone(backbone)
    logits = backbone8.gpt2.call_with_cache(prefix, backbone8.gpt2.init_cache(1, 77), 0)[0]
"""

import keras
import numpy as np

from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
from custom_architectures.transformers_arch.gpt2_arch import GPT2
from custom_layers.quantized import QMAX, Int8Dense, Int8Embedding

#: the largest scale of an int8 row: q * scale (|q| <= QMAX) stays a finite float32
MAX_SCALE = float(np.finfo(np.float32).max) / QMAX


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


def int8_weights(gpt2):
    """[(q, scale)] variables of every int8 layer of ``gpt2`` (its ``wte``, each block's projections)."""
    layers = [gpt2.wte] + [layer for block in gpt2.h for layer in (block.attn.c_attn, block.attn.c_proj,
                                                                      block.mlp.c_fc, block.mlp.c_proj)]
    pairs = []
    for layer in layers:
        if isinstance(layer, Int8Embedding):
            pairs.append((layer.embeddings_q, layer.embeddings_scale))
        elif isinstance(layer, Int8Dense):
            pairs.append((layer.kernel_q, layer.kernel_scale))
    return pairs


def check_int8_weights(gpt2, weights_path, error):
    """Refuse (``error`` naming ``weights_path``, the variable, the value and what was expected) int8 weights
    as loaded that the format does not hold: a scale that is not finite and > 0 (at most `MAX_SCALE`), a q
    outside [-QMAX, QMAX] (the symmetric range: -128 is never written). The fast loader assigns variables
    directly, so no layer sees them; a NaN, zero or negative scale would give empty captions (score nan) or
    garbage. One vectorised pass, a single result read back (measured 0.05 s for a 124M GPT-2 on 2 CPU cores)."""
    import tensorflow as tf

    pairs = int8_weights(gpt2)
    if not pairs:
        return
    checks = []
    for q, scale in pairs:
        s = scale.value
        checks.append(tf.reduce_all((s > 0) & (s <= MAX_SCALE)))
        checks.append(tf.reduce_min(q.value) >= -QMAX)  # int8: <= QMAX always
    ok = tf.stack(checks).numpy()
    if ok.all():
        return
    first = int(np.argmin(ok))
    q, scale = pairs[first // 2]
    if first % 2 == 0:
        values = scale.numpy()
        index = int(np.argmax(~((values > 0) & (values <= MAX_SCALE))))
        raise error(f"{weights_path}: the int8 scale {scale.path} holds {values[index]} at row {index}: every scale "
                    f"must be finite and > 0 (at most {MAX_SCALE:.4g}); the file is damaged or was edited: refused; "
                    "save or convert the model again")
    values = q.numpy()
    index = np.unravel_index(int(np.argmin(values)), values.shape)
    raise error(f"{weights_path}: the int8 weight {q.path} holds {values[index]} at {tuple(int(i) for i in index)}: "
                f"int8 values must lie within [-{QMAX}, {QMAX}] (symmetric); the file is damaged or was edited: "
                "refused; save or convert the model again")


def check_trainable(model):
    """Raise a clear error when ``model`` (a backbone or a GPT-2) holds int8 weights: they cannot be trained."""
    gpt2 = getattr(model, "gpt2", model)
    if isinstance(gpt2, keras.Model) and is_quantized(gpt2):
        raise ValueError("this model holds int8 weights (precision='int8'), which are for inference only: train "
                         "the float32 model (ClipCap.load(name) without precision) and quantize after")
