"""What every checkpoint converter shares: the error type, safe loading and the conversion to numpy.

The strict key accounting (every tensor ported or explicitly ignored) is `utils.convert.porting`.

Example::

    state_dict = load_torch_state_dict("coco_weights.pt")   # numpy, no torch; CheckpointError if unreadable
    w = to_numpy(state_dict["clip_project.model.0.weight"])  # float32 numpy
    out, width = tensor_shape(state_dict, "clip_project.model.0.weight", 2)  # CheckpointError if not 2-D
"""

import math

import numpy as np

from utils.convert.torch_file import CheckpointError, load_state_dict

__all__ = ["CheckpointError", "check_model_size", "load_torch_state_dict", "tensor_shape", "tensor_shapes",
           "to_numpy"]


def tensor_shape(state_dict, key, ndim, source=None):
    """The shape of ``state_dict[key]`` as ints, checked before a converter reads sizes from it: present, of
    ``ndim`` dimensions, each at least 1. `CheckpointError` naming the key, the expected rank and what was
    found otherwise (never an IndexError / ZeroDivisionError / unpacking error further on).

    ``source`` (e.g. the file's path) starts the message when given.
    """
    where = f"{source}: " if source else ""
    if key not in state_dict:
        raise CheckpointError(f"{where}missing keys: {key} (expected a {ndim}-D tensor)")
    shape = getattr(state_dict[key], "shape", None)
    if shape is None:
        raise CheckpointError(f"{where}{key} is a {type(state_dict[key]).__name__}, expected a {ndim}-D tensor")
    shape = tuple(int(d) for d in shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{where}{key} has shape {shape} ({len(shape)}-D), expected a {ndim}-D tensor")
    if any(d < 1 for d in shape):
        raise CheckpointError(f"{where}{key} has shape {shape}: every dimension must be at least 1")
    return shape


def tensor_shapes(state_dict, prefix=""):
    """``{key: shape}`` of the entries of ``state_dict`` whose key starts with ``prefix`` (a value without a
    shape: ``()``)."""
    return {k: tuple(int(d) for d in getattr(v, "shape", ())) for k, v in state_dict.items() if k.startswith(prefix)}


#: `check_model_size` admits a model up to this many times the elements of its file's tensors: a checkpoint
#: lacking a few keys still reaches the strict check that names them; stray keys cannot build a model of
#: thousands of layers from a file of a few
MODEL_SIZE_SLACK = 2


def check_model_size(parameters, shapes, what, source="checkpoint"):
    """Refuse (`CheckpointError`) to build a model of ``parameters`` weights from checkpoint tensors of
    ``shapes`` (``{key: shape}``, e.g. `tensor_shapes`) holding less than 1 / `MODEL_SIZE_SLACK` of that: a
    config inferred from keys and shapes must not build a model larger than its file before the strict key
    check (`porting.WeightPorter.finish`) can name what is missing. Run it before building anything."""
    held = sum(math.prod(shape) for shape in shapes.values())
    if parameters > MODEL_SIZE_SLACK * held:
        raise CheckpointError(
            f"{source}: the {what} its keys and shapes describe has {parameters} weights, but its tensors hold "
            f"only {held} elements (at most {MODEL_SIZE_SLACK}x that is admitted): keys are missing, or stray "
            "keys make it look larger than it is; refused before building the model")


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
