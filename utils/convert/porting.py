"""One weight porter with strict accounting, shared by every converter (keras-hub's ``port_weight`` idea).

A converter describes each Keras variable by the checkpoint key it comes from and a `hook`, the layout change
between the two (`IDENTITY`, `LINEAR` for torch Linear (out, in) <-> Keras Dense (in, out), `CONV` for torch
(out, in, kh, kw) <-> Keras (kh, kw, in, out), `Split` for one part of a packed tensor such as
``in_proj_weight``). A hook works both ways, so one table of ``(variable, key, hook)`` entries serves the
import (`WeightPorter.port`) and the export (`export_weights`).

`WeightPorter` checks each tensor's shape in the checkpoint's own layout (so messages show the file's shapes),
keeps the converted values, and assigns them only once everything has been checked: `finish` raises one
`CheckpointError` naming every missing, mis-shaped and unexpected key at once. `check_keys` is that comparison
on its own, for any two ``{name: shape}`` sets (e.g. a saved weights file against its model).

Example::

    porter = WeightPorter(state_dict, source="model.pt")
    porter.port(dense.kernel, "fc.weight", LINEAR)        # (out, in) in the file, (in, out) in Keras
    porter.port(dense.bias, "fc.bias")
    porter.ignore_matching(r"h\\.\\d+\\.attn\\.(masked_)?bias")  # buffers deliberately not used
    porter.finish()                                      # raises naming every problem, then assigns
"""

import re
from collections.abc import Iterable, Mapping

import numpy as np

from utils.convert.common import CheckpointError, to_numpy


