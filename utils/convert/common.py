"""What every checkpoint converter shares: the error type, safe loading and the conversion to numpy.

The strict key accounting (every tensor ported or explicitly ignored) is `utils.convert.porting`.

Example::

    state_dict = load_torch_state_dict("coco_weights.pt")   # numpy, no torch; CheckpointError if unreadable
    w = to_numpy(state_dict["clip_project.model.0.weight"])  # float32 numpy
"""

import numpy as np

from utils.convert.torch_file import CheckpointError, load_state_dict

__all__ = ["CheckpointError", "load_torch_state_dict", "to_numpy"]


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


def load_torch_state_dict(path, shapes_only=False):
    """A PyTorch checkpoint's state dict as numpy arrays, read without torch and without running anything
    from the file (`utils.convert.torch_file`: zip, legacy and TorchScript files; only tensors, storages and
    plain containers are admitted, any other pickled global is refused by name).

    Accepts a bare state dict or the common wrappers ``{"state_dict": ...}`` / ``{"model": ...}``.
    ``shapes_only=True`` gives ``TensorRecord`` values (``.shape``, ``.dtype``) without reading the tensors'
    bytes (cheap when only shapes are needed). Raises `CheckpointError` with the path and the reason for
    missing, special (FIFO, device), empty, truncated or non-checkpoint files.
    """
    return load_state_dict(path, shapes_only=shapes_only)
