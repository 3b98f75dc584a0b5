"""The attention kernel (`custom_layers.attention`) against PyTorch's ``scaled_dot_product_attention``."""

import numpy as np
import torch

from custom_layers.attention import MASK_VALUE, causal_bias, dot_product_attention, mask_bias

TOLERANCE = 1e-5


def _qkv(batch=2, tq=5, tk=7, heads=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, tq, heads, dim)).astype("float32")  # (B, Tq, H, D)
    k = rng.normal(size=(batch, heads, tk, dim)).astype("float32")  # (B, H, Tk, D)
    v = rng.normal(size=(batch, heads, tk, dim)).astype("float32")
    return q, k, v


def _torch(q, k, v, allowed=None, scale=None):
    q = torch.from_numpy(q).transpose(1, 2)  # (B, H, Tq, D)
    mask = None if allowed is None else torch.from_numpy(np.asarray(allowed))
    out = torch.nn.functional.scaled_dot_product_attention(q, torch.from_numpy(k), torch.from_numpy(v),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2).numpy()  # (B, Tq, H, D)


def test_unmasked_and_scaled():
    q, k, v = _qkv()
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v)), _torch(q, k, v), atol=TOLERANCE)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, scale=0.3)), _torch(q, k, v, scale=0.3),
                               atol=TOLERANCE)


def test_causal_bias_with_offset_queries_and_padding():
    q, k, v = _qkv(tq=3, tk=7)
    query_positions, key_positions = np.arange(4, 7), np.arange(7)  # a cached chunk at positions 4..6
    key_mask = np.ones((2, 7), bool)
    key_mask[1, 2:4] = False
    bias = np.asarray(causal_bias(query_positions, key_positions, key_mask=key_mask))
    assert bias.shape == (2, 1, 3, 7) and set(np.unique(bias)) == {0.0, MASK_VALUE}
    allowed = (key_positions[None, :] <= query_positions[:, None])[None, None] & key_mask[:, None, None, :]
    np.testing.assert_array_equal(bias == 0.0, allowed)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, bias=bias)), _torch(q, k, v, allowed),
                               atol=TOLERANCE)


def test_a_fully_masked_row_stays_finite():
    q, k, v = _qkv(tq=2, tk=4)
    allowed = np.ones((2, 1, 2, 4), bool)
    allowed[0, 0, 1] = False  # query 1 of row 0 (a pad query) sees no key at all
    out = np.asarray(dot_product_attention(q, k, v, bias=mask_bias(allowed)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], _torch(q, k, v, allowed)[1], atol=TOLERANCE)