def _shape(value):
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def check_keys(expected: Mapping, found: Mapping, source: str = "checkpoint", allow_unexpected: bool = False):
    """Compare two ``{name: shape}`` sets; raise one `CheckpointError` naming every difference.

    Args:
        expected: the names the model needs and their shapes (a shape of None accepts any shape).
        found: the names the file holds and their shapes.
        source: what `found` was read from, first in the message.
        allow_unexpected: do not report names of `found` that `expected` lacks (a partial check).

    The message reads ``"<source>: missing keys: a, b | mis-shaped keys: c: expected (2,), found (3,) |
    unexpected keys: d"``, with only the parts that apply; missing and mis-shaped keys in `expected`'s order,
    unexpected ones sorted.
    """
    missing = [k for k in expected if k not in found]
    mismatched = [
        f"{k}: expected {tuple(shape)}, found {tuple(found[k])}"
        for k, shape in expected.items()
        if k in found and shape is not None and tuple(found[k]) != tuple(shape)
    ]
    unexpected = [] if allow_unexpected else sorted(k for k in found if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {'; '.join(mismatched)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


# ------------------------------------------------------------------------------------------------- hooks


class Identity:
    """The checkpoint tensor is the Keras variable as it is (biases, norms, embeddings, HF Conv1D)."""

    def to_keras(self, value):
        return value

    def to_checkpoint(self, value):
        return value

    def checkpoint_shape(self, keras_shape):
        return tuple(keras_shape)

    def __repr__(self):
        return "IDENTITY"


class Transpose:
    """Keras variable = ``np.transpose(checkpoint tensor, axes)``; the export applies the inverse."""

    def __init__(self, axes):
        self.axes = tuple(int(a) for a in axes)
        self.inverse = tuple(int(a) for a in np.argsort(self.axes))

    def to_keras(self, value):
        return np.transpose(value, self.axes)

    def to_checkpoint(self, value):
        return np.transpose(value, self.inverse)

    def checkpoint_shape(self, keras_shape):
        return tuple(keras_shape[i] for i in self.inverse)

    def __repr__(self):
        return f"Transpose({self.axes})"


class Split:
    """Part ``index`` of ``parts`` equal slices along ``axis`` of a packed checkpoint tensor, then ``then``.

    E.g. ``nn.MultiheadAttention.in_proj_weight`` (3C, C) holds q, k and v: the q kernel is
    ``Split(0, 3, then=LINEAR)``. Ported three times, the key is one tensor of the file; `export_weights`
    concatenates the parts back in ``index`` order.
    """

    def __init__(self, index, parts, axis=0, then=None):
        if not 0 <= index < parts:
            raise ValueError(f"Split index {index} is not in [0, {parts})")
        self.index, self.parts, self.axis = int(index), int(parts), int(axis)
        self.then = then if then is not None else IDENTITY

    def to_keras(self, value):
        size = value.shape[self.axis] // self.parts
        part = np.take(value, np.arange(self.index * size, (self.index + 1) * size), axis=self.axis)
        return self.then.to_keras(part)

    def to_checkpoint(self, value):
        return self.then.to_checkpoint(value)  # this part only; export_weights joins the parts

    def checkpoint_shape(self, keras_shape):
        shape = list(self.then.checkpoint_shape(keras_shape))
        shape[self.axis] *= self.parts
        return tuple(shape)

    def __repr__(self):
        return f"Split({self.index}, {self.parts}, axis={self.axis}, then={self.then!r})"


IDENTITY = Identity()
LINEAR = Transpose((1, 0))  # torch Linear (out, in) <-> Keras Dense kernel (in, out)
CONV = Transpose((2, 3, 1, 0))  # torch Conv2d (out, in, kh, kw) <-> Keras Conv2D kernel (kh, kw, in, out)


def linear_entries(dense, key):
    """A torch ``nn.Linear`` ``key`` (weight (out, in), bias) <-> a Keras Dense (kernel (in, out), bias)."""
    entries = [(dense.kernel, f"{key}.weight", LINEAR)]
    if dense.use_bias:
        entries.append((dense.bias, f"{key}.bias", IDENTITY))
    return entries


def layer_norm_entries(layer, key):
    """A torch ``nn.LayerNorm`` ``key`` (weight, bias) <-> a Keras LayerNormalization (gamma, beta)."""
    return [(layer.gamma, f"{key}.weight", IDENTITY), (layer.beta, f"{key}.bias", IDENTITY)]


# ------------------------------------------------------------------------------------------------ porter


class WeightPorter:
    """A read-once view of a state dict that ports it into Keras variables and accounts for every key.

    ``port(variable, key, hook)`` checks ``key``'s shape against the variable's (in the checkpoint layout,
    through the hook) and keeps the converted value; ``take(key, shape)`` returns a value for the converter's
    own use (e.g. a tie check); ``ignore`` / ``ignore_matching`` mark keys deliberately unused. ``assign``
    raises on missing or mis-shaped keys so far, then assigns; ``finish`` also raises on every key neither
    taken nor ignored, then assigns what is left. Nothing is assigned from a checkpoint with a problem.
    """

    def __init__(self, state_dict: Mapping, source: str = "checkpoint"):
        self._sd = dict(state_dict)
        self.source = source
        self._expected: dict[str, tuple | None] = {}
        self._ignored: set[str] = set()
        self._pending: list = []  # (variable, numpy value), assigned once all is checked

    def __contains__(self, key):
        return key in self._sd

    def keys(self):
        return self._sd.keys()

    def shapes(self, prefix=""):
        """``{key: shape}`` of the keys starting with ``prefix`` (all of them by default), nothing read."""
        return {k: _shape(v) for k, v in self._sd.items() if k.startswith(prefix)}

    def take(self, key, shape=None):
        """The value of ``key`` as numpy (fp32 for floats), or None when it is missing or not of ``shape``
        (`check` / `finish` then name it)."""
        shape = None if shape is None else tuple(int(d) for d in shape)
        if self._expected.get(key, shape) != shape:
            raise ValueError(f"{key} is asked for with two shapes: {self._expected[key]} and {shape}")
        self._expected[key] = shape
        if key not in self._sd or (shape is not None and _shape(self._sd[key]) != shape):
            return None
        return to_numpy(self._sd[key])

    def port(self, variable, key, hook=None):
        """Port ``key`` into ``variable`` through ``hook`` (default `IDENTITY`); assigned by `assign`."""
        hook = hook if hook is not None else IDENTITY
        value = self.take(key, hook.checkpoint_shape(tuple(variable.shape)))
        if value is not None:
            self._pending.append((variable, hook.to_keras(value)))

    def port_value(self, variable, value):
        """Assign ``value`` (Keras layout), computed by the converter from keys it `take`-s (e.g. a
        BatchNorm folded into a convolution), with the ported values: only once everything is checked."""
        value = np.asarray(value, dtype=np.float32)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{getattr(variable, 'path', 'variable')}: a value of shape {value.shape} for a variable of shape "
                             f"{tuple(variable.shape)}")
        self._pending.append((variable, value))

    def port_all(self, entries: Iterable):
        """`port` each ``(variable, key, hook)`` of a weight table."""
        for variable, key, hook in entries:
            self.port(variable, key, hook)

    def ignore(self, keys: Iterable[str] | str):
        """Count ``keys`` (those present) as consumed without using them."""
        for key in [keys] if isinstance(keys, str) else keys:
            if key in self._sd:
                self._ignored.add(key)

    def ignore_matching(self, pattern: str):
        """`ignore` every key that ``pattern`` matches in full."""
        regex = re.compile(pattern)
        self.ignore([k for k in self._sd if regex.fullmatch(k)])

    @property
    def unused(self):
        """The keys neither taken nor ignored so far, sorted."""
        return sorted(k for k in self._sd if k not in self._expected and k not in self._ignored)

    def _found(self):
        return {k: _shape(v) for k, v in self._sd.items() if k in self._expected or k not in self._ignored}

    def check(self):
        """Raise `CheckpointError` now if a key asked for is missing or mis-shaped (unused keys may stay)."""
        check_keys(self._expected, self._found(), self.source, allow_unexpected=True)

    def assign(self):
        """`check`, then assign every value ported so far."""
        self.check()
        for variable, value in self._pending:
            variable.assign(value)
        self._pending.clear()

    def finish(self):
        """Raise `CheckpointError` naming every missing, mis-shaped and unexpected key; then `assign`."""
        check_keys(self._expected, self._found(), self.source)
        self.assign()


def export_weights(entries: Iterable, to_tensor=None) -> dict:
    """A weight table ``(variable, key, hook)`` -> ``{key: checkpoint-layout array}``, in table order.

    The inverse of `WeightPorter.port_all`: each hook's ``to_checkpoint`` is applied, and the `Split` parts
    of one key are concatenated in index order (all parts must be present). ``to_tensor`` converts each
    float32 array (e.g. to a torch tensor); default: the numpy array.
    """
    out, parts = {}, {}
    for variable, key, hook in entries:
        hook = hook if hook is not None else IDENTITY
        value = hook.to_checkpoint(np.asarray(variable.numpy(), dtype=np.float32))
        if isinstance(hook, Split):
            parts.setdefault(key, {})[hook.index] = (hook, value)
            out.setdefault(key, None)  # keeps the key's place in the order
        else:
            out[key] = value
    for key, pieces in parts.items():
        hook = next(iter(pieces.values()))[0]
        if sorted(pieces) != list(range(hook.parts)):
            raise ValueError(f"{key}: parts {sorted(pieces)} of {hook.parts} in the weight table")
        out[key] = np.concatenate([pieces[i][1] for i in range(hook.parts)], axis=hook.axis)
    convert = to_tensor or (lambda a: a)
    return {key: convert(np.ascontiguousarray(value)) for key, value in out.items()}
