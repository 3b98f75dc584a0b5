"""``ClipCap.load(..., precision="int8")``: GPT-2 with int8 weights for one-image latency.

A float32 folder loaded with ``precision="int8"`` is quantized at load (`custom_architectures.quantization`:
blocks per output channel, the tied LM head per vocabulary row; the mapper and the CLIP stay float32). An
int8 folder (saved from such a model: its config records ``"quantization": "int8"`` in GPT-2's entry and its
weights file holds the int8 values and their scales) loads as int8 with ``precision=None`` or ``"int8"``; it
cannot give float32 back (a ValueError says so). The quantized model is another model: its `ClipCap.identity`
is computed from the int8 weights, so its results are never mixed with the float model's.
"""

from custom_architectures.quantization import is_quantized, quantize_backbone

#: what `apply_precision` accepts (None: as saved)
PRECISIONS = (None, "float32", "int8")


def apply_precision(model, precision):
    """``model`` (a loaded ClipCap) at ``precision``: itself when it already is, else a new ClipCap sharing its
    tokenizer, CLIP and settings, with an int8 GPT-2. Raises ValueError for another precision, or float32
    asked of an int8 model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    quantized = is_quantized(model.gpt2)
    if precision is None or (precision == "int8") == quantized:
        return model
    if precision == "float32":
        raise ValueError("this saved model holds int8 weights (precision='int8'); its float32 weights are not in "
                         "the folder: load the float32 model it was quantized from")
    result = type(model)(quantize_backbone(model.backbone), model.tokenizer, clip=model.clip,
                         jit_compile=model.jit_compile, info=model.info)
    if model.device is not None:
        result.to(model.device)
    return result
