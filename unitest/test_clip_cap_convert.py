"""Official ClipCap checkpoints -> Keras: inferred architecture, numerics at real and tiny sizes, strictness.

Random-weight official-format ``.pt`` files (``torch.save(ClipCaptionModel.state_dict())``) for the MLP,
the legacy single-Linear and the transformer mappers; prefix embeddings and teacher-forced logits must match
the PyTorch reference to 1e-4.
"""

import numpy as np
import pytest
import torch

from testing import clipcap_official as ref
from testing.tiny_models import KINDS, random_embeddings
from unitest.parity import max_abs_diff, torch_prefix
from utils.convert.clipcap import (
    MAPPER_FORMATS,
    check_clipcap_checkpoint,
    clipcap_config_from_state_dict,
    load_clipcap,
)
from utils.convert.common import CheckpointError


def compare(torch_model, model, n=2, t=5, seed=0):
    """Max abs differences of the prefix and of the teacher-forced logits (N, K+T, V)."""
    normalize = model.config["normalize_prefix"]
    embeddings = random_embeddings(n, model.prefix_size, seed)
    ids = np.random.default_rng(seed).integers(0, model.gpt2.vocab_size, size=(n, t)).astype(np.int64)
    prefix = torch_prefix(torch_model, embeddings, normalize)
    with torch.no_grad():
        e = torch.from_numpy(embeddings)
        logits = torch_model(torch.from_numpy(ids), ref.normalize_embedding(e) if normalize else e).numpy()
    got_prefix, got_logits = model.prefix(embeddings), model.logits(embeddings, ids)
    assert got_logits.shape == logits.shape == (n, model.prefix_length + t, model.gpt2.vocab_size)
    assert np.abs(logits).std() > 0.1  # not a degenerate model
    return max_abs_diff(got_prefix, prefix), max_abs_diff(got_logits, logits)


@pytest.mark.parametrize("kind", KINDS)
def test_real_size_prefix_and_logits(kind, real_checkpoints, real_models):
    prefix_diff, logits_diff = compare(real_checkpoints[kind][0], real_models[kind])
    print(f"[parity] ClipCap real {kind}: prefix {prefix_diff:.2e}, logits {logits_diff:.2e}")
    assert prefix_diff <= 1e-4 and logits_diff <= 1e-4, (prefix_diff, logits_diff)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_prefix_and_logits(kind, tiny_checkpoints, tiny_models):
    prefix_diff, logits_diff = compare(tiny_checkpoints[kind][0], tiny_models[kind], n=3, t=7)
    print(f"[parity] ClipCap tiny {kind}: prefix {prefix_diff:.2e}, logits {logits_diff:.2e}")
    assert prefix_diff <= 1e-4 and logits_diff <= 1e-4, (prefix_diff, logits_diff)


def test_real_sizes_are_inferred(real_models):
    mlp, linear, transformer = (real_models[k].config for k in KINDS)
    assert (mlp["mapping_type"], mlp["prefix_length"], mlp["prefix_size"], mlp["normalize_prefix"]) == (
        "mlp", 10, 512, False)
    assert (linear["mapping_type"], linear["prefix_length"], linear["prefix_size"]) == ("linear", 40, 512)
    assert not linear["normalize_prefix"]
    assert (transformer["mapping_type"], transformer["prefix_length"], transformer["clip_length"],
            transformer["num_layers"], transformer["prefix_size"], transformer["normalize_prefix"]) == (
        "transformer", 40, 40, 8, 640, True)
    assert transformer["gpt2"] == dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                       layer_norm_epsilon=1e-5)


def test_normalisation_policy_matters(tiny_checkpoints, tiny_models):
    """The transformer prefix depends only on the embedding's direction; the MLP one on its norm too."""
    e = random_embeddings(1, tiny_models["mlp"].prefix_size)
    for kind, scale_invariant in (("transformer", True), ("mlp", False)):
        model = tiny_models[kind]
        same = np.allclose(model.prefix(e), model.prefix(3 * e), atol=1e-5)
        assert same == scale_invariant, kind


