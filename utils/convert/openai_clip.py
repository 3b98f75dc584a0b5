"""OpenAI CLIP checkpoints (``ViT-B-32.pt``, ``RN50x4.pt`` ...) -> Keras `CLIPModel`.

OpenAI's released files are TorchScript archives holding fp16 weights; fine-tuned copies are often plain
state dicts saved with ``torch.save``. Both load here: the weights are cast to fp32, the packed attention
``in_proj_weight`` / ``in_proj_bias`` are split into q, k, v, and linear / conv weights are transposed to
Keras' layouts (conv: (out, in, kh, kw) -> (kh, kw, in, out), linear: (out, in) -> (in, out)). The
architecture is inferred from the weights (`clip_config_from_shapes`), and every tensor is accounted for:
only the three metadata entries OpenAI's ``build_model`` deletes (``input_resolution``, ``context_length``,
``vocab_size``) are ignored, anything else missing, unexpected or mis-shaped raises `CheckpointError`.

Example::

    model = load_openai_clip("ViT-B-32.pt")                     # CLIPModel (visual + text + logit_scale)
    visual_only = load_openai_clip("RN50x4.pt", visual_only=True)  # text weights skipped (ClipCap)
"""

import os
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

from utils.convert.common import CheckpointError, StateDict, load_torch_state_dict

# OpenAI's build_model deletes exactly these (metadata stored in the JIT archives)
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_VISION_MARKERS = ("visual.conv1.weight",)
_TEXT_MARKERS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")


