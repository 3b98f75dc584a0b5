"""Batch padding shared by the compiled (XLA) encoders and decoders (`PrefixDecoder`, the CLIP and ClipCap
wrappers of models/).

An XLA-compiled function is compiled once per input shape; padding every batch up to a power of two bounds
the number of compilations to log2(largest batch) at less than twice the work.
"""

import numpy as np


def power_of_two_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pad_batch(array, size: int, fill=0):
    """`array` (N, ...) padded with `fill` rows up to `size` rows (returned as is when N == size).

    Example::

        padded = pad_batch(pixels, power_of_two_at_least(len(pixels)))   # then slice outputs [:len(pixels)]
    """
    array = np.asarray(array)
    if len(array) == size:
        return array
    padding = np.full((size - len(array), *array.shape[1:]), fill, dtype=array.dtype)
    return np.concatenate([array, padding])
