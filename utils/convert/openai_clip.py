"""OpenAI CLIP checkpoints (``ViT-B-32.pt``, ``RN50x4.pt`` ...) -> Keras `CLIPModel`.

OpenAI's released files are TorchScript archives holding fp16 weights; fine-tuned copies are often plain
state dicts saved with ``torch.save``. Both load here, without torch and without running the archive's code
(`utils.convert.torch_file`): the weights are cast to fp32, the packed attention
``in_proj_weight`` / ``in_proj_bias`` are split into q, k, v, and linear / conv weights are transposed to
Keras' layouts (conv: (out, in, kh, kw) -> (kh, kw, in, out), linear: (out, in) -> (in, out)). The
architecture is inferred from the weights (`clip_config_from_shapes`), and every tensor is accounted for:
only the three metadata entries OpenAI's ``build_model`` deletes (``input_resolution``, ``context_length``,
``vocab_size``) are ignored, anything else missing, unexpected or mis-shaped raises `CheckpointError`.

A ModifiedResNet's BatchNorms (inference mode: CLIP is frozen here) are folded into the convolutions before
them (`fold_batch_norm`, in float64): each BN's four tensors are consumed, and the Keras model has biased
convolutions and no BN layers (``fold_batch_norm=False`` keeps OpenAI's layout).

Example::

    model = load_openai_clip("ViT-B-32.pt")                     # CLIPModel (visual + text + logit_scale)
    visual_only = load_openai_clip("RN50x4.pt", visual_only=True)  # text weights skipped (ClipCap)
"""

import os
from collections.abc import Mapping

import numpy as np

from utils.convert.common import (
    CheckpointError,
    check_model_size,
    load_torch_state_dict,
    tensor_shape,
    tensor_shapes,
)
from utils.convert.porting import CONV, LINEAR, Split, WeightPorter, layer_norm_entries, linear_entries

# OpenAI's build_model deletes exactly these (metadata stored in the JIT archives)
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_VISION_MARKERS = ("visual.conv1.weight",)
_TEXT_MARKERS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
#: the tensors whose sizes give the architecture (`clip_config_from_shapes`), with their number of dimensions
_VIT_SIZES = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2}
_RESNET_SIZES = {"visual.layer1.0.conv1.weight": 4, "visual.attnpool.positional_embedding": 2,
                 "visual.attnpool.c_proj.weight": 2}
_TEXT_SIZES = {"token_embedding.weight": 2, "positional_embedding": 2, "ln_final.weight": 1, "text_projection": 2}


def load_openai_state_dict(path):
    """Read an OpenAI CLIP ``.pt``: a TorchScript archive or a plain state dict, without torch and without
    running anything from the file (`utils.convert.torch_file`; a TorchScript module's ``__setstate__`` is never
    called). Returns ``{key: np.ndarray}`` with the names ``torch.jit.load(path).state_dict()`` gives;
    `CheckpointError` when the file is missing, empty, truncated, neither of the two, or names a global
    beyond what a state dict needs."""
    return load_torch_state_dict(path)


def _dense(porter, dense, key):
    porter.port_all(linear_entries(dense, key))


def _layer_norm(porter, ln, key):
    porter.port_all(layer_norm_entries(ln, key))


BATCH_NORM_EPSILON = 1e-5  # nn.BatchNorm2d's default, which OpenAI's ModifiedResNet uses


def _batch_norm(porter, bn, key):
    porter.port(bn.gamma, f"{key}.weight")
    porter.port(bn.beta, f"{key}.bias")
    porter.port(bn.moving_mean, f"{key}.running_mean")
    porter.port(bn.moving_variance, f"{key}.running_var")
    # BatchNorm's training step counter: no effect at inference (not every exporter writes it)
    porter.ignore(f"{key}.num_batches_tracked")


def fold_batch_norm(kernel, gamma, beta, running_mean, running_var, epsilon=BATCH_NORM_EPSILON):
    """An inference-mode BatchNorm after a bias-free conv, folded into the conv: ``(kernel', bias')``.

    ``bn(conv(x)) = conv(x) * s + (beta - running_mean * s)`` with ``s = gamma / sqrt(running_var + eps)``
    per output channel, so ``kernel' = kernel * s`` (last axis: Keras' (kh, kw, in, out)) and
    ``bias' = beta - running_mean * s``. Computed in float64, returned as float32 (one rounding each).
    """
    kernel, gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (kernel, gamma, beta, running_mean,
                                                                           running_var))
    scale = gamma / np.sqrt(var + epsilon)  # (out,)
    return (kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)


