"""The weight porter: strict accounting (every problem named in one error), hooks both ways, no partial
load."""

import numpy as np
import pytest
import torch

from utils.convert.common import CheckpointError
from utils.convert.porting import CONV, IDENTITY, LINEAR, Split, WeightPorter, check_keys, export_weights


class Var:
    """A stand-in for a Keras variable: a shape, ``assign`` and ``numpy``."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.value = np.full(shape, -7.0, np.float32)

    def assign(self, value):
        assert tuple(value.shape) == self.shape
        self.value = np.asarray(value, np.float32)

    def numpy(self):
        return self.value


def test_every_problem_is_named_in_one_error():
    rng = np.random.default_rng(0)
    state = {
        "fc.weight": torch.from_numpy(rng.normal(size=(5, 3)).astype(np.float32)),  # good
        "fc.bias": torch.zeros(6),  # mis-shaped: 5 expected
        "norm.weight": torch.ones(4),  # good
        "extra.weight": torch.ones(2),  # unexpected
        "buffer.mask": torch.ones(2),  # ignored
        "zz.unused": torch.ones(1),  # unexpected
    }
    kernel, bias, gamma, beta = Var((3, 5)), Var((5,)), Var((4,)), Var((4,))
    porter = WeightPorter(state, source="tiny.pt")
    porter.port(kernel, "fc.weight", LINEAR)
    porter.port(bias, "fc.bias")
    porter.port(gamma, "norm.weight")
    porter.port(beta, "norm.bias")  # missing
    porter.ignore_matching(r"buffer\..*")
    with pytest.raises(CheckpointError) as info:
        porter.finish()
    assert str(info.value) == (
        "tiny.pt: missing keys: norm.bias | mis-shaped keys: fc.bias: expected (5,), found (6,) | "
        "unexpected keys: extra.weight, zz.unused"
    )
    assert (kernel.value == -7).all() and (gamma.value == -7).all()  # nothing assigned from a bad checkpoint


def test_hooked_shape_is_checked_in_the_checkpoint_layout():
    porter = WeightPorter({"fc.weight": torch.zeros(3, 5)}, source="sd")  # a (in, out) tensor, not (out, in)
    porter.port(Var((3, 5)), "fc.weight", LINEAR)
    message = r"^sd: mis-shaped keys: fc\.weight: expected \(5, 3\), found \(3, 5\)$"
    with pytest.raises(CheckpointError, match=message):
        porter.check()  # the file's (out, in), not Keras' (in, out)
    porter = WeightPorter({"conv.weight": torch.zeros(8, 3, 2, 2)}, source="sd")
    porter.port(Var((2, 2, 3, 8)), "conv.weight", CONV)
    porter.finish()
    porter = WeightPorter({"conv.weight": torch.zeros(8, 3, 2)}, source="sd")  # checked before the transpose
    porter.port(Var((2, 2, 3, 8)), "conv.weight", CONV)
    with pytest.raises(CheckpointError, match=r"conv\.weight: expected \(8, 3, 2, 2\), found \(8, 3, 2\)"):
        porter.finish()


def test_hooks_port_and_export_both_ways():
    rng = np.random.default_rng(1)
    linear = rng.normal(size=(5, 3)).astype(np.float32)  # torch (out, in)
    conv = rng.normal(size=(8, 3, 2, 2)).astype(np.float16)  # fp16, as OpenAI ships
    packed = rng.normal(size=(12, 4)).astype(np.float32)  # q, k, v of width 4
    packed_bias = rng.normal(size=(12,)).astype(np.float32)
    state = {"fc.weight": torch.from_numpy(linear), "conv.weight": torch.from_numpy(conv),
             "in_proj_weight": torch.from_numpy(packed), "in_proj_bias": packed_bias}
    fc, cv = Var((3, 5)), Var((2, 2, 3, 8))
    q, k, v = (Var((4, 4)) for _ in range(3))
    qb, kb, vb = (Var((4,)) for _ in range(3))
    table = [(fc, "fc.weight", LINEAR), (cv, "conv.weight", CONV)]
    for i, (kernel, bias) in enumerate(((q, qb), (k, kb), (v, vb))):
        table += [(kernel, "in_proj_weight", Split(i, 3, then=LINEAR)), (bias, "in_proj_bias", Split(i, 3))]
    porter = WeightPorter(state, source="sd")
    porter.port_all(table)
    porter.finish()
    np.testing.assert_array_equal(fc.value, linear.T)
    np.testing.assert_array_equal(cv.value, np.transpose(conv.astype(np.float32), (2, 3, 1, 0)))
    np.testing.assert_array_equal(k.value, packed[4:8].T)
    np.testing.assert_array_equal(vb.value, packed_bias[8:])
    exported = export_weights(table)
    assert list(exported) == ["fc.weight", "conv.weight", "in_proj_weight", "in_proj_bias"]
    np.testing.assert_array_equal(exported["fc.weight"], linear)
    np.testing.assert_array_equal(exported["conv.weight"], conv.astype(np.float32))
    np.testing.assert_array_equal(exported["in_proj_weight"], packed)
    np.testing.assert_array_equal(exported["in_proj_bias"], packed_bias)
    with pytest.raises(ValueError, match=r"in_proj_bias: parts \[0, 2\] of 3"):
        export_weights([(qb, "in_proj_bias", Split(0, 3)), (vb, "in_proj_bias", Split(2, 3))])


def test_check_assigns_only_then_finish_names_the_rest():
    porter = WeightPorter({"a": np.ones(2, np.float16), "b": np.ones(3)}, source="sd")
    a = Var((2,))
    porter.port(a, "a", IDENTITY)
    porter.assign()  # "b" is still open: allowed until finish
    assert a.value.dtype == np.float32 and (a.value == 1).all()
    assert porter.unused == ["b"]
    with pytest.raises(CheckpointError, match=r"^sd: unexpected keys: b$"):
        porter.finish()


def test_check_keys_compares_two_shape_sets():
    check_keys({"a": (2,), "b": None}, {"a": (2,), "b": (9, 9)}, source="weights.h5")  # None: any shape
    with pytest.raises(CheckpointError) as info:
        check_keys({"a": (2,), "b": (3,)}, {"a": (2, 1), "c": (1,)}, source="weights.h5")
    assert str(info.value) == (
        "weights.h5: missing keys: b | mis-shaped keys: a: expected (2,), found (2, 1) | unexpected keys: c")
    check_keys({"a": (2,)}, {"a": (2,), "c": (1,)}, allow_unexpected=True)


def test_port_value_is_assigned_only_once_everything_is_checked():
    """A value the converter computed (a folded BatchNorm) waits for the checks like a ported one."""
    kernel, bias = Var((3, 2)), Var((2,))
    porter = WeightPorter({"fc.weight": torch.ones(2, 3)}, source="x.pt")
    assert porter.take("fc.weight", (2, 3)) is not None
    porter.port_value(kernel, np.full((3, 2), 2.0))
    porter.port(bias, "fc.bias")  # missing
    with pytest.raises(CheckpointError, match="missing keys: fc.bias"):
        porter.finish()
    assert (kernel.value == -7.0).all()  # nothing assigned
    with pytest.raises(ValueError, match=r"shape \(2,\) for a variable of shape \(3, 2\)"):
        porter.port_value(kernel, np.zeros(2))
    porter = WeightPorter({"fc.weight": torch.ones(2, 3)}, source="x.pt")
    porter.take("fc.weight", (2, 3))
    porter.port_value(kernel, np.full((3, 2), 2.0))
    porter.finish()
    assert (kernel.value == 2.0).all()
