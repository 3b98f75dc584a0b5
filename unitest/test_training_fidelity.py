"""Training fidelity: the official optimizer, the official training step, and the way back to PyTorch.

- the default optimizer is transformers' AdamW of the official ``train.py`` (eps 1e-6, weight decay 0.0), checked
  update by update against the formula over gradients from 1e-9 to 10;
- 3 steps of our trainer give the weights of 3 official training steps in PyTorch (MLP and transformer mappers,
  prefix-only and full fine-tuning), see `testing.training_step_check`;
- ``main.py export --format official`` / `ClipCap.save_official` write a state dict that the official modules
  load with ``strict=True`` and that gives our logits; convert -> export -> convert is bit-exact.
"""

import json

import numpy as np
import pytest
import torch

from hparams.training import TrainingHParams
from testing import clipcap_official as ref
from testing.tiny_models import random_embeddings
from testing.training_step_check import compare_training_steps
from unitest.parity import torch_prefix

WEIGHT_ATOL = 1e-6  # float32: measured max 2.4e-7 (half an ulp of the largest weights, ~4)


# ------------------------------------------------------------------------------------------ optimizer


def adam_reference(p0, grads, lrs, eps, wd, decay):
    """transformers' AdamW in float64 (``decay="after"``), or with the decay before the update ("before")."""
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if decay == "before":
            p = p - lr * wd * p
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + eps)
        if decay == "after":
            p = p - lr * wd * p
    return p


def run_ours(hp, p0, grads, total_steps):
    import keras

    from custom_train_objects.optimizers import build_optimizer

    variable = keras.Variable(p0.astype(np.float32))
    optimizer = build_optimizer(hp, total_steps=total_steps)
    optimizer.build([variable])
    for g in grads:
        optimizer.apply([g.astype(np.float32)], [variable])
    return variable.numpy().astype(np.float64)


def test_defaults_are_the_official_adamw():
    hp = TrainingHParams()
    assert (hp.lr, hp.warmup_steps, hp.batch_size, hp.epochs) == (2e-5, 5000, 40, 10)
    assert (hp.epsilon, hp.weight_decay, hp.beta_1, hp.beta_2) == (1e-6, 0.0, 0.9, 0.999)
    with pytest.raises(ValueError, match="epsilon"):
        TrainingHParams(epsilon=0.0)


def test_optimizer_matches_transformers_adamw_update_by_update():
    """Gradients from 1e-9 to 10 (where eps decides the update), warmup then decay, 6 steps."""
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(0)
    n, steps, lr, warmup = 400, 6, 1e-3, 2
    p0 = rng.normal(size=n)
    scale = np.logspace(-9, 1, n)
    grads = [scale * rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.5, n) for _ in range(steps)]
    lrs = [lr * min(s / warmup, (steps - s) / (steps - warmup)) for s in range(steps)]

    # the numpy formula is the reference optimizer of the official step (PyTorch, float64)
    param = torch.nn.Parameter(torch.tensor(p0))
    official = ref.TransformersAdamW([param], lr=lr)
    schedule = get_linear_schedule_with_warmup(official, num_warmup_steps=warmup, num_training_steps=steps)
    for g in grads:
        param.grad = torch.tensor(g)
        official.step()
        schedule.step()
    expected = adam_reference(p0, grads, lrs, eps=1e-6, wd=0.0, decay="after")
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=0, atol=1e-12)

    hp = TrainingHParams(lr=lr, warmup_steps=warmup)
    ours = run_ours(hp, p0, grads, steps)
    err = np.abs(ours - expected).max()
    print(f"optimizer: max |ours - transformers.AdamW| = {err:.2e} after {steps} steps (moved up to "
          f"{np.abs(expected - p0).max():.1e})")
    assert err < 1e-6
    # the old default (torch.optim.AdamW's eps 1e-8) is off by up to ~lr where |g| is near eps
    assert np.abs(run_ours(hp.replace(epsilon=1e-8), p0, grads, steps) - expected).max() > 1e-4


def test_weight_decay_is_decoupled_and_applied_before_the_update():
    """The documented difference for weight_decay > 0: Keras decays before the Adam update (as
    torch.optim.AdamW), transformers after; the gap is lr * wd * update per step (second order)."""
    rng = np.random.default_rng(1)
    n, steps, lr, wd = 50, 4, 0.1, 0.5  # large, so that the second-order gap stands out from float32 noise
    p0 = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(steps)]
    lrs = [lr * (steps - s) / steps for s in range(steps)]
    ours = run_ours(TrainingHParams(lr=lr, warmup_steps=0, weight_decay=wd), p0, grads, steps)
    before = adam_reference(p0, grads, lrs, eps=1e-6, wd=wd, decay="before")
    after = adam_reference(p0, grads, lrs, eps=1e-6, wd=wd, decay="after")
    # float32 at lr 0.1: 1 - 0.999**t carries a relative error ~1e-5 (measured max diff 1.7e-6)
    assert np.abs(ours - before).max() < 1e-5
    assert np.abs(ours - after).max() > 1e-3