def _conv_batch_norm(porter, conv, bn, conv_key, bn_key):
    """A bias-free torch conv ``conv_key`` then the BatchNorm ``bn_key``: into ``conv`` and ``bn`` as they
    are, or, when ``bn`` is None (a folded ResNet), folded into ``conv``'s kernel and bias. Either way the
    four BN tensors are consumed and checked (missing / mis-shaped ones are named by ``finish``)."""
    if bn is not None:
        porter.port(conv.kernel, f"{conv_key}.weight", CONV)
        _batch_norm(porter, bn, bn_key)
        return
    kernel = porter.take(f"{conv_key}.weight", CONV.checkpoint_shape(tuple(conv.kernel.shape)))
    channels = (conv.filters,)
    stats = [porter.take(f"{bn_key}.{name}", channels) for name in ("weight", "bias", "running_mean", "running_var")]
    porter.ignore(f"{bn_key}.num_batches_tracked")  # the training step counter, as in `_batch_norm`
    if kernel is None or any(s is None for s in stats):
        return  # reported by the porter's check, with every other problem
    kernel, bias = fold_batch_norm(CONV.to_keras(kernel), *stats)
    porter.port_value(conv.kernel, kernel)
    porter.port_value(conv.bias, bias)


def _resnet_conv_batch_norms(visual):
    """Every (conv layer, its BN layer or None when folded, OpenAI's conv module name, OpenAI's BN module name)
    of a `ModifiedResNet`, in OpenAI's order: the stem's three, then each Bottleneck's three and its
    downsample. The one walk both the converter and `fold_clip_batch_norms` use."""
    folded = visual.fold_batch_norm
    for i in (1, 2, 3):
        bn = None if folded else visual.get_layer(f"bn{i}")
        yield visual.get_layer(f"conv{i}"), bn, f"conv{i}", f"bn{i}"
    for stage, blocks in enumerate(visual.layer_counts, start=1):
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            block = visual.get_layer(name)
            for i in (1, 2, 3):
                yield getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), f"{name}.conv{i}", f"{name}.bn{i}"
            if block.has_downsample:
                yield block.downsample_conv, block.downsample_bn, f"{name}.downsample.0", f"{name}.downsample.1"


def fold_clip_batch_norms(model):
    """A `CLIPModel` whose ModifiedResNet has its BatchNorms folded, from one in OpenAI's layout (e.g. a CLIP
    saved before the converter folded them); the same function, faster to load. Re-saving it
    upgrades a saved CLIP: ``CLIP(fold_clip_batch_norms(old.model), old.tokenizer).save(new_folder)``.

    A ViT or an already folded ResNet is returned as it is. Every variable of the old encoder is used
    exactly once (the conv / BN ones folded, the others copied by path); the text tower is shared, not copied.
    """
    from custom_architectures.clip_arch import CLIPModel, build_visual
    from utils.weights_io import variables_to_be_loaded

    if model.is_vit or model.visual.fold_batch_norm:
        return model
    with variables_to_be_loaded():  # every variable is assigned below
        visual = build_visual(dict(model.config, fold_batch_norm=True))
    folded_ids = set()
    for (conv, bn, *_), (target, _, *_) in zip(_resnet_conv_batch_norms(model.visual),
                                               _resnet_conv_batch_norms(visual), strict=True):
        kernel, bias = fold_batch_norm(conv.kernel.numpy(), bn.gamma.numpy(), bn.beta.numpy(),
                                       bn.moving_mean.numpy(), bn.moving_variance.numpy())
        target.kernel.assign(kernel)
        target.bias.assign(bias)
        folded_ids.update(id(v) for v in (*conv.weights, *bn.weights, *target.weights))
    source = {v.path: v for v in model.visual.weights if id(v) not in folded_ids}
    rest = {v.path: v for v in visual.weights if id(v) not in folded_ids}
    if set(source) != set(rest):  # what is left is the same, by path (attention pool ...)
        raise ValueError(f"cannot fold this ModifiedResNet: variables {sorted(set(source) ^ set(rest))[:5]} "
                         "are in one layout only")
    for path, variable in rest.items():
        variable.assign(source[path])
    folded = CLIPModel(visual, model.text, name=model.name)
    folded.logit_scale.assign(model.logit_scale)
    return folded


def _packed_attention(porter, attn, key):
    """nn.MultiheadAttention: in_proj_weight (3C, C) / in_proj_bias (3C,) hold q, k, v; then out_proj."""
    for i, dense in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        porter.port(dense.kernel, f"{key}.in_proj_weight", Split(i, 3, then=LINEAR))
        porter.port(dense.bias, f"{key}.in_proj_bias", Split(i, 3))
    _dense(porter, attn.out_proj, f"{key}.out_proj")


