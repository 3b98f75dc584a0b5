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

Every tensor of the file is consumed or explicitly ignored (`utils.convert.porting.WeightPorter`); anything
missing, unexpected or mis-shaped raises `CheckpointError` naming it. The released transformer weights expect
an L2-normalised CLIP embedding, the MLP ones the raw embedding: ``normalize_prefix`` records that policy in
the config.

Each mapper type's key map is written once, in `MAPPER_FORMATS` (Keras variable <-> checkpoint key + hook);
the import here and the export (`utils.convert.clipcap_export`) both read it, as they share GPT-2's
`utils.convert.hf_gpt2.gpt2_weight_map`. A mapper type with an official checkpoint format has, beside its class
and its `mapper_registry.MAPPERS` entry, its `MapperFormat` entry here and its detection in
`clipcap_config_from_state_dict`; the mapper's arguments are its class's (`mapper_registry.mapper_arguments`).

Example::

    mapper, gpt2, config = load_clipcap("coco_weights.pt")
    check_clip_matches(clip.embed_dim, config, clip_name="ViT-B-32.pt")
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from utils.convert.common import CheckpointError, check_model_size, load_torch_state_dict, tensor_shape
from utils.convert.porting import IDENTITY, WeightPorter, layer_norm_entries, linear_entries

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
    n_embd = tensor_shape(state_dict, wte_key, 2)[1]

    def shape(key, ndim=2):  # present, of ndim dimensions, each >= 1 (else CheckpointError naming it)
        return tensor_shape(state_dict, key, ndim)

    def prefix_length_from(out_features, key):
        if out_features % n_embd:
            raise CheckpointError(f"{key} has {out_features} outputs, not a multiple of GPT-2's width {n_embd}")
        return out_features // n_embd

    if "clip_project.prefix_const" in keys:
        layer_ids = sorted({int(m.group(1)) for k in mapper_keys if (m := _LAYER_RE.match(k))})
        if layer_ids != list(range(len(layer_ids))) or not layer_ids:
            raise CheckpointError(f"transformer mapper layers are not numbered 0..N-1: found {layer_ids}")
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
    identity["vocab_size"] = tensor_shape(state_dict, "gpt.transformer.wte.weight", 2)[0]
    if "gpt.transformer.wpe.weight" in state_dict:
        identity["n_positions"] = tensor_shape(state_dict, "gpt.transformer.wpe.weight", 2)[0]
    return identity


def check_clipcap_checkpoint(path, expect=None, name="this model"):
    """Raise `CheckpointError` unless ``path`` is a readable ClipCap checkpoint whose `clipcap_identity`
    holds every entry of ``expect`` (the message names each expected and found value); returns the identity.

    Only shapes are read (the tensors' bytes are not), so checking a 600 MB checkpoint is cheap.
    """
    state_dict = load_torch_state_dict(path, shapes_only=True)
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


# --------------------------------------------------------------------- the mapper types' weight tables
# One table per mapper type: (Keras variable, checkpoint key, hook) in the official module order. The import
# (`mapper_from_state_dict`) ports it and the export (`utils.convert.clipcap_export`) writes it back.


def _mlp_weights(mapper):
    return linear_entries(mapper.model_0, "clip_project.model.0") + linear_entries(mapper.model_2,
                                                                                   "clip_project.model.2")


def _single_linear_weights(mapper):
    return linear_entries(mapper.linear, "clip_project")


def _transformer_weights(mapper):
    entries = [(mapper.prefix_const, "clip_project.prefix_const", IDENTITY)]  # its own parameter: first
    for i, layer in enumerate(mapper.transformer_layers):
        p = f"clip_project.transformer.layers.{i}"
        entries += layer_norm_entries(layer.norm1, f"{p}.norm1")
        for name in ("to_queries", "to_keys_values", "project"):
            entries += linear_entries(getattr(layer.attn, name), f"{p}.attn.{name}")
        entries += layer_norm_entries(layer.norm2, f"{p}.norm2")
        for name in ("fc1", "fc2"):
            entries += linear_entries(getattr(layer.mlp, name), f"{p}.mlp.{name}")
    return entries + linear_entries(mapper.linear, "clip_project.linear")


def _linear_size(n_in, n_out):  # a Linear's weight and bias
    return n_in * n_out + n_out


