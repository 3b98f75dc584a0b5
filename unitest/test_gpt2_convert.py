"""The GPT-2 converter: HF directories (safetensors / pytorch_model.bin), in-memory state dicts, ClipCap's
``gpt.`` prefix, legacy buffers; strict errors naming missing, unexpected and mis-shaped keys."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from unitest.parity import assert_close
from utils.convert.common import CheckpointError
from utils.convert.hf_gpt2 import (
    gpt2_checkpoint_shapes,
    gpt2_config_from_state_dict,
    gpt2_from_state_dict,
    gpt2_weight_map,
    load_gpt2,
)

# n_embd // 64 == n_head: what ClipCap's reader assumes (head_width=64); a folder or state dict without
# config.json needs n_head, as this is no released GPT-2 size
TINY = dict(vocab_size=101, n_positions=24, n_embd=128, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


@pytest.fixture()
def state_dict(torch_model):
    return {k: v.clone() for k, v in torch_model.state_dict().items()}


IDS = np.array([[5, 17, 3, 99, 42, 0], [1, 2, 3, 4, 5, 6]])


def _check_logits(keras_model, torch_model, atol=1e-4):
    with torch.no_grad():
        ref = torch_model(torch.tensor(IDS)).logits.numpy()
    assert_close(keras_model(token_ids=IDS), ref, atol, "GPT-2 logits")


def _with_legacy_buffers(sd, prefix):
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def test_config_from_state_dict(state_dict):
    # shapes give every size but n_head: known for released sizes only, or with the checkpoint's head width
    unknown = {**TINY, "n_head": None}
    assert gpt2_config_from_state_dict(state_dict) == unknown
    assert gpt2_config_from_state_dict(state_dict, head_width=64) == TINY
    assert gpt2_config_from_state_dict({"gpt." + k: v for k, v in state_dict.items()}, prefix="gpt.",
                                       head_width=64) == TINY


def test_in_memory_state_dict_with_legacy_buffers(state_dict, torch_model):
    model = load_gpt2(_with_legacy_buffers(state_dict, "transformer."), n_head=TINY["n_head"])
    assert model.get_config()["n_layer"] == 2
    _check_logits(model, torch_model)


def test_gpt2model_layout_without_transformer_prefix(torch_model):
    _check_logits(load_gpt2(torch_model.transformer.state_dict(), n_head=TINY["n_head"]), torch_model)


def test_hf_directory_safetensors_and_config(tmp_path, torch_model):
    torch_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    _check_logits(load_gpt2(tmp_path), torch_model)


def test_hf_directory_bin_config_n_head(tmp_path):
    # n_head != n_embd // 64: only config.json can tell; the logits prove it was used
    torch.manual_seed(1)
    config = GPT2Config(**{**TINY, "n_head": 4}, layer_norm_epsilon=1e-6)
    model = GPT2LMHeadModel(config).eval()
    config.to_json_file(str(tmp_path / "config.json"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    keras_model = load_gpt2(tmp_path)
    assert keras_model.n_head == 4 and keras_model.layer_norm_epsilon == 1e-6
    _check_logits(keras_model, model)


def test_clipcap_prefix_returns_used_keys(state_dict, torch_model):
    sd = {"gpt." + k: v for k, v in _with_legacy_buffers(state_dict, "transformer.").items()}
    sd["clip_project.model.0.weight"] = torch.zeros(3, 3)  # outside the prefix: the caller's business
    model, used = gpt2_from_state_dict(sd, prefix="gpt.", head_width=64)
    assert used == set(sd) - {"clip_project.model.0.weight"}
    _check_logits(model, torch_model)


def test_fp16_weights_become_fp32(state_dict):
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    model = load_gpt2(half, n_head=TINY["n_head"])
    assert all(w.dtype == "float32" for w in model.weights)
    torch.manual_seed(0)
    rounded = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    _check_logits(model, rounded)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_strict_errors_name_the_key(tmp_path, state_dict, fmt):
    del state_dict["transformer.h.1.mlp.c_fc.bias"]
    state_dict["transformer.h.0.attn.extra_scale"] = torch.ones(3)
    state_dict["transformer.ln_f.weight"] = torch.ones(TINY["n_embd"] + 1)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items() if k != "lm_head.weight"},
                  str(tmp_path / "model.safetensors"))
    else:
        torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_gpt2(tmp_path, n_head=TINY["n_head"])
    message = str(info.value)
    assert "missing keys: transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected keys: transformer.h.0.attn.extra_scale" in message
    assert "transformer.ln_f.weight: expected (128,), found (129,)" in message


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("transformer.h.0.attn.c_proj.weight"), "missing keys: transformer.h.0.attn.c_proj.weight"),
        (lambda sd: sd.update({"transformer.h.1.unknown": torch.ones(1)}), "unexpected keys: transformer.h.1.unknown"),
        (lambda sd: sd.update({"transformer.h.1.attn.c_attn.weight": torch.ones(384, 128)}),
         "transformer.h.1.attn.c_attn.weight: expected (128, 384), found (384, 128)"),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
def test_each_defect_alone_is_named(state_dict, edit, key):
    edit(state_dict)
    with pytest.raises(CheckpointError, match=key.replace("(", r"\(").replace(")", r"\)")):
        load_gpt2(state_dict, n_head=TINY["n_head"])


def test_unknown_key_under_clipcap_prefix_raises(state_dict):
    sd = {"gpt." + k: v for k, v in state_dict.items()}
    sd["gpt.transformer.h.0.mlp.c_fc.lora"] = torch.ones(2)
    with pytest.raises(CheckpointError, match=r"unexpected keys: gpt\.transformer\.h\.0\.mlp\.c_fc\.lora"):
        gpt2_from_state_dict(sd, prefix="gpt.", head_width=64)


def test_untied_lm_head_raises(state_dict):
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_gpt2(state_dict, n_head=TINY["n_head"])


def test_bad_sources(tmp_path, state_dict):
    with pytest.raises(CheckpointError, match="not found"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_gpt2(tmp_path)
    with pytest.raises(CheckpointError, match="no GPT-2 token embedding"):
        load_gpt2({"encoder.weight": torch.ones(2)})


def test_unsupported_config_option_raises(tmp_path, torch_model):
    torch_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function='relu' is not supported"):
        load_gpt2(tmp_path)


def test_folder_without_config_json_needs_n_head(tmp_path, torch_model):
    # a size that is not a released GPT-2's: its head count is an error naming what is missing, not a guess
    torch_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json.*n_head.*cannot be inferred.*n_embd=128, n_layer=2"):
        load_gpt2(tmp_path)
    with pytest.raises(CheckpointError, match="n_head"):
        load_gpt2(torch_model.state_dict())
    _check_logits(load_gpt2(tmp_path, n_head=TINY["n_head"]), torch_model)  # given by the caller: loads


# ------------------------------------------------------------------ checked before the model is built


@pytest.fixture()
def no_build(monkeypatch):
    """GPT2's constructor replaced by one that fails the test: the checks below must come before any build."""
    from custom_architectures.transformers_arch import gpt2_arch

    def refuse(**config):
        raise AssertionError(f"a GPT2 was built from a checkpoint that should have been refused: {config}")

    monkeypatch.setattr(gpt2_arch, "GPT2", refuse)


