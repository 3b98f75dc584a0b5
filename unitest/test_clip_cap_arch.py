"""ClipCap mappers (MLP, legacy single Linear, transformer) against the official PyTorch modules.

Random weights at the released sizes and at tiny sizes; outputs must agree to 1e-4 (fp32).
"""

import numpy as np
import pytest
import torch

from custom_architectures.transformers_arch.clip_cap_arch import (
    ClipCapMLP,
    ClipCapTransformerMapper,
    build_mapper,
)
from testing import clipcap_official as ref
from unitest.parity import assert_close
from utils.convert.clipcap import mapper_from_state_dict
from utils.convert.porting import WeightPorter

# (kind, n_embd, mapper kwargs of the reference ClipCaptionModel)
CASES = {
    "mlp-real": ("mlp", 768, dict(prefix_length=10, prefix_size=512)),
    "linear-real": ("linear", 768, dict(prefix_length=40, prefix_size=512)),
    "transformer-real": ("transformer", 768, dict(prefix_length=40, clip_length=40, prefix_size=640, num_layers=8)),
    "mlp-tiny": ("mlp", 32, dict(prefix_length=4, prefix_size=24)),
    "linear-tiny": ("linear", 32, dict(prefix_length=12, prefix_size=24)),
    "transformer-tiny": ("transformer", 32, dict(prefix_length=5, clip_length=3, prefix_size=24, num_layers=2)),
}


def torch_mapper(kind, n_embd, kw, seed=0):
    torch.manual_seed(seed)
    k, d = kw["prefix_length"], kw["prefix_size"]
    if kind == "mlp":
        module = ref.MLP((d, k * n_embd // 2, k * n_embd))
    elif kind == "linear":
        module = torch.nn.Linear(d, k * n_embd)
    else:
        module = ref.TransformerMapper(d, n_embd, k, kw["clip_length"], kw["num_layers"])
        with torch.no_grad():  # non-trivial LayerNorm affine parameters
            for m in module.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.add_(0.2 * torch.randn_like(m.weight))
                    m.bias.add_(0.2 * torch.randn_like(m.bias))
    return module.eval()


def keras_config(kind, n_embd, kw):
    config = {"mapping_type": kind, "n_embd": n_embd, **kw}
    if kind == "transformer":
        config.update(num_heads=8, mlp_ratio=2.0)
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_mapper_matches_official(case):
    kind, n_embd, kw = CASES[case]
    module = torch_mapper(kind, n_embd, kw)
    state = {f"clip_project.{k}": v for k, v in module.state_dict().items()}
    sd = WeightPorter(state, source=case)
    mapper = mapper_from_state_dict(sd, keras_config(kind, n_embd, kw))
    sd.finish()  # every mapper tensor consumed
    x = np.random.default_rng(1).normal(size=(3, kw["prefix_size"])).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).reshape(3, kw["prefix_length"], n_embd).numpy()
    got = np.asarray(mapper(x))
    assert got.shape == (3, kw["prefix_length"], n_embd)
    assert_close(got, expected, 1e-4, f"mapper {case}")
    assert np.abs(expected).mean() > 1e-2  # a meaningful output, not all zeros


def test_prefix_token_j_is_feature_slice_j():
    """MLP output features [C*j, C*j + C) form prefix token j (the official .view(-1, K, C))."""
    mapper = ClipCapMLP(prefix_size=6, prefix_length=3, n_embd=4, num_hidden_layers=0)
    mapper.linear.set_weights([np.eye(6, 12, dtype=np.float32), np.zeros(12, np.float32)])
    out = np.asarray(mapper(np.arange(6, dtype=np.float32)[None]))
    np.testing.assert_array_equal(out[0], np.array([[0, 1, 2, 3], [4, 5, 0, 0], [0, 0, 0, 0]], np.float32))


def test_transformer_output_is_last_k_positions_and_has_no_positions():
    """Permuting nothing but the learned constants' order permutes the output the same way: no positional
    embedding, no mask (the official mapper is permutation-equivariant over its K constant positions)."""
    mapper = ClipCapTransformerMapper(prefix_size=8, prefix_length=4, clip_length=2, n_embd=16, num_layers=2)
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    out = np.asarray(mapper(x))
    perm = [2, 0, 3, 1]
    mapper.prefix_const.assign(np.asarray(mapper.prefix_const)[perm])
    np.testing.assert_allclose(np.asarray(mapper(x)), out[:, perm], atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "linear", "transformer"])
def test_get_config_round_trip(kind):
    kw = dict(prefix_size=8, prefix_length=3, n_embd=16)
    if kind == "transformer":
        kw.update(clip_length=2, num_layers=2, num_heads=4, mlp_ratio=2.0)
    mapper = build_mapper(kind, **kw)
    clone = type(mapper).from_config(mapper.get_config())
    assert clone.get_config() == mapper.get_config()
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in mapper.weights]
    clone.set_weights(mapper.get_weights())
    x = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(mapper(x)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ClipCapMLP(num_hidden_layers=2)
    with pytest.raises(ValueError, match="not divisible"):
        ClipCapTransformerMapper(prefix_size=8, prefix_length=2, clip_length=2, n_embd=20, num_layers=1, num_heads=8)
    with pytest.raises(ValueError, match="mapping_type"):
        build_mapper("lstm")
