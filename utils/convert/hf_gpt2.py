"""Load GPT-2 weights from Hugging Face or ClipCap checkpoints into the Keras `GPT2`.

Accepted layouts (``P`` is the caller's prefix, e.g. ``""`` for HF, ``"gpt."`` for ClipCap):

- ``P + "transformer.wte.weight"`` ... (``GPT2LMHeadModel.state_dict()``, ClipCap's ``gpt.``), optionally
  with ``P + "lm_head.weight"``;
- ``P + "wte.weight"`` ... (``GPT2Model`` layout, as in the hub's ``gpt2/model.safetensors``).

HF's Conv1D stores weights ``(in, out)``; the model's projections (`custom_layers.linear.Linear`) keep them
``(out, in)``, as torch's ``nn.Linear`` does (faster decoding matmuls): they are transposed once, here
(`CONV1D`), and back by the official-format export.
``lm_head.weight`` is tied to ``wte`` in GPT-2: when present it is checked to be equal to ``wte.weight``
(an untied head cannot be represented and raises) and then counted as consumed. Checkpoints saved with
transformers <= 4.x also hold per-block ``attn.bias`` (causal mask) and ``attn.masked_bias`` buffers; they
are ignored. fp16/bf16 weights become fp32. Every other key under the prefix must be consumed: missing,
unexpected or mis-shaped keys raise `CheckpointError` naming them.

``n_head`` cannot be inferred from shapes: it comes from ``config.json`` (or the caller's ``n_head``); without
either, only the released sizes are known (`KNOWN_HEADS`: GPT-2 124M / 355M / 774M / 1.5B and distilgpt2), and
any other size is a `CheckpointError` naming what is missing, never a guess (a 6-layer 96-wide model may have
2, 3, 4, 6... heads: each gives other logits). An official ClipCap checkpoint stores no GPT-2 config either:
its reader (`utils.convert.clipcap`) passes ``head_width=64``, the width of every released GPT-2's heads, as
the official code only ever builds its GPT-2 from ``gpt2`` (124M: 12 heads of 64).

Example::

    gpt2 = load_gpt2("path/to/hf_gpt2_dir")                       # config.json + model.safetensors
    gpt2, used = gpt2_from_state_dict(clipcap_sd, prefix="gpt.")  # ClipCap checkpoint, GPT-2 part
"""

import os
import re
from collections.abc import Mapping

import numpy as np

from utils.convert.common import CheckpointError, load_torch_state_dict, tensor_shape
from utils.convert.porting import IDENTITY, Transpose, WeightPorter, check_keys, layer_norm_entries
from utils.file_utils import read_json