def load_openai_state_dict(path):
    """Read an OpenAI CLIP ``.pt``: a TorchScript archive (``torch.jit.load``) or a plain state dict
    (``torch.load(weights_only=True)``). Returns ``{key: torch.Tensor}``; `CheckpointError` when the file
    is missing, empty, truncated or neither of the two."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"CLIP checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a CLIP checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"CLIP checkpoint is empty (0 bytes): {path}")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                is_jit = any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            is_jit = False
        if is_jit:
            try:
                with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; OpenAI ships it
                    warnings.simplefilter("ignore", FutureWarning)
                    archive = torch.jit.load(path, map_location="cpu")
                return dict(archive.state_dict())
            except (RuntimeError, OSError, ValueError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CheckpointError(
                    f"cannot read {path} as a TorchScript CLIP archive (truncated or corrupt download?): {reason}"
                ) from e
    return load_torch_state_dict(path)


def _torch_shape(variable, kind):
    shape = tuple(variable.shape)
    if kind == "conv":  # keras (kh, kw, in, out) -> torch (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "linear":  # keras (in, out) -> torch (out, in)
        return (shape[1], shape[0])
    return shape


def _from_torch(value, kind):
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "linear":
        return value.T
    return value


class _Loader:
    """Collects (keras variable, numpy value) pairs from a `StateDict`; assigns only once all is checked."""

    def __init__(self, sd):
        self.sd = sd
        self.assignments = []

    def take(self, variable, key, kind="same"):
        value = self.sd.take(key, _torch_shape(variable, kind))
        if value is not None:
            self.assignments.append((variable, _from_torch(value, kind)))

    def dense(self, dense, prefix):
        self.take(dense.kernel, f"{prefix}.weight", "linear")
        if dense.use_bias:
            self.take(dense.bias, f"{prefix}.bias")

    def layer_norm(self, ln, prefix):
        self.take(ln.gamma, f"{prefix}.weight")
        self.take(ln.beta, f"{prefix}.bias")

    def batch_norm(self, bn, prefix):
        self.take(bn.gamma, f"{prefix}.weight")
        self.take(bn.beta, f"{prefix}.bias")
        self.take(bn.moving_mean, f"{prefix}.running_mean")
        self.take(bn.moving_variance, f"{prefix}.running_var")
        # BatchNorm's training step counter: no effect at inference (not every exporter writes it)
        self.sd.ignore(f"{prefix}.num_batches_tracked")

    def conv(self, conv, prefix):
        self.take(conv.kernel, f"{prefix}.weight", "conv")

    def packed_attention(self, attn, prefix):
        """nn.MultiheadAttention: in_proj_weight (3C, C) / in_proj_bias (3C,) -> q, k, v; out_proj."""
        width = attn.width
        weight = self.sd.take(f"{prefix}.in_proj_weight", (3 * width, width))
        bias = self.sd.take(f"{prefix}.in_proj_bias", (3 * width,))
        if weight is not None and bias is not None:
            for i, dense in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                self.assignments.append((dense.kernel, weight[i * width : (i + 1) * width].T))
                self.assignments.append((dense.bias, bias[i * width : (i + 1) * width]))
        self.dense(attn.out_proj, f"{prefix}.out_proj")

    def residual_block(self, block, prefix):
        self.layer_norm(block.ln_1, f"{prefix}.ln_1")
        self.packed_attention(block.attn, f"{prefix}.attn")
        self.layer_norm(block.ln_2, f"{prefix}.ln_2")
        self.dense(block.c_fc, f"{prefix}.mlp.c_fc")
        self.dense(block.c_proj, f"{prefix}.mlp.c_proj")

    def assign(self):
        for variable, value in self.assignments:
            variable.assign(value)  # already float32 (StateDict.take)


def _load_vit(loader, visual, p="visual"):
    loader.conv(visual.get_layer("conv1"), f"{p}.conv1")
    embeddings = visual.get_layer("embeddings")
    loader.take(embeddings.class_embedding, f"{p}.class_embedding")
    loader.take(embeddings.positional_embedding, f"{p}.positional_embedding")
    loader.layer_norm(visual.get_layer("ln_pre"), f"{p}.ln_pre")
    for i in range(visual.num_layers):
        name = f"transformer.resblocks.{i}"
        loader.residual_block(visual.get_layer(name), f"{p}.{name}")
    loader.layer_norm(visual.get_layer("ln_post"), f"{p}.ln_post")
    loader.take(visual.get_layer("proj").kernel, f"{p}.proj")  # used as x @ proj: already (in, out)


def _load_resnet(loader, visual, p="visual"):
    for i in (1, 2, 3):
        loader.conv(visual.get_layer(f"conv{i}"), f"{p}.conv{i}")
        loader.batch_norm(visual.get_layer(f"bn{i}"), f"{p}.bn{i}")
    for stage, blocks in enumerate(visual.layer_counts, start=1):
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            block = visual.get_layer(name)
            for i in (1, 2, 3):
                loader.conv(getattr(block, f"conv{i}"), f"{p}.{name}.conv{i}")
                loader.batch_norm(getattr(block, f"bn{i}"), f"{p}.{name}.bn{i}")
            if block.has_downsample:
                loader.conv(block.downsample_conv, f"{p}.{name}.downsample.0")
                loader.batch_norm(block.downsample_bn, f"{p}.{name}.downsample.1")
    pool = visual.get_layer("attnpool")
    loader.take(pool.positional_embedding, f"{p}.attnpool.positional_embedding")
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        loader.dense(getattr(pool, proj), f"{p}.attnpool.{proj}")


def _load_text(loader, text):
    loader.take(text.get_layer("token_embedding").embeddings, "token_embedding.weight")
    loader.take(text.get_layer("positional_embedding").positional_embedding, "positional_embedding")
    for i in range(text.num_layers):
        name = f"transformer.resblocks.{i}"
        loader.residual_block(text.get_layer(name), name)
    loader.layer_norm(text.get_layer("ln_final"), "ln_final")
    loader.take(text.get_layer("text_projection").kernel, "text_projection")  # x @ text_projection


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
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    try:
        return clip_config_from_shapes(shapes, visual_only=visual_only)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: cannot infer the CLIP architecture from its weights: {e}") from e


def clip_from_state_dict(state_dict: Mapping, visual_only=False, source="checkpoint"):
    """Build a Keras `CLIPModel` from an OpenAI CLIP state dict (torch tensors or numpy arrays).

    With ``visual_only`` the text encoder is not built and every non-``visual.`` tensor is ignored
    (``logit_scale`` is still read). Everything else is strict (see module docstring).
    """
    from custom_architectures.clip_arch import build_clip

    config = clip_config_from_state_dict(state_dict, visual_only=visual_only, source=source)
    model = build_clip(config)
    sd = StateDict(state_dict, source=source)
    sd.ignore(list(OPENAI_METADATA_KEYS))
    loader = _Loader(sd)
    (_load_vit if model.is_vit else _load_resnet)(loader, model.visual)
    if visual_only:
        sd.ignore([k for k in sd.keys() if not k.startswith("visual.") and k != "logit_scale"])
    else:
        _load_text(loader, model.text)
    loader.take(model.logit_scale, "logit_scale")
    sd.finish()
    loader.assign()
    return model


def load_openai_clip(path_or_state_dict, visual_only=False):
    """An OpenAI CLIP ``.pt`` file (TorchScript or state dict) or an in-memory state dict -> `CLIPModel`."""
    if isinstance(path_or_state_dict, Mapping):
        return clip_from_state_dict(path_or_state_dict, visual_only=visual_only, source="state dict")
    state_dict = load_openai_state_dict(path_or_state_dict)
    return clip_from_state_dict(state_dict, visual_only=visual_only, source=os.fspath(path_or_state_dict))
