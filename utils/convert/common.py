"""What every checkpoint converter shares: the error type, safe loading and the conversion to numpy.

The strict key accounting (every tensor ported or explicitly ignored) is `utils.convert.porting`.

Example::

    state_dict = load_torch_state_dict("coco_weights.pt")   # weights_only=True; CheckpointError if unreadable
    w = to_numpy(state_dict["clip_project.model.0.weight"])  # float32 numpy
"""

import os
import zipfile
from collections.abc import Mapping

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
