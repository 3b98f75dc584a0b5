"""Keras ClipCap -> an official-format ClipCap checkpoint (the inverse of `utils.convert.clipcap`).

The official code saves ``torch.save(model.state_dict())`` of its ``ClipCaptionModel``: GPT-2 (a
``GPT2LMHeadModel``) under ``gpt.`` and the mapper under ``clip_project.``. `official_state_dict` builds that
dict from a Keras mapper and GPT-2 (float32 torch tensors, Keras Dense kernels (in, out) transposed back to
torch's Linear (out, in); GPT-2's Conv1D weights are (in, out) in both), so that::

    model = ClipCaptionModel(prefix_length, clip_length, prefix_size, num_layers, mapping_type)  # official
    model.load_state_dict(torch.load("my_clipcap.pt", weights_only=True), strict=True)

gives the logits of the Keras model, and converting the file back (`load_clipcap`) gives bit-identical
weights. ``gpt.lm_head.weight`` is written (equal to ``gpt.transformer.wte.weight``: GPT-2 ties them), as in
the released checkpoints. transformers releases up to at least 4.24 keep the causal-mask buffers
``attn.bias`` / ``attn.masked_bias`` in the state dict and recent ones do not (``persistent=False``):
``legacy_buffers=True`` adds them, for a strict load with the transformers 4.x of the official code's time.

The state dict does not say which CLIP the mapper expects: `export_official` writes it, with everything the
official constructor needs, in a JSON file beside the ``.pt`` (``<file>.json``; `sidecar_path`). An existing
``.json`` is replaced only if an export wrote it (`is_official_description`), and nothing is written inside a
saved model's folder (`check_official_targets`).

Example::

    path = export_official(ClipCap.load("my_model"), "my_model.pt", clip_name="ViT-B/32")
    # my_model.pt (state dict) + my_model.json ({"clip": "ViT-B/32", "mapping_type": "mlp", ...})
"""

import os
from pathlib import Path

import numpy as np

from utils.convert.clipcap import MAPPER_FORMATS, mapper_format
from utils.convert.hf_gpt2 import gpt2_weight_map
from utils.convert.porting import export_weights
from utils.file_utils import UnsafePathError, atomic_open, json_file_matches, write_json_atomic
from utils.model_store import is_model_folder

SIDECAR_FORMAT = "clipcap-official-export/1"
#: The released checkpoints' CLIP by prefix size, for the hint when no CLIP name is known.
_CLIP_HINTS = {512: "ViT-B/32 (as the released coco / conceptual weights)", 640: "RN50x4 (as the released "
                                                                                  "transformer weights)"}


def _torch(value):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(value, dtype=np.float32)))


def mapper_state_dict(mapper, config):
    """The ``clip_project.*`` entries of a Keras mapper, from its type's weight table (`MAPPER_FORMATS`)."""
    fmt = _official_format(config)
    fmt.check_exportable(config)
    return export_weights(fmt.weights(mapper), to_tensor=_torch)


def _official_format(config):
    """The `MapperFormat` of the config's mapper type; `ValueError` for a type without an official format."""
    if config["mapping_type"] not in MAPPER_FORMATS:
        raise ValueError(f"the {config['mapping_type']!r} mapper has no official checkpoint format: the official "
                         f"code has {', '.join(map(repr, MAPPER_FORMATS))}")
    return mapper_format(config["mapping_type"])


def gpt2_state_dict(gpt2, prefix="gpt.", legacy_buffers=False):
    """The ``GPT2LMHeadModel`` entries (``gpt.transformer.*``, ``gpt.lm_head.weight``) of a Keras `GPT2`,
    from GPT-2's weight table (`gpt2_weight_map`, the one the import reads)."""
    import torch

    t = f"{prefix}transformer."
    weights = export_weights(gpt2_weight_map(gpt2, t), to_tensor=_torch)
    n_pos = int(gpt2.n_positions)
    sd = {}
    for key, value in weights.items():
        sd[key] = value
        if legacy_buffers and key.endswith(".ln_1.bias"):  # transformers 4.x: attn's buffers follow ln_1
            h = key[: -len("ln_1.bias")]
            causal = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.uint8))
            sd[h + "attn.bias"] = causal.view(1, 1, n_pos, n_pos)
            sd[h + "attn.masked_bias"] = torch.tensor(-1e4)
    sd[f"{prefix}lm_head.weight"] = sd[f"{t}wte.weight"]  # tied, as in GPT2LMHeadModel.state_dict()
    return sd


def official_state_dict(mapper, gpt2, config, legacy_buffers=False):
    """The official ``ClipCaptionModel.state_dict()`` of a Keras mapper + GPT-2 (``gpt.*`` then
    ``clip_project.*``, the official module order)."""
    sd = gpt2_state_dict(gpt2, legacy_buffers=legacy_buffers)
    sd.update(mapper_state_dict(mapper, config))
    return sd


def sidecar_path(path):
    """``my_model.pt`` -> ``my_model.json``: where `export_official` describes the checkpoint."""
    return Path(os.fspath(path)).with_suffix(".json")