def test_state_dict_keys_are_the_official_ones(tiny_checkpoints):
    keys = set(torch.load(tiny_checkpoints["transformer"][1], weights_only=True))
    assert {"clip_project.prefix_const", "clip_project.linear.weight", "gpt.lm_head.weight",
            "gpt.transformer.wte.weight", "clip_project.transformer.layers.1.attn.to_keys_values.weight",
            "clip_project.transformer.layers.0.mlp.fc2.bias"} <= keys
    assert "clip_project.transformer.layers.0.attn.to_queries.bias" not in keys  # bias-free, as released
    legacy = set(torch.load(tiny_checkpoints["mlp"][1], weights_only=True))
    assert {"gpt.transformer.h.0.attn.bias", "gpt.transformer.h.1.attn.masked_bias"} <= legacy


@pytest.fixture(scope="module")
def tiny_state(tiny_checkpoints):
    return {k: torch.load(p, weights_only=True) for k, (_, p) in tiny_checkpoints.items()}


def test_config_inference_tiny(tiny_state):
    assert clipcap_config_from_state_dict(tiny_state["linear"])["mapping_type"] == "linear"
    config = clipcap_config_from_state_dict(tiny_state["transformer"])
    assert (config["prefix_length"], config["clip_length"], config["num_layers"], config["mlp_ratio"]) == (
        5, 3, 2, 2.0)