# ---------------------------------------------------------------------------------- the official step


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("prefix_only", [True, False], ids=["prefix_only", "full"])
def test_three_steps_match_the_official_training_step(kind, prefix_only, clipcap_tokenizer, tmp_path, capsys):
    """Same weights, same 3 batches: our trainer and the official step agree on every weight; the trained
    model, exported with ``main.py export``, loads strictly into the official module with our logits."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap

    normalize = kind == "transformer"  # the official --normalize_prefix, as the released transformer weights
    r = compare_training_steps(kind, prefix_only, clipcap_tokenizer, tmp_path / "run", normalize=normalize)
    print(f"{kind} {'prefix-only' if prefix_only else 'full'}: {r['steps']} steps, max |ours - official| "
          f"mapper {r['mapper_diff']:.2e}, GPT-2 {r['gpt_diff']:.2e} (weights moved up to {r['mapper_moved']:.1e}); "
          f"losses {r['losses']}")
    assert r["steps"] == 3
    assert r["mapper_diff"] <= WEIGHT_ATOL and r["gpt_diff"] <= WEIGHT_ATOL
    assert r["mapper_moved"] > 1e-3  # two steps of lr 1e-3 after the warmup step (lr 0)
    if prefix_only:  # GPT-2 frozen on both sides
        assert r["gpt_moved"] == 0.0 and r["ours_gpt_moved"] == 0.0
    else:
        assert r["gpt_moved"] > 1e-3
    np.testing.assert_allclose(*r["losses"], rtol=2e-6)

    # back to PyTorch: the model trained here, exported, in the official module
    pt = tmp_path / "export" / "trained.pt"
    args = ["export", str(tmp_path / "run" / "model"), str(pt), "--format", "official"]
    assert main(args + (["--clip-name", "ViT-B/32"] if prefix_only else [])) == 0
    out = capsys.readouterr()
    description = json.loads(pt.with_suffix(".json").read_text())
    if prefix_only:
        assert description["clip"] == "ViT-B/32" and "clip_note" not in description
    else:
        assert description["clip"] is None and "not recorded" in out.err and "clip_note" in description
    trained = ClipCap.load(str(tmp_path / "run" / "model"))
    assert description["normalize_prefix"] is normalize and description["mapping_type"] == kind
    assert_official_logits(trained, pt, description)


def official_module(description, vocab_size):
    """A fresh official ClipCaptionModel (random weights) with the architecture of an export's description."""
    from transformers import GPT2Config

    gpt = {k: description["gpt2"][k] for k in ("n_positions", "n_embd", "n_layer", "n_head")}
    return ref.ClipCaptionModel(prefix_length=description["prefix_length"],
                                clip_length=description.get("clip_length"), prefix_size=description["prefix_size"],
                                num_layers=description.get("num_layers", 8), mapping_type=description["mapping_type"],
                                gpt_config=GPT2Config(vocab_size=vocab_size, bos_token_id=vocab_size - 1,
                                                      eos_token_id=vocab_size - 1, **gpt)).eval()


def assert_official_logits(model, pt, description, atol=1e-4):
    """``pt`` loads with strict=True into the official module and gives ``model``'s logits."""
    state_dict = torch.load(str(pt), map_location="cpu", weights_only=True)
    official = official_module(description, model.gpt2.vocab_size)
    official.load_state_dict(state_dict, strict=True)
    embeddings = random_embeddings(3, model.prefix_size, seed=5)
    tokens = np.random.default_rng(6).integers(1, model.gpt2.vocab_size, size=(3, 7))
    with torch.no_grad():
        prefix = torch_prefix(official, embeddings, description["normalize_prefix"])
        embedded = torch.cat((prefix, official.gpt.transformer.wte(torch.from_numpy(tokens))), dim=1)
        expected = official.gpt(inputs_embeds=embedded).logits.numpy()
    ours = model.logits(embeddings, tokens)
    err = np.abs(ours - expected).max()
    print(f"official logits of the export: max |diff| {err:.2e}")
    assert err <= atol
    return err


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", ["mlp", "linear", "transformer"])
def test_convert_export_convert_is_bit_exact(kind, tiny_checkpoints, tiny_models, tmp_path):
    from utils.convert.clipcap import load_clipcap

    _, path = tiny_checkpoints[kind]
    original = torch.load(path, map_location="cpu", weights_only=True)  # torch's own reading: the reference
    legacy = any(k.endswith("attn.masked_bias") for k in original)  # the MLP file has the 4.11-era buffers
    model = tiny_models[kind]
    pt, sidecar = model.save_official(tmp_path / f"{kind}.pt", legacy_buffers=legacy)
    exported = torch.load(pt, map_location="cpu", weights_only=True)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    mapper, gpt2, _ = load_clipcap(pt)
    for a, b in zip(mapper.weights + gpt2.weights, model.mapper.weights + model.gpt2.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    description = json.loads(open(sidecar).read())
    assert {k: description[k] for k in ("prefix_size", "prefix_length", "mapping_type")} == {
        k: model.config[k] for k in ("prefix_size", "prefix_length", "mapping_type")}
    if not legacy:  # a file with the buffers only loads strictly into transformers <= 4.2x
        assert_official_logits(model, pt, description)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    from utils.file_utils import UnsafePathError

    before = open(pt, "rb").read()
    with pytest.raises(UnsafePathError, match="already exists"):  # an existing file needs overwrite
        model.save_official(pt, legacy_buffers=legacy)
    assert open(pt, "rb").read() == before
    model.save_official(pt, legacy_buffers=legacy, overwrite=True)