#: n_head of the released GPT-2-family sizes, by (n_embd, n_layer): shapes tell these apart, not their heads
KNOWN_HEADS = {(768, 12): 12, (1024, 24): 16, (1280, 36): 20, (1600, 48): 25, (768, 6): 12}
#: HF's Conv1D weight (in, out) <-> a block's `custom_layers.linear.Linear` kernel (out, in)
CONV1D = Transpose((1, 0))
_BLOCK_KEY = re.compile(r"h\.(\d+)\.")
_LEGACY_BUFFERS = r"h\.\d+\.attn\.(masked_)?bias"
# config.json fields whose non-default values change the computation in ways this model does not implement
_UNSUPPORTED = {
    "activation_function": "gelu_new",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def _inner_prefix(state_dict, prefix):
    """The prefix under which ``wte.weight`` lives: ``prefix + "transformer."`` or ``prefix``."""
    for inner in (prefix + "transformer.", prefix):
        if inner + "wte.weight" in state_dict:
            return inner
    raise CheckpointError(
        f"no GPT-2 token embedding found: expected '{prefix}transformer.wte.weight' or '{prefix}wte.weight' "
        f"(keys start with: {', '.join(sorted(state_dict)[:5])}{', ...' if len(state_dict) > 5 else ''})"
    )


def gpt2_config_from_state_dict(state_dict, prefix="", head_width=None):
    """Infer ``vocab_size, n_positions, n_embd, n_layer`` from shapes, and ``n_head`` where it is known.

    ``wte`` / ``wpe`` must be 2-D with positive sizes, and the blocks ``h.{i}.`` numbered exactly
    ``0 .. n_layer - 1`` (one stray ``h.2000.`` key would otherwise ask for 2001 blocks): `CheckpointError`
    naming what is wrong. ``n_head``: that of a released size (`KNOWN_HEADS`); else ``n_embd // head_width``
    when ``head_width`` is given and divides ``n_embd``; else None (the caller must supply it: shapes cannot
    tell it).

    Example::

        config = gpt2_config_from_state_dict(load_torch_state_dict("coco_weights.pt"), prefix="gpt.")
    """
    inner = _inner_prefix(state_dict, prefix)
    vocab_size, n_embd = tensor_shape(state_dict, inner + "wte.weight", 2)
    n_positions, _ = tensor_shape(state_dict, inner + "wpe.weight", 2)
    blocks = set()
    for key in state_dict:
        if key.startswith(inner):
            match = _BLOCK_KEY.match(key[len(inner):])
            if match:
                blocks.add(int(match.group(1)))
    if not blocks:
        raise CheckpointError(f"no transformer blocks found under '{inner}h.'")
    n_layer = len(blocks)
    if sorted(blocks) != list(range(n_layer)):
        stray = sorted(blocks - set(range(n_layer)))
        raise CheckpointError(
            f"the GPT-2 blocks under '{inner}h.' are not numbered 0..N-1: {n_layer} block indices found, "
            f"among them {', '.join(map(str, stray[:5]))}{' ...' if len(stray) > 5 else ''}")
    n_head = KNOWN_HEADS.get((n_embd, n_layer))
    if n_head is None and head_width and n_embd % head_width == 0:
        n_head = n_embd // head_width
    return dict(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def gpt2_checkpoint_shapes(config, inner="transformer."):
    """``{checkpoint key: shape}`` of every tensor a GPT-2 of ``config`` (``vocab_size``, ``n_positions``,
    ``n_embd``, ``n_layer``) reads, in the checkpoint's own layout (HF Conv1D weights (in, out)), in
    `gpt2_weight_map`'s order. Shape arithmetic only, nothing built: `gpt2_from_state_dict` checks a file
    against it before it builds the model (a test keeps it equal to `gpt2_weight_map` of a built model)."""
    vocab, positions, c, n_layer = (int(config[k]) for k in ("vocab_size", "n_positions", "n_embd", "n_layer"))
    shapes = {f"{inner}wte.weight": (vocab, c), f"{inner}wpe.weight": (positions, c)}

    def norm(key):
        shapes.update({f"{key}.weight": (c,), f"{key}.bias": (c,)})

    def conv1d(key, n_in, n_out):
        shapes.update({f"{key}.weight": (n_in, n_out), f"{key}.bias": (n_out,)})

    for i in range(n_layer):
        h = f"{inner}h.{i}."
        norm(h + "ln_1")
        conv1d(h + "attn.c_attn", c, 3 * c)
        conv1d(h + "attn.c_proj", c, c)
        norm(h + "ln_2")
        conv1d(h + "mlp.c_fc", c, 4 * c)
        conv1d(h + "mlp.c_proj", 4 * c, c)
    norm(f"{inner}ln_f")
    return shapes


def gpt2_config_from_hf_config(hf_config: Mapping):
    """GPT2 kwargs from an HF ``config.json`` dict; raises on features this model does not implement."""
    for key, expected in _UNSUPPORTED.items():
        if key in hf_config and hf_config[key] != expected:
            raise CheckpointError(f"config.json: {key}={hf_config[key]!r} is not supported (needs {expected!r})")
    n_inner = hf_config.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf_config.get("n_embd", 768):
        raise CheckpointError(f"config.json: n_inner={n_inner} is not supported (needs 4 * n_embd)")
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
            "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range")
    return {k: hf_config[k] for k in keys if k in hf_config}


def gpt2_weight_map(gpt2, inner="transformer."):
    """GPT-2's weight table: ``(keras variable, checkpoint key, hook)`` in ``GPT2Model.state_dict()`` order.

    ``inner`` is the prefix of ``wte.weight`` (``"transformer."`` for ``GPT2LMHeadModel``, ``""`` for
    ``GPT2Model``, ``"gpt.transformer."`` in ClipCap files). HF's Conv1D weights are (in, out), the blocks'
    `Linear` kernels (out, in): `CONV1D` transposes; every other hook is the identity. `gpt2_from_state_dict`
    ports it; the official-format export (`utils.convert.clipcap_export`) writes it back.
    """
    def conv1d(layer, key):  # HF Conv1D: weight (in, out) = the Linear kernel (out, in) transposed, bias
        return [(layer.kernel, f"{key}.weight", CONV1D), (layer.bias, f"{key}.bias", IDENTITY)]

    entries = [(gpt2.wte.embeddings, f"{inner}wte.weight", IDENTITY),
               (gpt2.wpe.embeddings, f"{inner}wpe.weight", IDENTITY)]
    for i, block in enumerate(gpt2.h):
        h = f"{inner}h.{i}."
        entries += layer_norm_entries(block.ln_1, h + "ln_1")
        entries += conv1d(block.attn.c_attn, h + "attn.c_attn") + conv1d(block.attn.c_proj, h + "attn.c_proj")
        entries += layer_norm_entries(block.ln_2, h + "ln_2")
        entries += conv1d(block.mlp.c_fc, h + "mlp.c_fc") + conv1d(block.mlp.c_proj, h + "mlp.c_proj")
    entries += layer_norm_entries(gpt2.ln_f, f"{inner}ln_f")
    return entries


def checked_gpt2_config(state_dict, prefix="", source="checkpoint", head_width=None, **config_overrides):
    """The GPT-2 config of the keys under ``prefix`` (`gpt2_config_from_state_dict`, then
    ``config_overrides``), once every tensor it implies is present with its shape (`gpt2_checkpoint_shapes`;
    ``lm_head.weight`` and the legacy buffers may be there too) and ``n_head`` is known: `CheckpointError`
    naming every missing, mis-shaped and unexpected key otherwise. Shape arithmetic only, nothing built, so a
    caller (`utils.convert.clipcap.load_clipcap`) may check before it builds anything. Returns
    ``(config, {key: value} under prefix)``."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (mapping), got {type(state_dict).__name__}")
    own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{source}: no keys start with '{prefix}'")
    try:
        config = gpt2_config_from_state_dict(own, prefix, head_width=head_width)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    config.update(config_overrides)
    if config["n_head"] is None:
        raise CheckpointError(
            f"{source}: the number of attention heads (n_head) is missing: it cannot be inferred from the "
            f"weights' shapes (n_embd={config['n_embd']}, n_layer={config['n_layer']} is not a released GPT-2 "
            "size); give the checkpoint's config.json (a Hugging Face folder holds it beside the weights) or "
            "pass n_head")
    inner = _inner_prefix(own, prefix)
    head_key = prefix + "lm_head.weight"
    legacy = re.compile(re.escape(inner) + _LEGACY_BUFFERS)
    # every tensor the config implies, present and of its shape, before anything is built: a few stray keys
    # cannot make a model larger than the file
    check_keys(gpt2_checkpoint_shapes(config, inner),
               {k: tuple(getattr(v, "shape", ())) for k, v in own.items() if k != head_key and not legacy.fullmatch(k)},
               source)
    return config, own


def gpt2_from_state_dict(state_dict, prefix="", source="checkpoint", head_width=None, **config_overrides):
    """Build a `GPT2` and load the weights found under `prefix`.

    Args:
        state_dict: mapping of names to torch tensors or numpy arrays (may hold other keys outside `prefix`).
        prefix: e.g. ``"gpt."`` for ClipCap checkpoints, ``""`` for HF ones.
        source: named in error messages.
        head_width: for a checkpoint known to use heads of that width (ClipCap's: 64), ``n_head = n_embd //
            head_width`` when no override or released size gives it.
        **config_overrides: GPT2 kwargs overriding the inferred ones (e.g. ``n_head`` from config.json).

    Returns:
        (model, used_keys): the model, and the set of keys consumed or deliberately ignored (so a caller
        holding a larger checkpoint can account for them). Unknown keys under `prefix` raise.
    """
    from custom_architectures.transformers_arch.gpt2_arch import GPT2

    config, own = checked_gpt2_config(state_dict, prefix, source, head_width, **config_overrides)
    inner = _inner_prefix(own, prefix)
    head_key = prefix + "lm_head.weight"
    legacy = re.compile(re.escape(inner) + _LEGACY_BUFFERS)
    model = GPT2(**config)
    porter = WeightPorter(own, source=source)
    porter.port_all(gpt2_weight_map(model, inner))
    porter.ignore_matching(legacy.pattern)
    if head_key in porter:
        wte_shape = tuple(model.wte.embeddings.shape)
        head, wte = porter.take(head_key, wte_shape), porter.take(inner + "wte.weight", wte_shape)
        if head is not None and wte is not None and not np.array_equal(head, wte):
            raise CheckpointError(
                f"{source}: {head_key} differs from {inner}wte.weight; this GPT2 ties its LM head to wte "
                f"and cannot represent an untied head"
            )
    porter.finish()  # names every missing, mis-shaped and unexpected key under the prefix, then assigns
    return model, set(own)


def _read_weights_file(path):
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)  # numpy arrays; WeightPorter.take casts each one to float32
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}") from e
    return load_torch_state_dict(path)


def load_gpt2(path_or_state_dict, **config_overrides):
    """A `GPT2` from an HF GPT-2 directory, a weights file, or an in-memory state dict; strict.

    A directory must hold ``model.safetensors`` or ``pytorch_model.bin`` (``config.json`` is read when
    present, for ``n_head``, ``layer_norm_epsilon`` and dropout rates, and checked for unsupported options;
    without it, a size that is not a released one needs ``n_head=``: `CheckpointError` naming config.json).
    Sharded checkpoints are not supported. Every tensor must be accounted for.

    Example::

        gpt2 = load_gpt2("pretrained_models/gpt2")
        gpt2 = load_gpt2(GPT2LMHeadModel(config).state_dict())
    """
    hf_config = {}
    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = path_or_state_dict, "state dict"
    else:
        path = os.fspath(path_or_state_dict)
        source = path
        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
            if os.path.exists(config_path):
                try:
                    hf_config = read_json(config_path, 1 << 20)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"cannot read {config_path}: {e}") from e
            candidates = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
            found = [c for c in candidates if os.path.exists(c)]
            if not found:
                raise CheckpointError(
                    f"{path} holds neither model.safetensors nor pytorch_model.bin "
                    f"(sharded checkpoints are not supported)"
                )
            weights_path = found[0]
        elif os.path.exists(path):
            weights_path = path
        else:
            raise CheckpointError(f"GPT-2 checkpoint not found: {path} (expected an HF directory or file)")
        state_dict = _read_weights_file(weights_path)
        source = weights_path
    config = gpt2_config_from_hf_config(hf_config)
    config.update(config_overrides)
    if "n_head" not in config and not hf_config and not isinstance(path_or_state_dict, Mapping):
        source = f"{source} (no config.json beside it)"  # what is missing, named in the n_head error
    model, _ = gpt2_from_state_dict(state_dict, prefix="", source=source, **config)  # prefix "": all keys
    return model
