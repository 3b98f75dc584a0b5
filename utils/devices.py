"""Where the TensorFlow work of a model runs: ``device=`` of `ClipCap` / `CLIP` and ``--device`` of the CLI.

A device is named ``"cpu"``, ``"gpu"`` (the first GPU) or ``"gpu:N"`` (case-insensitive; ``"cpu:0"`` and
``"/GPU:1"`` are accepted too), or None for TensorFlow's own placement (a GPU when one is visible). A name
TensorFlow cannot see is an error naming the devices it does see, never a silent fall-back to the CPU.

Placement is applied per call (``with device_scope(device)``): TensorFlow's device scopes belong to a
thread, so the models enter it in each method that runs TensorFlow work, which also covers the prediction
pipeline's worker threads.

Example::

    resolve_device("gpu:1")  # -> "/GPU:1", or ValueError when TensorFlow sees fewer GPUs
"""

import contextlib
import re

_DEVICE = re.compile(r"/?(cpu|gpu)(?::(\d+))?", re.IGNORECASE)


def resolve_device(device):
    """``"cpu"`` / ``"gpu"`` / ``"gpu:N"`` / None -> a TensorFlow device string (``"/CPU:0"``,
    ``"/GPU:N"``) or None (TensorFlow's default placement).

    Raises:
        ValueError: a malformed name, or a device TensorFlow does not see (the message lists those it sees).
    """
    if device is None:
        return None
    match = _DEVICE.fullmatch(str(device).strip()) if isinstance(device, str) else None
    if match is None:
        raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:N' (or None), got {device!r}")
    kind, index = match.group(1).upper(), int(match.group(2) or 0)
    import tensorflow as tf

    visible = [d.name.split("device:")[-1] for d in tf.config.list_logical_devices()]  # "CPU:0", "GPU:0", ...
    name = f"{kind}:{index}"
    if name not in visible:
        if kind == "GPU" and not any(v.startswith("GPU") for v in visible):
            raise ValueError(f"device {device!r}: TensorFlow sees no GPU on this machine (visible: "
                             f"{', '.join(visible)}; a CUDA build of TensorFlow and a driver are needed, and "
                             "CUDA_VISIBLE_DEVICES must not hide them)")
        raise ValueError(f"device {device!r}: TensorFlow sees no {name} (visible: {', '.join(visible)})")
    return f"/{name}"


def device_scope(device):
    """A context manager placing TensorFlow work on ``device`` (a string from `resolve_device`), or doing
    nothing for None."""
    if device is None:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.device(device)