def _residual_block(porter, block, key):
    _layer_norm(porter, block.ln_1, f"{key}.ln_1")
    _packed_attention(porter, block.attn, f"{key}.attn")
    _layer_norm(porter, block.ln_2, f"{key}.ln_2")
    _dense(porter, block.c_fc, f"{key}.mlp.c_fc")
    _dense(porter, block.c_proj, f"{key}.mlp.c_proj")


def _port_vit(porter, visual, p="visual"):
    porter.port(visual.get_layer("conv1").kernel, f"{p}.conv1.weight", CONV)
    embeddings = visual.get_layer("embeddings")
    porter.port(embeddings.class_embedding, f"{p}.class_embedding")
    porter.port(embeddings.positional_embedding, f"{p}.positional_embedding")
    _layer_norm(porter, visual.get_layer("ln_pre"), f"{p}.ln_pre")
    for i in range(visual.num_layers):
        name = f"transformer.resblocks.{i}"
        _residual_block(porter, visual.get_layer(name), f"{p}.{name}")
    _layer_norm(porter, visual.get_layer("ln_post"), f"{p}.ln_post")
    porter.port(visual.get_layer("proj").kernel, f"{p}.proj")  # used as x @ proj: already (in, out)


def _port_resnet(porter, visual, p="visual"):
    for conv, bn, conv_key, bn_key in _resnet_conv_batch_norms(visual):
        _conv_batch_norm(porter, conv, bn, f"{p}.{conv_key}", f"{p}.{bn_key}")
    pool = visual.get_layer("attnpool")
    porter.port(pool.positional_embedding, f"{p}.attnpool.positional_embedding")
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        _dense(porter, getattr(pool, proj), f"{p}.attnpool.{proj}")


def _port_text(porter, text):
    porter.port(text.get_layer("token_embedding").embeddings, "token_embedding.weight")
    porter.port(text.get_layer("positional_embedding").positional_embedding, "positional_embedding")
    for i in range(text.num_layers):
        name = f"transformer.resblocks.{i}"
        _residual_block(porter, text.get_layer(name), name)
    _layer_norm(porter, text.get_layer("ln_final"), "ln_final")
    porter.port(text.get_layer("text_projection").kernel, "text_projection")  # x @ text_projection