def test_truncated_file(tiny_checkpoints, tmp_path):
    data = open(tiny_checkpoints["mlp"][1], "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clipcap(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_clipcap(empty)


def test_unrelated_state_dicts(tmp_path):
    resnet_like = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}
    torch.save(resnet_like, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a ClipCap checkpoint.*found keys like conv1\.weight"):
        load_clipcap(tmp_path / "other.pt")
    gpt_only = {f"gpt.{k}": v for k, v in ref.build_random_clipcap("mlp", "tiny").gpt.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"no clip_project\.\* keys"):
        load_clipcap(gpt_only)


def test_unexpected_missing_and_misshaped_keys_are_named(tiny_state):
    extra = dict(tiny_state["mlp"], **{"clip_project.extra.weight": torch.zeros(2), "optimizer.step": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: clip_project\.extra\.weight, optimizer\.step"):
        load_clipcap(extra)
    missing = {k: v for k, v in tiny_state["transformer"].items()
               if k != "clip_project.transformer.layers.1.norm2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: clip_project\.transformer\.layers\.1\.norm2\.bias"):
        load_clipcap(missing)
    gpt_missing = {k: v for k, v in tiny_state["mlp"].items() if k != "gpt.transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match=r"gpt\.transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_clipcap(gpt_missing)
    bad = dict(tiny_state["mlp"])
    bad["clip_project.model.2.bias"] = bad["clip_project.model.2.bias"][:-1]
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: clip_project\.model\.2\.bias"):
        load_clipcap(bad)
    not_multiple = dict(tiny_state["linear"])
    not_multiple["clip_project.weight"] = not_multiple["clip_project.weight"][:-1]
    not_multiple["clip_project.bias"] = not_multiple["clip_project.bias"][:-1]
    with pytest.raises(CheckpointError, match="not a multiple of GPT-2's width"):
        load_clipcap(not_multiple)


def test_mismatched_clip_is_refused(tiny_checkpoints, gpt2_tokenizer_dir, tmp_path):
    """A real (tiny, 32-d) OpenAI-format CLIP file against a mapper expecting 24-d embeddings."""
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import EMBED_DIM, build_tiny_clip

    clip_path = build_tiny_clip(tmp_path / "tiny_clip.pt")
    prefix_size = ref.SIZES["tiny"]["mlp"]["prefix_size"]
    assert EMBED_DIM != prefix_size
    with pytest.raises(CheckpointError, match=rf"{EMBED_DIM}-d image embeddings.*prefix_size={prefix_size}"):
        ClipCap.from_pretrained(tiny_checkpoints["mlp"][1], clip=clip_path, tokenizer=gpt2_tokenizer_dir)


# ------------------------------------------------------------------ checked before the model is built


@pytest.fixture()
def no_build(monkeypatch):
    """Building a mapper or a GPT-2 fails the test: the checks below must come before any build."""
    from custom_architectures.transformers_arch import clip_cap_arch, gpt2_arch

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was built from a checkpoint that should have been refused: {args} {kwargs}")

    monkeypatch.setattr(clip_cap_arch, "build_mapper", refuse)
    monkeypatch.setattr(gpt2_arch, "GPT2", refuse)


def test_mapper_parameter_counts_are_the_built_mappers(tiny_models):
    """`MapperFormat.parameters` (shape arithmetic, checked before building) counts what the mapper holds."""
    for kind in MAPPER_FORMATS:
        mapper = tiny_models[kind].backbone.mapper
        config = {**mapper.get_config(), "mapping_type": kind}
        assert MAPPER_FORMATS[kind].parameters(config) == mapper.count_params(), kind


def test_stray_mapper_layers_are_refused_before_building(tiny_state, no_build):
    """Layers 2..999 of the transformer mapper, each one 1-element key: 1000 layers of the GPT-2's width from
    a file of a few tensors; refused before the mapper is built."""
    stray = dict(tiny_state["transformer"])
    for i in range(2, 1000):
        stray[f"clip_project.transformer.layers.{i}.norm1.weight"] = torch.ones(1)
    assert clipcap_config_from_state_dict(stray)["num_layers"] == 1000
    with pytest.raises(CheckpointError, match=r"state dict: the transformer mapper .* weights, but its tensors hold"):
        load_clipcap(stray)


def test_stray_gpt2_block_is_refused_before_building(tiny_state, no_build):
    stray = dict(tiny_state["mlp"])
    stray["gpt.transformer.h.2000.ln_1.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"not numbered 0\.\.N-1.*2000"):
        load_clipcap(stray)


@pytest.mark.parametrize("kind, key, value, expected", [
    ("linear", "gpt.transformer.wte.weight", torch.zeros(8), r"gpt\.transformer\.wte\.weight has shape \(8,\) \(1-D\), "
     r"expected a 2-D"),
    ("linear", "gpt.transformer.wte.weight", torch.zeros(8, 0), r"gpt\.transformer\.wte\.weight has shape \(8, 0\): every"),
    ("transformer", "clip_project.prefix_const", torch.zeros(2, 2, 4),
     r"clip_project\.prefix_const has shape \(2, 2, 4\) \(3-D\), expected a 2-D"),
    ("transformer", "clip_project.linear.weight", torch.zeros(0, 4), r"clip_project\.linear\.weight has shape \(0, 4\)"),
    ("transformer", "clip_project.linear.weight", None, r"missing keys: clip_project\.linear\.weight"),
    ("mlp", "clip_project.model.2.weight", torch.zeros(3), r"clip_project\.model\.2\.weight has shape \(3,\) \(1-D\)"),
    ("mlp", "gpt.transformer.wpe.weight", torch.zeros(()), r"gpt\.transformer\.wpe\.weight has shape \(\) \(0-D\)"),
])
def test_malformed_shapes_are_named(tiny_state, tmp_path, no_build, kind, key, value, expected):
    """A crafted shape is a `CheckpointError` naming the key and the rank expected (never an IndexError,
    ZeroDivisionError or unpacking error), from the download check (shapes only) and from the converter."""
    state = dict(tiny_state[kind])
    if value is None:
        del state[key]
    else:
        state[key] = value
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    for read in (check_clipcap_checkpoint, load_clipcap):
        with pytest.raises(CheckpointError, match=expected):
            read(path)