def is_official_description(path) -> bool:
    """Whether ``path`` is a description `export_official` wrote (a JSON file of format `SIDECAR_FORMAT`): the
    only ``.json`` an export replaces."""
    return json_file_matches(path, lambda d: isinstance(d, dict) and d.get("format") == SIDECAR_FORMAT)


def check_official_targets(path, overwrite=False, source_dir=None):
    """Raise unless `export_official` may write ``path`` and its description: `ValueError` for a ``.json``
    checkpoint name; `UnsafePathError` for an output inside ``source_dir`` (the exported model's folder) or
    inside any saved model's folder (a later save or ``convert --overwrite`` of that model would delete it,
    and its files are not ours to replace), for an existing ``.pt`` without ``overwrite`` (or not a regular
    file, or not a PyTorch checkpoint), and for an existing description that `export_official` did not write (a model's own
    ``config.json``: never replaced, whatever ``overwrite`` says). Nothing is written."""
    targets = [Path(path), sidecar_path(path)]
    if targets[0] == targets[1]:
        raise ValueError(f"{path}: the checkpoint needs another suffix than .json (its description is written "
                         "to <name>.json beside it)")
    folder = Path(os.path.realpath(targets[0].parent))
    source = Path(os.path.realpath(source_dir)) if source_dir is not None else None
    for directory in (folder, *folder.parents):
        if directory == source or is_model_folder(directory) or is_model_folder(directory, "openai_clip"):
            raise UnsafePathError(f"{path} is inside the saved model folder {directory}: export outside it "
                                  "(its files are not replaced, and saving the model again would delete the "
                                  "export; nothing was written)")
    for target in targets:
        if not os.path.lexists(target):
            continue
        if not (overwrite and target.is_file() and not target.is_symlink()):
            raise UnsafePathError(f"{target} already exists: pass overwrite=True (--overwrite) to replace it, "
                                  "or choose another file name (nothing was written)")
        if target == targets[1] and not is_official_description(target):
            raise UnsafePathError(f"{target} already exists and is not a description written by an official "
                                  "export: refusing to replace it, choose another file name (nothing was written)")
        if target == targets[0] and not _is_torch_checkpoint(target):
            raise UnsafePathError(f"{target} already exists and is not a PyTorch checkpoint: refusing to replace "
                                  "it, choose another file name (nothing was written)")


def _is_torch_checkpoint(path):
    """Whether ``path`` holds a PyTorch checkpoint (read by the torch-free reader, shapes only): the only file
    an export's ``overwrite`` replaces (``--overwrite thesis.tex`` would have replaced the thesis)."""
    from utils.convert.torch_file import CheckpointError, read_checkpoint

    try:
        read_checkpoint(path, shapes_only=True)
    except (CheckpointError, OSError):
        return False
    return True


def official_description(config, clip_name=None):
    """What the official code needs beside the state dict: the CLIP and the constructor arguments."""
    prefix_size = int(config["prefix_size"])
    clip_name = clip_name or config.get("clip_name")
    desc = {
        "format": SIDECAR_FORMAT,
        "clip": clip_name,
        "prefix_size": prefix_size,
        "mapping_type": config["mapping_type"],
        "prefix_length": int(config["prefix_length"]),
        "normalize_prefix": bool(config.get("normalize_prefix", False)),
        "gpt2": dict(config.get("gpt2", {})),
    }
    desc.update({k: int(config[k]) for k in _official_format(config).official_arguments})
    if clip_name is None:
        hint = _CLIP_HINTS.get(prefix_size)
        desc["clip_note"] = (f"unknown CLIP: the model does not record it. It must produce {prefix_size}-d image "
                             "embeddings" + (f", e.g. {hint}" if hint else "") + "; pass clip_name / --clip-name.")
    return desc


def export_official(model, path, clip_name=None, legacy_buffers=False, overwrite=False):
    """Write ``model`` (a `ClipCap`) as an official-format ``.pt`` state dict + its JSON description.

    Args:
        model: a `ClipCap` (converted or trained here).
        path: the ``.pt`` file; ``<path without suffix>.json`` gets `official_description`.
        clip_name: the CLIP the mapper expects ("ViT-B/32", ...); default ``model.config["clip_name"]``.
        legacy_buffers: add GPT-2's ``attn.bias`` / ``attn.masked_bias`` buffers (older transformers).
        overwrite: replace an existing file at ``path`` and an existing ``.json`` that an export wrote
            (otherwise `UnsafePathError`, before anything is written; `check_official_targets`: never inside
            a saved model's folder, never another ``.json``).

    Returns:
        (pt path, json path), both written atomically.
    """
    import torch

    check_official_targets(path, overwrite)
    targets = [Path(path), sidecar_path(path)]
    state_dict = official_state_dict(model.mapper, model.gpt2, model.config, legacy_buffers=legacy_buffers)
    description = official_description(model.config, clip_name)
    with atomic_open(targets[0], "wb") as f:
        torch.save(state_dict, f)
    write_json_atomic(targets[1], description, indent=2)
    return str(targets[0]), str(targets[1])
