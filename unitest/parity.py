"""Shared parity helpers: how a Keras output is compared with its PyTorch reference in every suite.

`assert_close` fails with the maximum absolute difference (and the reference's scale) in its message, so a
regression says by how much; `assert_same_tokens` compares generated token ids exactly. The tolerance is
always the caller's: each suite keeps its own documented value.
"""

import numpy as np


def to_numpy(x):
    """A numpy array from a numpy / TensorFlow / torch value (torch tensors detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def max_abs_diff(ours, reference):
    """max |ours - reference| over every element (shapes must match exactly)."""
    ours, reference = to_numpy(ours), to_numpy(reference)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    return float(np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max()) if ours.size else 0.0


def assert_close(ours, reference, atol, what="output"):
    """max |ours - reference| <= atol, else an AssertionError naming ``what``, the difference and the scale."""
    diff = max_abs_diff(ours, reference)
    scale = float(np.abs(to_numpy(reference)).max()) if to_numpy(reference).size else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.1e} (reference max |x| {scale:.3e})"
    return diff


def assert_same_tokens(ours, reference, what="tokens"):
    """Generated token ids identical (each sequence as a list of ints), else the first differing sequence."""
    ours = [[int(t) for t in seq] for seq in ours]
    reference = [[int(t) for t in seq] for seq in reference]
    assert len(ours) == len(reference), f"{what}: {len(ours)} sequences, reference {len(reference)}"
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a == b, f"{what}[{i}]: {a} != reference {b}"


def torch_prefix(model, embeddings, normalize):
    """The official projection of CLIP embeddings (N, D) numpy -> (N, K, C) torch."""
    import torch

    from testing import clipcap_official as ref

    e = torch.from_numpy(np.asarray(embeddings, np.float32))
    with torch.no_grad():
        return model.project(ref.normalize_embedding(e) if normalize else e)