def _mlp_parameters(config):
    out = config["prefix_length"] * config["n_embd"]
    return _linear_size(config["prefix_size"], out // 2) + _linear_size(out // 2, out)


def _single_linear_parameters(config):
    return _linear_size(config["prefix_size"], config["prefix_length"] * config["n_embd"])


def _transformer_parameters(config):
    c = config["n_embd"]
    hidden = int(c * config["mlp_ratio"])
    # norm1, norm2; to_queries, to_keys_values (no bias), project; fc1, fc2
    layer = 4 * c + c * c + 2 * c * c + _linear_size(c, c) + _linear_size(c, hidden) + _linear_size(hidden, c)
    return (config["prefix_length"] * c + config["num_layers"] * layer
            + _linear_size(config["prefix_size"], config["clip_length"] * c))


def _official_transformer_only(config):
    num_heads = int(config.get("num_heads", 8))
    if num_heads != 8:  # the official TransformerMapper hard-codes Transformer(dim, 8, num_layers)
        raise ValueError(f"the official transformer mapper has 8 attention heads; this one has {num_heads} "
                         "and cannot be exported to the official format")
    if float(config.get("mlp_ratio", 2.0)) != 2.0:  # ... and Transformer's default mlp_ratio=2.0
        raise ValueError(f"the official transformer mapper has mlp_ratio 2; this one has {config['mlp_ratio']}")


@dataclass(frozen=True)
class MapperFormat:
    """How one mapper type is stored in an official checkpoint (its architecture is the mapper class's:
    `mapper_registry.mapper_arguments`).

    weights: mapper -> its weight table, ``[(variable, "clip_project...." key, hook)]``, in the official order.
    parameters: config -> how many weights the mapper it describes has (shape arithmetic, nothing built):
        `mapper_from_state_dict` refuses a config larger than the file's tensors before building it (a test
        keeps it equal to the built mapper's ``count_params()``).
    official_arguments: the config entries the official ``ClipCaptionModel`` constructor needs for this type
        beyond ``prefix_length``, ``prefix_size`` and ``mapping_type`` (written in the export's description).
    check_exportable: config -> None; raises `ValueError` when the official code cannot represent the mapper.
    """

    weights: Callable
    parameters: Callable
    official_arguments: tuple = ()
    check_exportable: Callable = lambda config: None


#: mapping_type -> `MapperFormat`, for the mapper types that have an official checkpoint format. A new such
#: type: its `mapper_registry.MAPPERS` entry, its entry here and its detection in
#: `clipcap_config_from_state_dict`; import and export then follow.
MAPPER_FORMATS = {
    "mlp": MapperFormat(_mlp_weights, _mlp_parameters),
    "linear": MapperFormat(_single_linear_weights, _single_linear_parameters),
    "transformer": MapperFormat(_transformer_weights, _transformer_parameters, ("clip_length", "num_layers"),
                                _official_transformer_only),
}


def mapper_format(mapping_type) -> MapperFormat:
    """The `MapperFormat` of ``mapping_type``; `CheckpointError` for an unknown one."""
    if mapping_type not in MAPPER_FORMATS:
        raise CheckpointError(f"unknown mapping_type {mapping_type!r}: expected one of "
                              f"{', '.join(MAPPER_FORMATS)}")
    return MAPPER_FORMATS[mapping_type]


def mapper_from_state_dict(porter: WeightPorter, config: dict):
    """Build the Keras mapper described by `config` and load it from ``clip_project.*`` of `porter`.

    Raises `CheckpointError` (nothing assigned) when a mapper key is missing or mis-shaped, and before
    anything is built when the mapper the config describes has more weights than the file's ``clip_project.*``
    tensors hold (`check_model_size`: a few stray layer keys cannot build a huge mapper); the keys left over
    are for the caller's `WeightPorter.finish`.
    """
    from custom_architectures.transformers_arch.clip_cap_arch import build_mapper
    from custom_architectures.transformers_arch.mapper_registry import mapper_arguments

    kind = config["mapping_type"]
    fmt = mapper_format(kind)
    check_model_size(fmt.parameters(config), porter.shapes(MAPPER_PREFIX), f"{kind} mapper", porter.source)
    mapper = build_mapper(kind, **{k: config[k] for k in mapper_arguments(kind) if k in config})
    porter.port_all(fmt.weights(mapper))
    porter.assign()  # nothing is assigned from a checkpoint with missing or mis-shaped keys
    return mapper


def load_clipcap(path_or_state_dict, source=None, **gpt2_overrides):
    """Read an official ClipCap checkpoint -> (mapper, gpt2, config).

    `path_or_state_dict`: a ``.pt`` path (read without torch, nothing in it run: `load_torch_state_dict`) or an
    in-memory state dict.
    ``config`` holds the mapper's architecture (see `clipcap_config_from_state_dict`) and ``"gpt2"``, the
    GPT-2 config. ``gpt2_overrides`` go to `gpt2_from_state_dict` (e.g. ``n_head``, which shapes cannot
    tell; by default ``n_embd // 64``: the official code builds its GPT-2 from ``gpt2``, 64-wide heads). Raises `CheckpointError` for unreadable files, non-ClipCap state dicts and any missing,
    unexpected or mis-shaped key.
    """
    from utils.convert.hf_gpt2 import checked_gpt2_config, gpt2_from_state_dict

    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = dict(path_or_state_dict), source or "ClipCap state dict"
    else:
        source = source or str(path_or_state_dict)
        state_dict = load_torch_state_dict(path_or_state_dict)
    try:
        config = clipcap_config_from_state_dict(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    gpt_state = {k: v for k, v in state_dict.items() if k.startswith(GPT_PREFIX)}
    # no config in the file: heads 64 wide, as every GPT-2 the official code builds (`hf_gpt2.KNOWN_HEADS`)
    gpt2_arguments = dict(prefix=GPT_PREFIX, source=source, head_width=64, **gpt2_overrides)
    checked_gpt2_config(gpt_state, **gpt2_arguments)  # every GPT-2 tensor there, shaped, before a build
    porter = WeightPorter(state_dict, source=source)
    mapper = mapper_from_state_dict(porter, config)  # checks the mapper's size before building it
    gpt2, used = gpt2_from_state_dict(gpt_state, **gpt2_arguments)
    porter.ignore(used)  # accounted for by GPT-2's own porter
    porter.finish()
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
