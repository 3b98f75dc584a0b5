"""What every checkpoint converter shares: safe loading and strict key accounting.

Each converter (``openai_clip``, ``hf_gpt2``, ``clipcap``) reads a state dict through a `StateDict`:
every tensor must be taken (with its expected shape) or explicitly ignored, and `StateDict.finish`
raises a `CheckpointError` naming every missing, unexpected or mis-shaped key.

Example::

    sd = StateDict(load_torch_state_dict("coco_weights.pt"), source="coco_weights.pt")
    w = sd.take("clip_project.model.0.weight", (3840, 512))
    sd.ignore_matching(r"gpt\\.h\\.\\d+\\.attn\\.(masked_)?bias")
    sd.finish()
"""

import os
import re
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is unreadable, of the wrong kind, or does not match the expected architecture."""


def to_numpy(value):
    """torch tensor / numpy array -> float32 (or integer) numpy array; fp16/bf16 sources become fp32."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating) and value.dtype != np.float32:
        value = value.astype(np.float32)
    return value


def load_torch_state_dict(path, map_location="cpu", mmap=False):
    """Load a pickled PyTorch checkpoint with ``weights_only=True`` and return its state dict.

    Accepts a bare state dict or the common wrappers ``{"state_dict": ...}`` / ``{"model": ...}``.
    ``mmap=True`` maps the tensors instead of reading them (cheap when only shapes are needed; files in the
    legacy, non-zip format are then read normally). Raises `CheckpointError` with the path and the reason
    for missing, special (FIFO, device), truncated or non-checkpoint files.
    """
    import stat

    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # a FIFO would block torch.load forever, a device read without end
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only the zip format
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt download, or not a "
            f"checkpoint): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    except Exception as e:  # pickle.UnpicklingError and friends from weights_only
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


class StateDict:
    """A read-once view of a state dict that accounts for every key.

    ``take`` returns a key's value as numpy (fp32) after checking its shape; ``ignore`` /
    ``ignore_matching`` mark keys that are deliberately unused (e.g. legacy attention-mask buffers);
    ``finish`` raises if anything was missing, mis-shaped or left over.
    """

    def __init__(self, state_dict: Mapping, source: str = "checkpoint"):
        self._sd = dict(state_dict)
        self.source = source
        self._used: set[str] = set()
        self._missing: list[str] = []
        self._mismatched: list[str] = []

    def __contains__(self, key):
        return key in self._sd

    def keys(self):
        return self._sd.keys()

    def take(self, key, shape=None):
        """The value of `key` as numpy; records a missing or mis-shaped key (raised by `finish`)."""
        if key not in self._sd:
            self._missing.append(key)
            return None
        self._used.add(key)
        value = to_numpy(self._sd[key])
        if shape is not None and tuple(value.shape) != tuple(shape):
            self._mismatched.append(f"{key}: expected {tuple(shape)}, found {tuple(value.shape)}")
            return None
        return value

    def ignore(self, keys: Iterable[str] | str):
        for key in [keys] if isinstance(keys, str) else keys:
            if key in self._sd:
                self._used.add(key)

    def ignore_matching(self, pattern: str):
        regex = re.compile(pattern)
        self.ignore([k for k in self._sd if regex.fullmatch(k)])

    @property
    def unused(self):
        return sorted(k for k in self._sd if k not in self._used)

    def check(self):
        """Raise now if a key was missing or mis-shaped (so no model is built from bad weights)."""
        problems = []
        if self._missing:
            problems.append(f"missing keys: {', '.join(self._missing)}")
        if self._mismatched:
            problems.append(f"mis-shaped keys: {'; '.join(self._mismatched)}")
        if problems:
            raise CheckpointError(f"{self.source}: " + " | ".join(problems))

    def finish(self):
        """Raise `CheckpointError` naming every missing, mis-shaped and unexpected key."""
        problems = []
        if self._missing:
            problems.append(f"missing keys: {', '.join(self._missing)}")
        if self._mismatched:
            problems.append(f"mis-shaped keys: {'; '.join(self._mismatched)}")
        if self.unused:
            problems.append(f"unexpected keys: {', '.join(self.unused)}")
        if problems:
            raise CheckpointError(f"{self.source}: " + " | ".join(problems))