def test_checkpoint_shape_table_is_the_weight_map():
    """`gpt2_checkpoint_shapes` (shape arithmetic, checked before building) is what `gpt2_weight_map` of a built
    model asks for, key by key, shape by shape, in order; and every weight of the model is in it."""
    from custom_architectures.transformers_arch.gpt2_arch import GPT2

    model = GPT2(**TINY)
    for inner in ("transformer.", "gpt.transformer.", ""):
        table = {key: hook.checkpoint_shape(tuple(variable.shape))
                 for variable, key, hook in gpt2_weight_map(model, inner)}
        assert list(gpt2_checkpoint_shapes(TINY, inner).items()) == list(table.items())
    assert sum(int(np.prod(s)) for s in gpt2_checkpoint_shapes(TINY).values()) == model.count_params()


def test_a_stray_block_index_is_refused_before_building(state_dict, no_build):
    """One key of block 2000 would ask for 2001 blocks (~56 GB at GPT-2's width): the block indices must be
    0..n_layer-1, checked before anything is built."""
    alone = {k: state_dict[k] for k in ("transformer.wte.weight", "transformer.wpe.weight")}
    alone["transformer.h.2000.ln_1.weight"] = torch.ones(TINY["n_embd"])
    with pytest.raises(CheckpointError, match=r"not numbered 0\.\.N-1.*2000"):
        gpt2_from_state_dict(alone, n_head=2)
    state_dict["transformer.h.7.ln_1.weight"] = torch.ones(TINY["n_embd"])  # a whole model and one stray key
    with pytest.raises(CheckpointError, match=r"not numbered 0\.\.N-1.*7"):
        load_gpt2(state_dict, n_head=2)
    clipcap = {"gpt." + k: v for k, v in alone.items()}
    with pytest.raises(CheckpointError, match=r"ClipCap file: .*not numbered"):
        gpt2_from_state_dict(clipcap, prefix="gpt.", source="ClipCap file", head_width=64)


def test_every_block_key_is_checked_before_building(state_dict, no_build):
    """Blocks 0..N-1 each present by one key only: every key the config implies, missing or mis-shaped, is
    named before a model is built (plain shape arithmetic from the embeddings' width)."""
    sparse = {k: v for k, v in state_dict.items() if not k.startswith("transformer.h.1.") or k.endswith("ln_1.weight")}
    sparse["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(TINY["n_embd"], 3 * TINY["n_embd"])
    del sparse["transformer.ln_f.bias"]
    with pytest.raises(CheckpointError) as info:
        load_gpt2(sparse, n_head=2)
    message = str(info.value)
    for key in ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias"):
        assert key in message.split("missing keys: ")[1].split(" | ")[0]
    assert "mis-shaped keys: transformer.h.0.mlp.c_fc.weight: expected (128, 512), found (128, 384)" in message


@pytest.mark.parametrize("key, value, expected", [
    ("transformer.wte.weight", torch.zeros(101), r"transformer\.wte\.weight has shape \(101,\) \(1-D\), expected a 2-D"),
    ("transformer.wte.weight", torch.zeros(101, 0), r"transformer\.wte\.weight has shape \(101, 0\): every dimension"),
    ("transformer.wpe.weight", torch.zeros(()), r"transformer\.wpe\.weight has shape \(\) \(0-D\), expected a 2-D"),
    ("transformer.wpe.weight", None, r"missing keys: transformer\.wpe\.weight"),
])
def test_malformed_embeddings_are_named(state_dict, no_build, key, value, expected):
    if value is None:
        del state_dict[key]
    else:
        state_dict[key] = value
    with pytest.raises(CheckpointError, match=expected):
        load_gpt2(state_dict, n_head=2)