def clip_config_from_state_dict(state_dict: Mapping, visual_only=False, source="checkpoint") -> dict:
    """The CLIP configuration a state dict describes; `CheckpointError` when it is not an OpenAI CLIP one."""
    from custom_architectures.clip_arch import clip_config_from_shapes

    keys = set(state_dict)
    required = list(_VISION_MARKERS) + ([] if visual_only else list(_TEXT_MARKERS))
    missing = [k for k in required if k not in keys]
    if not missing and "visual.proj" not in keys and "visual.attnpool.positional_embedding" not in keys:
        missing = ["visual.proj (ViT) or visual.attnpool.* (ResNet)"]
    if missing:
        sample = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
        raise CheckpointError(
            f"{source} is not an OpenAI CLIP checkpoint: missing {', '.join(missing)} "
            f"({len(keys)} keys, e.g. {sample or 'none'})"
        )
    sizes = {**(_VIT_SIZES if "visual.proj" in keys else _RESNET_SIZES), **({} if visual_only else _TEXT_SIZES)}
    for key, ndim in sizes.items():  # present, of that rank, every size >= 1: named if not
        tensor_shape(state_dict, key, ndim, source)
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    try:
        config = clip_config_from_shapes(shapes, visual_only=visual_only)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: cannot infer the CLIP architecture from its weights: {e}") from e
    is_vit = "visual.proj" in keys
    heads = {"image": config["vision_width"] // 64 if is_vit else config["vision_width"] * 32 // 64}
    if not visual_only:
        heads["text"] = config["text_width"] // 64
    for tower, n in heads.items():  # OpenAI's rule: heads of 64
        if n < 1:
            raise CheckpointError(f"{source}: the {tower} encoder's width gives no attention head (OpenAI's CLIP "
                                  f"has heads 64 wide): {config}")
    if config["image_resolution"] < 1:
        raise CheckpointError(f"{source}: the positional embedding leaves no image patch: {config}")
    return config


def _block_parameters(width):  # a ResidualAttentionBlock: ln_1, in_proj, out_proj, ln_2, c_fc, c_proj
    return 12 * width * width + 13 * width


def clip_parameter_count(config, visual_only=False) -> int:
    """How many weights OpenAI's layout of the CLIP ``config`` describes has (BatchNorms unfolded: their four
    tensors each; ``num_batches_tracked`` not counted), by shape arithmetic, nothing built: what the file's
    tensors must hold. ``visual_only``: the image encoder and ``logit_scale``. A test keeps it equal to the
    built model's ``count_params()``."""
    embed = int(config["embed_dim"])
    width, resolution = int(config["vision_width"]), int(config["image_resolution"])
    if isinstance(config["vision_layers"], list | tuple):  # ModifiedResNet
        stem = width // 2
        count = 3 * stem * 9 + stem * stem * 9 + stem * width * 9 + 4 * (stem + stem + width)  # 3 convs, 3 BNs
        inplanes = width
        for stage, blocks in enumerate(config["vision_layers"]):
            planes = width * 2 ** stage
            for b in range(int(blocks)):
                out = 4 * planes
                count += inplanes * planes + planes * planes * 9 + planes * out + 4 * (planes + planes + out)
                if (stage > 0 and b == 0) or inplanes != out:  # stride 2, or another width: downsample
                    count += inplanes * out + 4 * out
                inplanes = out
        pool, spacial = width * 32, resolution // 32
        count += (spacial * spacial + 1) * pool + 3 * (pool * pool + pool) + pool * embed + embed
    else:  # VisionTransformer
        patch = int(config["vision_patch_size"])
        grid = resolution // patch
        count = (3 * patch * patch * width + width + (grid * grid + 1) * width + 4 * width
                 + int(config["vision_layers"]) * _block_parameters(width) + width * embed)
    count += 1  # logit_scale
    if not visual_only:
        text = int(config["text_width"])
        count += ((int(config["vocab_size"]) + int(config["context_length"])) * text
                  + int(config["text_layers"]) * _block_parameters(text) + 2 * text + text * embed)
    return count


def clip_from_state_dict(state_dict: Mapping, visual_only=False, source="checkpoint", fold_batch_norm=True):
    """Build a Keras `CLIPModel` from an OpenAI CLIP state dict (torch tensors or numpy arrays).

    With ``visual_only`` the text encoder is not built and every non-``visual.`` tensor is ignored
    (``logit_scale`` is still read). A ModifiedResNet is built with its BatchNorms folded into its
    convolutions (`fold_batch_norm`; the same function, faster to load) unless ``fold_batch_norm``
    is False (OpenAI's layout, BN layers holding the four tensors). Everything else is strict (see module
    docstring); a ViT ignores ``fold_batch_norm`` (it has no BatchNorm).
    """
    from custom_architectures.clip_arch import build_clip

    config = clip_config_from_state_dict(state_dict, visual_only=visual_only, source=source)
    held = {k: v for k, v in tensor_shapes(state_dict).items()
            if not visual_only or k.startswith("visual.") or k == "logit_scale"}
    # a few stray layer keys must not build a model larger than the file, before `finish` names what is missing
    check_model_size(clip_parameter_count(config, visual_only), held, "CLIP", source)
    if fold_batch_norm and isinstance(config["vision_layers"], list):
        config["fold_batch_norm"] = True
    model = build_clip(config)
    porter = WeightPorter(state_dict, source=source)
    porter.ignore(list(OPENAI_METADATA_KEYS))
    (_port_vit if model.is_vit else _port_resnet)(porter, model.visual)
    if visual_only:
        porter.ignore([k for k in porter.keys() if not k.startswith("visual.") and k != "logit_scale"])
    else:
        _port_text(porter, model.text)
    porter.port(model.logit_scale, "logit_scale")
    porter.finish()  # names every missing, mis-shaped and unexpected key, then assigns
    return model


def load_openai_clip(path_or_state_dict, visual_only=False, fold_batch_norm=True):
    """An OpenAI CLIP ``.pt`` file (TorchScript or state dict) or an in-memory state dict -> `CLIPModel`
    (a ResNet's BatchNorms folded unless ``fold_batch_norm`` is False; see `clip_from_state_dict`)."""
    if isinstance(path_or_state_dict, Mapping):
        return clip_from_state_dict(path_or_state_dict, visual_only=visual_only, source="state dict",
                                    fold_batch_norm=fold_batch_norm)
    state_dict = load_openai_state_dict(path_or_state_dict)
    return clip_from_state_dict(state_dict, visual_only=visual_only, source=os.fspath(path_or_state_dict),
                                fold_batch_norm=fold_batch_norm)
