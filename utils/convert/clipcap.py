"""Official ClipCap checkpoints (``coco_weights.pt``, ``conceptual_weights.pt``, ``transformer_weights.pt``)
-> Keras mapper + Keras GPT-2.

The released files are ``torch.save(model.state_dict())`` of the official ``ClipCaptionModel``: the mapper
under ``clip_project.`` and the fine-tuned GPT-2 (a ``GPT2LMHeadModel``) under ``gpt.`` (``gpt.transformer.*``,
``gpt.lm_head.weight``; transformers-4.11-era files also hold ``attn.bias`` / ``attn.masked_bias`` buffers).
Everything is inferred from keys and shapes (`clipcap_config_from_state_dict`):

- ``clip_project.model.0.*`` / ``clip_project.model.2.*``: the MLP mapper (COCO, Conceptual; K = 10);
- ``clip_project.weight`` / ``clip_project.bias``: the single Linear of older checkpoints with K > 10;
- ``clip_project.prefix_const`` + ``clip_project.linear.*`` + ``clip_project.transformer.layers.{i}.*``: the
  transformer mapper (K = L = 40, 8 layers, RN50x4 prefix size 640).

Every tensor of the file is consumed or explicitly ignored; anything missing, unexpected or mis-shaped raises
`CheckpointError` naming it. The released transformer weights expect an L2-normalised CLIP embedding, the MLP
ones the raw embedding: ``normalize_prefix`` records that policy in the config.

Example::

    mapper, gpt2, config = load_clipcap("coco_weights.pt")
    check_clip_matches(clip.embed_dim, config, clip_name="ViT-B-32.pt")
"""

import re
from collections.abc import Mapping

from utils.convert.common import CheckpointError, StateDict, load_torch_state_dict

MAPPER_PREFIX = "clip_project."
GPT_PREFIX = "gpt."
_LAYER_RE = re.compile(r"clip_project\.transformer\.layers\.(\d+)\.")
_GPT_LAYER_RE = re.compile(r"gpt\.transformer\.h\.(\d+)\.")
#: The identity entries, in the order messages list them.
IDENTITY_KEYS = ("mapping_type", "prefix_length", "prefix_size", "clip_length", "num_layers", "n_embd", "n_layer",
                 "vocab_size", "n_positions")


def _describe_keys(keys, n=6):
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else f" ({len(keys)} keys)")


def clipcap_config_from_state_dict(state_dict: Mapping) -> dict:
    """Infer the mapper's architecture from a ClipCap state dict.

    Returns ``{"mapping_type", "prefix_size", "prefix_length", "n_embd", "normalize_prefix"}`` plus
    ``clip_length``, ``num_layers``, ``num_heads``, ``mlp_ratio`` for the transformer mapper.
    Raises `CheckpointError` when the keys are not those of a ClipCap checkpoint.
    """
    keys = set(state_dict.keys())
    mapper_keys = {k for k in keys if k.startswith(MAPPER_PREFIX)}
    gpt_keys = {k for k in keys if k.startswith(GPT_PREFIX)}
    if not mapper_keys or not gpt_keys:
        lacking = " and ".join(p + "*" for p, ks in ((MAPPER_PREFIX, mapper_keys), (GPT_PREFIX, gpt_keys)) if not ks)
        raise CheckpointError(
            f"this is not a ClipCap checkpoint: it has no {lacking} keys; found keys like {_describe_keys(keys)}"
        )
    wte_key = "gpt.transformer.wte.weight"
    if wte_key not in keys:
        raise CheckpointError(f"ClipCap checkpoint lacks {wte_key} (GPT-2 token embeddings); found GPT keys "
                              f"like {_describe_keys(gpt_keys)}")
    n_embd = int(state_dict[wte_key].shape[1])

    def shape(key):
        return tuple(int(s) for s in state_dict[key].shape)

    def prefix_length_from(out_features, key):
        if out_features % n_embd:
            raise CheckpointError(f"{key} has {out_features} outputs, not a multiple of GPT-2's width {n_embd}")
        return out_features // n_embd

    if "clip_project.prefix_const" in keys:
        layer_ids = sorted({int(m.group(1)) for k in mapper_keys if (m := _LAYER_RE.match(k))})
        if layer_ids != list(range(len(layer_ids))) or not layer_ids:
            raise CheckpointError(f"transformer mapper layers are not numbered 0..N-1: found {layer_ids}")
        for key in ("clip_project.linear.weight", "clip_project.transformer.layers.0.mlp.fc1.weight"):
            if key not in keys:
                raise CheckpointError(f"transformer ClipCap checkpoint lacks {key}")
        prefix_length, const_width = shape("clip_project.prefix_const")
        if const_width != n_embd:
            raise CheckpointError(f"clip_project.prefix_const is {(prefix_length, const_width)}, but GPT-2's "
                                  f"width is {n_embd}")
        linear_out, prefix_size = shape("clip_project.linear.weight")
        hidden = shape("clip_project.transformer.layers.0.mlp.fc1.weight")[0]
        return {
            "mapping_type": "transformer", "prefix_size": prefix_size, "prefix_length": prefix_length,
            "clip_length": prefix_length_from(linear_out, "clip_project.linear.weight"),
            "num_layers": len(layer_ids), "num_heads": 8, "mlp_ratio": hidden / n_embd, "n_embd": n_embd,
            "normalize_prefix": True,
        }
    if "clip_project.model.0.weight" in keys:
        if "clip_project.model.2.weight" not in keys:
            raise CheckpointError("MLP ClipCap checkpoint has clip_project.model.0.weight but lacks "
                                  "clip_project.model.2.weight")
        _, prefix_size = shape("clip_project.model.0.weight")
        out = shape("clip_project.model.2.weight")[0]
        return {"mapping_type": "mlp", "prefix_size": prefix_size,
                "prefix_length": prefix_length_from(out, "clip_project.model.2.weight"), "n_embd": n_embd,
                "normalize_prefix": False}
    if "clip_project.weight" in keys:
        out, prefix_size = shape("clip_project.weight")
        return {"mapping_type": "linear", "prefix_size": prefix_size,
                "prefix_length": prefix_length_from(out, "clip_project.weight"), "n_embd": n_embd,
                "normalize_prefix": False}
    raise CheckpointError(f"unrecognised ClipCap mapper: found mapper keys like {_describe_keys(mapper_keys)}")


def clipcap_identity(state_dict: Mapping) -> dict:
    """What a ClipCap checkpoint is, from its keys and shapes: the mapper (``mapping_type``,
    ``prefix_length`` K, ``prefix_size`` = CLIP's embedding size, and for a transformer ``clip_length`` and
    ``num_layers``) and its GPT-2 (``n_embd``, ``n_layer``, ``vocab_size``, ``n_positions``).

    Example: the official ``coco_weights.pt`` gives ``{"mapping_type": "mlp", "prefix_length": 10,
    "prefix_size": 512, "n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}``.
    """
    config = clipcap_config_from_state_dict(state_dict)
    identity = {k: config[k] for k in IDENTITY_KEYS if k in config}
    identity["n_layer"] = len({int(m.group(1)) for k in state_dict if (m := _GPT_LAYER_RE.match(k))})
    identity["vocab_size"] = int(state_dict["gpt.transformer.wte.weight"].shape[0])
    if "gpt.transformer.wpe.weight" in state_dict:
        identity["n_positions"] = int(state_dict["gpt.transformer.wpe.weight"].shape[0])
    return identity


def check_clipcap_checkpoint(path, expect=None, name="this model"):
    """Raise `CheckpointError` unless ``path`` is a readable ClipCap checkpoint whose `clipcap_identity`
    holds every entry of ``expect`` (the message names each expected and found value); returns the identity.

    Only shapes are read (the file is memory-mapped), so checking a 600 MB checkpoint is cheap.
    """
    state_dict = load_torch_state_dict(path, mmap=True)
    try:
        identity = clipcap_identity(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    finally:
        del state_dict
    wrong = [k for k in expect or {} if identity.get(k) != expect[k]]
    if wrong:
        found = ", ".join(f"{k}={identity[k]!r}" for k in IDENTITY_KEYS if k in identity)
        raise CheckpointError(
            f"{path} is not the checkpoint of {name!r}: expected "
            + ", ".join(f"{k}={expect[k]!r}" for k in wrong) + "; found "
            + ", ".join(f"{k}={identity.get(k)!r}" for k in wrong) + f" (the file is a ClipCap with {found})")
    return identity


def _linear(sd, key, in_dim, out_dim, bias=True):
    """torch Linear ``key`` (out, in) -> Keras Dense weights [kernel (in, out), bias]."""
    w = sd.take(f"{key}.weight", (out_dim, in_dim))
    values = [None if w is None else w.T]
    if bias:
        values.append(sd.take(f"{key}.bias", (out_dim,)))
    return values


def _layer_norm(sd, key, dim):
    return [sd.take(f"{key}.weight", (dim,)), sd.take(f"{key}.bias", (dim,))]


def mapper_from_state_dict(sd: StateDict, config: dict):
    """Build the Keras mapper described by `config` and load it from ``clip_project.*`` of `sd`."""
    from custom_architectures.transformers_arch.clip_cap_arch import build_mapper

    kind = config["mapping_type"]
    d, k, c = config["prefix_size"], config["prefix_length"], config["n_embd"]
    assignments = []  # (keras layer or variable, values)
    arch = {key: value for key, value in config.items() if key not in ("mapping_type", "normalize_prefix", "gpt2")}
    if kind == "transformer":
        mapper = build_mapper(kind, **arch)
        hidden = int(c * config["mlp_ratio"])
        assignments.append((mapper.prefix_const, sd.take("clip_project.prefix_const", (k, c))))
        assignments.append((mapper.linear, _linear(sd, "clip_project.linear", d, config["clip_length"] * c)))
        for i, layer in enumerate(mapper.transformer_layers):
            p = f"clip_project.transformer.layers.{i}"
            assignments += [
                (layer.norm1, _layer_norm(sd, f"{p}.norm1", c)),
                (layer.attn.to_queries, _linear(sd, f"{p}.attn.to_queries", c, c, bias=False)),
                (layer.attn.to_keys_values, _linear(sd, f"{p}.attn.to_keys_values", c, 2 * c, bias=False)),
                (layer.attn.project, _linear(sd, f"{p}.attn.project", c, c)),
                (layer.norm2, _layer_norm(sd, f"{p}.norm2", c)),
                (layer.mlp.fc1, _linear(sd, f"{p}.mlp.fc1", c, hidden)),
                (layer.mlp.fc2, _linear(sd, f"{p}.mlp.fc2", hidden, c)),
            ]
    elif kind == "mlp":
        mapper = build_mapper(kind, **arch)
        assignments.append((mapper.model_0, _linear(sd, "clip_project.model.0", d, k * c // 2)))
        assignments.append((mapper.model_2, _linear(sd, "clip_project.model.2", k * c // 2, k * c)))
    elif kind == "linear":
        mapper = build_mapper(kind, **arch)
        assignments.append((mapper.linear, _linear(sd, "clip_project", d, k * c)))
    else:
        raise CheckpointError(f"unknown mapping_type {kind!r}")
    sd.check()  # nothing is assigned from a checkpoint with missing or mis-shaped keys
    for target, values in assignments:
        if isinstance(values, list):
            target.set_weights(values)
        else:
            target.assign(values)
    return mapper


def load_clipcap(path_or_state_dict, source=None, **gpt2_overrides):
    """Read an official ClipCap checkpoint -> (mapper, gpt2, config).

    `path_or_state_dict`: a ``.pt`` path (loaded with ``weights_only=True``) or an in-memory state dict.
    ``config`` holds the mapper's architecture (see `clipcap_config_from_state_dict`) and ``"gpt2"``, the
    GPT-2 config. ``gpt2_overrides`` go to `gpt2_from_state_dict` (e.g. ``n_head``, which shapes cannot
    tell; by default ``n_embd // 64``, right for every released GPT-2). Raises `CheckpointError` for unreadable files, non-ClipCap state dicts and any missing,
    unexpected or mis-shaped key.
    """
    from utils.convert.hf_gpt2 import gpt2_from_state_dict

    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = dict(path_or_state_dict), source or "ClipCap state dict"
    else:
        source = source or str(path_or_state_dict)
        state_dict = load_torch_state_dict(path_or_state_dict)
    try:
        config = clipcap_config_from_state_dict(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    sd = StateDict(state_dict, source=source)
    mapper = mapper_from_state_dict(sd, config)
    gpt_state = {k: v for k, v in state_dict.items() if k.startswith(GPT_PREFIX)}
    gpt2, used = gpt2_from_state_dict(gpt_state, prefix=GPT_PREFIX, source=source, **gpt2_overrides)
    sd.ignore(used)
    sd.finish()
    config["gpt2"] = gpt2_arch_config(gpt2)
    return mapper, gpt2, config


def gpt2_arch_config(gpt2):
    """GPT-2's constructor kwargs, without Keras' name/trainable/dtype entries."""
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")
    config = gpt2.get_config()
    return {k: config[k] for k in keys if k in config}


def check_clip_matches(clip_embed_dim, config, clip_name="the CLIP model", checkpoint_name="the ClipCap mapper"):
    """Raise `CheckpointError` when a CLIP's embedding size differs from the mapper's prefix size."""
    if int(clip_embed_dim) != int(config["prefix_size"]):
        hint = {512: "ViT-B/32 (coco / conceptual weights)", 640: "RN50x4 (transformer weights)"}.get(
            int(config["prefix_size"]), "")
        raise CheckpointError(
            f"{clip_name} produces {clip_embed_dim}-d image embeddings but {checkpoint_name} "
            f"({config['mapping_type']} mapper) expects prefix_size={config['prefix_size']}"
            + (f": use CLIP {hint}" if hint else "")
        )
