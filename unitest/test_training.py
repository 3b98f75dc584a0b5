"""Training: loss, schedule, hyper-parameters, learning the synthetic shapes, prefix-only, exact resume,
tf.distribute on two logical CPUs, mixed precision, and the extract / train / evaluate commands."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_train_objects.losses import caption_loss, caption_loss_sum
from custom_train_objects.model_factory import build_clipcap_for_training
from custom_train_objects.schedules import LinearWarmupDecay
from custom_train_objects.trainer import Trainer, TrainingStopped
from datasets.synthetic_shapes import make_shapes_dataset, shape_features, train_shapes_tokenizer
from hparams.training import TrainingHParams
from loggers.training_loggers import LoggerList

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT2 = dict(n_positions=48, n_embd=64, n_layer=2, n_head=4)
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
PREFIX = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes_dataset(root / "train", num_images=600, seed=0, image_size=32)
    test = make_shapes_dataset(root / "test", num_images=60, seed=1, image_size=32)
    features = [shape_features([Image.open(p) for p in d.images]) for d in (train, test)]
    return {"train": train, "test": test, "train_emb": features[0], "test_emb": features[1],
            "tokenizer": train_shapes_tokenizer(root / "tokenizer"), "root": root}


def quiet():
    return LoggerList([])


def tiny_model(shapes, hp, dropout=True, clip=None, prefix_size=70):
    config = dict(TINY_GPT2, **({} if dropout else NO_DROPOUT))
    return build_clipcap_for_training(hp, prefix_size=prefix_size, tokenizer=shapes["tokenizer"],
                                      gpt2_config=config, clip=clip, name="shapes")


def small_hp(**overrides):
    base = dict(lr=3e-3, warmup_steps=20, batch_size=20, epochs=2, prefix_length=PREFIX, log_every=1)
    return TrainingHParams(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------- pieces


def test_loss_masks_prefix_and_padding_and_keeps_token_zero():
    rng = np.random.default_rng(0)
    k, t, v = 3, 4, 7
    logits = rng.normal(size=(2, k + t, v)).astype(np.float32)
    tokens = np.array([[0, 5, 0, 2], [6, 0, 1, 1]], np.int32)  # id 0 is a real token
    mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [-log_probs[b, k - 1 + j, tokens[b, j]] for b in range(2) for j in range(t) if mask[b, k + j]]
    total, count = caption_loss_sum(logits, tokens, mask, k)
    assert float(count) == 5 and float(total) == pytest.approx(sum(expected), rel=1e-5)
    assert float(caption_loss(logits, tokens, mask, k)) == pytest.approx(np.mean(expected), rel=1e-5)
    # the official loss (ignore_index=0) drops the real zeros: 3 of these 5 tokens
    official = torch.nn.functional.cross_entropy(torch.tensor(logits[:, k - 1 : -1]).reshape(-1, v),
                                                 torch.tensor(tokens * mask[:, k:].astype(np.int32)).long().flatten(),
                                                 ignore_index=0)
    assert float(official) != pytest.approx(np.mean(expected), rel=1e-3)


def test_schedule_matches_transformers_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=2e-5)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=30)
    ours = LinearWarmupDecay(2e-5, 7, 30)
    for step in range(33):
        assert float(ours(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()


def test_hparams_defaults_json_and_cli(tmp_path):
    import argparse

    hp = TrainingHParams()
    assert (hp.lr, hp.warmup_steps, hp.batch_size, hp.epochs, hp.prefix_length, hp.mapping_type) == (
        2e-5, 5000, 40, 10, 10, "mlp")
    path = hp.replace(prefix_only=True, gradient_clip_norm=1.0).save(tmp_path / "hp.json")
    assert TrainingHParams.load(path) == hp.replace(prefix_only=True, gradient_clip_norm=1.0)
    parser = argparse.ArgumentParser()
    TrainingHParams.add_arguments(parser)
    args = parser.parse_args(["--hparams", str(path), "--lr", "1e-3", "--no-prefix-only", "--mapping-type",
                              "transformer", "--max-length", "20"])
    got = TrainingHParams.from_args(args)
    assert (got.lr, got.prefix_only, got.mapping_type, got.max_length, got.gradient_clip_norm) == (
        1e-3, False, "transformer", 20, 1.0)
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        TrainingHParams.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="mapping_type"):
        TrainingHParams(mapping_type="lstm")


# ------------------------------------------------------------------------------------------- training


def exact_match(model, embeddings, captions):
    out = model.generate(embeddings, method="greedy", max_length=24)
    predicted = [candidates[0]["text"].strip() for candidates in out]
    return float(np.mean([p == c for p, c in zip(predicted, captions)])), predicted


def test_learns_synthetic_shapes_and_saves_a_normal_clipcap(shapes, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    hp = small_hp(epochs=14, lr=3e-3, log_every=10)
    model = tiny_model(shapes, hp)
    start = time.perf_counter()
    history = Trainer(model, hp, tmp_path / "run", loggers=quiet(), progress=False).fit(
        shapes["train"], shapes["train_emb"], val_dataset=shapes["test"], val_embeddings=shapes["test_emb"])
    seconds = time.perf_counter() - start
    print(f"shapes training: {len(history['loss'])} steps in {seconds:.1f} s, "
          f"val loss {history['epochs'][-1]['val_loss']:.4f}")
    assert seconds < 180
    assert history["epochs"][-1]["val_loss"] < 0.1 < history["epochs"][0]["loss"]
    loaded = ClipCap.load(str(tmp_path / "run" / "model"))
    accuracy, predicted = exact_match(loaded, shapes["test_emb"], shapes["test"].captions)
    print(f"held-out exact match: {accuracy:.3f}; e.g. {predicted[:2]}")
    assert accuracy >= 0.95
    # the in-memory model received the trained weights too
    for a, b in zip(model.gpt2.weights, loaded.gpt2.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_prefix_only_leaves_gpt2_bit_identical(shapes, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    hp = small_hp(prefix_only=True, epochs=1, weight_decay=0.1)
    model = tiny_model(shapes, hp)  # dropout rates > 0: prefix-only must still run GPT-2 in inference mode
    # every variable: weights and the dropout layers' seed states (they would move if dropout ran)
    gpt2_before = [v.numpy().copy() for v in model.gpt2.variables]
    weights_before = [v.numpy().copy() for v in model.gpt2.weights]
    mapper_before = [v.numpy().copy() for v in model.mapper.weights]
    history = Trainer(model, hp, tmp_path / "run", loggers=quiet(), progress=False).fit(
        shapes["train"], shapes["train_emb"])
    assert history["loss"][-1] < history["loss"][0]
    for before, v in zip(gpt2_before, model.gpt2.variables, strict=True):
        np.testing.assert_array_equal(before, v.numpy(), err_msg=v.path)
    loaded = ClipCap.load(str(tmp_path / "run" / "model"))
    for before, v in zip(weights_before, loaded.gpt2.weights, strict=True):
        np.testing.assert_array_equal(before, v.numpy(), err_msg=v.path)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(mapper_before, loaded.mapper.weights))


def test_resume_continues_the_same_loss_curve(shapes, tmp_path):
    hp = small_hp(epochs=2, checkpoint_every_steps=7)
    sub = shapes["train"].select_images(range(200))
    emb = shapes["train_emb"][:200]
    steps_per_epoch = len(sub) // hp.batch_size  # 10
    straight_model = tiny_model(shapes, hp)
    straight = Trainer(straight_model, hp, tmp_path / "a", progress=False).fit(sub, emb)
    run = tmp_path / "b"
    for stop in (10, 13):  # the end of epoch 1, then in the middle of epoch 2 (after the step-7 checkpoint)
        with pytest.raises(TrainingStopped):
            Trainer(tiny_model(shapes, hp), hp, run, progress=False).fit(sub, emb, stop_after_steps=stop)
    # a fresh process would build a fresh model: the checkpoint brings weights, optimizer, seeds, position
    other_init = tiny_model(shapes, hp.replace(seed=1))  # different initial weights: overwritten by resume
    with pytest.raises(ValueError, match="hyper-parameters differ: seed"):
        Trainer(other_init, hp.replace(seed=1), run, progress=False).fit(sub, emb)
    resumed = Trainer(other_init, hp, run, progress=False).fit(sub, emb)
    assert len(straight["loss"]) == 2 * steps_per_epoch
    assert resumed["loss"] == straight["loss"]  # bit for bit, dropout included
    assert [r["loss"] for r in resumed["epochs"]] == [r["loss"] for r in straight["epochs"]]
    for a, b in zip(straight_model.gpt2.weights + straight_model.mapper.weights,
                    other_init.gpt2.weights + other_init.mapper.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with open(run / "logs" / "steps.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, 2 * steps_per_epoch + 1))  # the rows of the interrupted part are not repeated
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import torch, torchvision  # before TensorFlow (see conftest)
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    from transformers import GPT2TokenizerFast
    from custom_train_objects.model_factory import build_clipcap_for_training
    from custom_train_objects.trainer import Trainer
    from datasets.caption_dataset import CaptionDataset
    from hparams.training import TrainingHParams
    from loggers.training_loggers import LoggerList
    out = sys.argv[2]
    data = np.load(os.path.join(out, "data.npz"))
    dataset = CaptionDataset(list(data["images"]), list(range(len(data["images"]))), list(data["captions"]),
                             data["image_index"])
    tokenizer = GPT2TokenizerFast.from_pretrained(os.path.join(out, "tokenizer"))
    hp = TrainingHParams(**json.loads(sys.argv[3]))
    gpt2_config = json.loads(sys.argv[4])
    losses = {}
    for name, strategy in (("single", None), ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        model = build_clipcap_for_training(hp, prefix_size=data["embeddings"].shape[1], tokenizer=tokenizer,
                                           gpt2_config=gpt2_config)
        trainer = Trainer(model, hp, os.path.join(out, name), strategy=strategy, loggers=LoggerList([]),
                          progress=False)
        losses[name] = trainer.fit(dataset, data["embeddings"])["loss"]
        losses[name + "_replicas"] = trainer.strategy.num_replicas_in_sync
        losses[name + "_weights"] = float(sum(np.abs(v.numpy()).sum() for v in model.gpt2.weights))
    print("RESULT" + json.dumps(losses))
""")


def test_mirrored_strategy_on_two_logical_cpus_matches_one_device(shapes, tmp_path):
    """Two replicas of half the batch each give the single-device losses and weights (no dropout)."""
    sub = shapes["train"].select_images(range(120))
    np.savez(tmp_path / "data.npz", images=np.asarray(sub.images), captions=np.asarray(sub.captions),
             image_index=sub.image_index, embeddings=shapes["train_emb"][:120])
    shapes["tokenizer"].save_pretrained(str(tmp_path / "tokenizer"))
    hp = small_hp(epochs=2, gradient_clip_norm=0.5).to_dict()
    proc = subprocess.run([sys.executable, "-c", DISTRIBUTED_SCRIPT, str(ROOT), str(tmp_path), json.dumps(hp),
                           json.dumps(dict(TINY_GPT2, **NO_DROPOUT))], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT"):])
    assert result["single_replicas"] == 1 and result["mirrored_replicas"] == 2
    assert len(result["mirrored"]) == 12
    np.testing.assert_allclose(result["mirrored"], result["single"], rtol=1e-5, atol=1e-5)
    assert result["mirrored_weights"] == pytest.approx(result["single_weights"], rel=1e-5)
    assert result["single"][-1] < result["single"][0]


def test_mixed_precision_trains_with_float32_weights(shapes, tmp_path):
    sub = shapes["train"].select_images(range(60))
    for policy in ("mixed_bfloat16", "mixed_float16"):
        hp = small_hp(epochs=1, mixed_precision=policy, gradient_clip_norm=1.0)
        model = tiny_model(shapes, hp)
        trainer = Trainer(model, hp, tmp_path / policy, loggers=quiet(), progress=False)
        losses = trainer.fit(sub, shapes["train_emb"][:60])["loss"]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        # the trained copies compute in the policy's dtype, with float32 variables
        assert trainer.gpt2.dtype_policy.name == trainer.mapper.dtype_policy.name == policy
        assert all(v.dtype == "float32" for v in trainer.gpt2.weights + trainer.mapper.weights)
        assert all(v.dtype == "float32" for v in model.gpt2.weights + model.mapper.weights)


def test_transformer_mapper_with_normalized_prefix(shapes, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    hp = small_hp(epochs=1, mapping_type="transformer", clip_length=2, num_layers=1, num_heads=2, normalize=True)
    model = tiny_model(shapes, hp)
    sub = shapes["train"].select_images(range(60))
    losses = Trainer(model, hp, tmp_path / "run", loggers=quiet(), progress=False).fit(
        sub, shapes["train_emb"][:60])["loss"]
    assert losses[-1] < losses[0]
    loaded = ClipCap.load(str(tmp_path / "run" / "model"))
    assert loaded.config["mapping_type"] == "transformer" and loaded.config["normalize_prefix"] is True
    np.testing.assert_array_equal(loaded.mapper.prefix_const.numpy(), model.mapper.prefix_const.numpy())


# ----------------------------------------------------------------------------------------------- CLI


def test_extract_train_evaluate_commands_and_predict(shapes, tmp_path, capsys):
    """The README's worked example, smaller: a tiny random CLIP, extract, train, evaluate, then predict."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import build_tiny_clip

    clip_path = build_tiny_clip(tmp_path / "clip.pt", seed=0)
    make_shapes_dataset(tmp_path / "data" / "train", num_images=60, seed=0, image_size=32)
    val_dir = make_shapes_dataset(tmp_path / "data" / "val", num_images=8, seed=1, image_size=32)
    (tmp_path / "data" / "val" / "images" / "00007.png").write_bytes(b"not a png")  # reported, left out
    tok_dir = tmp_path / "tokenizer"
    shapes["tokenizer"].save_pretrained(str(tok_dir))
    cache = str(tmp_path / "cache")
    assert main(["extract", str(tmp_path / "data" / "train" / "captions.json"), "--clip", str(clip_path),
                 "--output", str(tmp_path / "emb" / "train.npz"), "--cache-dir", cache, "--no-progress"]) == 0
    assert main(["extract", str(tmp_path / "data" / "val" / "captions.json"), "--clip", str(clip_path),
                 "--output", str(tmp_path / "emb" / "val.npz"), "--cache-dir", cache, "--no-progress"]) == 1
    assert "00007.png" in capsys.readouterr().err
    run = tmp_path / "run"
    args = ["train", str(tmp_path / "emb" / "train.npz"), "--val", str(tmp_path / "emb" / "val.npz"),
            "--tokenizer", str(tok_dir), "--gpt2-config", json.dumps(TINY_GPT2), "--clip", str(clip_path),
            "--output", str(run), "--epochs", "2", "--batch-size", "10", "--lr", "1e-3", "--warmup-steps", "5",
            "--prefix-length", str(PREFIX), "--no-progress"]
    assert main(args + ["--stop-after-steps", "3"]) == 0
    assert main(args) == 0  # resumes
    out = capsys.readouterr().out
    assert '"epoch": 2' in out and "val_loss" in out
    hparams = json.loads((run / "hparams.json").read_text())
    assert hparams["prefix_length"] == PREFIX and hparams["batch_size"] == 10
    model = ClipCap.load(str(run / "model"))
    assert model.clip is not None and model.config["prefix_length"] == PREFIX
    results = model.predict(val_dir.images[:3], save=False, progress=False, max_length=12)
    direct = model.generate(model.clip.encode_image(val_dir.images[:3]), max_length=12)
    assert [r["caption"] for r in results] == [d[0]["text"] for d in direct]
    assert main(["evaluate", str(tmp_path / "data" / "val" / "captions.json"), "--model", str(run / "model"),
                 "--output", str(tmp_path / "eval"), "--metrics", "BLEU", "CIDEr", "--max-length", "12",
                 "--cache-dir", cache, "--no-progress"]) == 1  # one unreadable image
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"Bleu_4", "CIDEr", "CLIPScore"} <= set(metrics["metrics"]) and metrics["num_images"] == 7
    assert list(metrics["failed_images"]) == [str(tmp_path / "data" / "val" / "images" / "00007.png")]
    assert len(json.loads((tmp_path / "eval" / "results.json").read_text())) == 7
    assert os.path.exists(tmp_path / "cache")


def test_a_user_hparams_json_in_the_output_folder_is_refused_before_training(shapes, tmp_path):
    """A new run may overwrite a previous run's hparams.json, never another file of that name."""
    from hparams.training import is_hparams_file
    from utils.file_utils import UnsafePathError

    hp = small_hp(epochs=1)
    (tmp_path / "hparams.json").write_text('{"experiment": "notes I care about"}')
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path, loggers=quiet(), progress=False)
    with pytest.raises(UnsafePathError, match="hparams.json exists and is not a hyper-parameter file"):
        trainer.fit(shapes["train"], shapes["train_emb"])
    assert (tmp_path / "hparams.json").read_text() == '{"experiment": "notes I care about"}'
    assert not (tmp_path / "checkpoints").exists()
    hp.save(tmp_path / "previous.json")
    assert is_hparams_file(tmp_path / "previous.json") and not is_hparams_file(tmp_path / "hparams.json")


# ------------------------------------------------------------------------------------ failures and kills


def _embedded_npz(shapes, path, n=60):
    """A `train` input (.npz as `extract` writes it) for the first ``n`` shapes, without a CLIP."""
    from datasets.embeddings import ExtractionResult, save_embedded_dataset

    sub = shapes["train"].select_images(range(n))
    result = ExtractionResult(np.asarray(shapes["train_emb"][:n], np.float32), np.arange(n))
    return save_embedded_dataset(path, sub, result, "")


def _all_finite(directory):
    import h5py

    from custom_train_objects.checkpoints import TRAINING_STATE_FILENAME, WEIGHTS_FILENAME

    with np.load(directory / TRAINING_STATE_FILENAME) as f:
        arrays = [f[k] for k in f.files]
    with h5py.File(directory / WEIGHTS_FILENAME, "r") as f:
        f.visititems(lambda _, d: arrays.append(d[()]) if isinstance(d, h5py.Dataset) else None)
    return all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")


@pytest.mark.parametrize("policy", [None, "mixed_float16"])
def test_train_stops_at_the_first_non_finite_step_keeps_finite_checkpoints_and_saves_no_model(
        shapes, tmp_path, capsys, policy):
    """An absurd learning rate: exit 3 naming the step, every checkpoint left finite (none written from that
    step on, none of the earlier ones deleted), no model (the run went on to exit 0 with a NaN model)."""
    import re

    from main import main

    tok_dir = tmp_path / "tokenizer"
    shapes["tokenizer"].save_pretrained(str(tok_dir))
    run = tmp_path / "run"
    args = ["train", str(_embedded_npz(shapes, tmp_path / "train.npz")), "--tokenizer", str(tok_dir),
            "--gpt2-config", json.dumps(TINY_GPT2), "--output", str(run), "--epochs", "2", "--batch-size", "10",
            "--lr", "1e9", "--warmup-steps", "1", "--checkpoint-every-steps", "1", "--prefix-length", str(PREFIX),
            "--no-progress"] + (["--mixed-precision", policy] if policy else [])
    assert main(args) == 3
    err = capsys.readouterr().err
    stopped = re.search(r"training stopped at step (\d+) \(epoch 1, batch \d+\): the (loss|gradients|update)", err)
    assert stopped, err
    step = int(stopped.group(1))
    assert not (run / "model").exists()
    checkpoints = sorted((run / "checkpoints").glob("ckpt-*"))
    # every step before the failing one was checkpointed (keep_checkpoints: the 2 latest), none after
    assert [int(c.name[5:]) for c in checkpoints] == list(range(max(1, step - 2), step))
    assert all(_all_finite(c) for c in checkpoints)
    assert f"the last checkpoint, ckpt-{step - 1:09d}, holds finite weights" in err


def test_an_update_that_leaves_infinite_weights_stops_at_that_step(shapes, tmp_path):
    """Finite loss and gradients, but weight decay at lr 3e38 overflows the weights: named at that step (the
    check reads the weights after the update), not one step later as a NaN loss."""
    from custom_train_objects.trainer import TrainingDiverged

    hp = small_hp(epochs=1, lr=3e38, weight_decay=1.0, warmup_steps=1)  # step 1: lr 0 (warmup)
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    with pytest.raises(TrainingDiverged, match="stopped at step 2 .*the update left NaN or infinite weights") as e:
        trainer.fit(shapes["train"].select_images(range(40)), shapes["train_emb"][:40])
    assert e.value.step == 2


def test_a_checkpoint_or_model_with_non_finite_weights_is_never_written(shapes, tmp_path):
    """The writers check too (a NaN weight however it got there), and a resume refuses such a checkpoint."""
    from custom_train_objects.trainer import TrainingDiverged

    hp = small_hp(epochs=1)
    sub = shapes["train"].select_images(range(40))
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    with pytest.raises(TrainingStopped):
        trainer.fit(sub, shapes["train_emb"][:40], stop_after_steps=1)
    good = trainer.latest_checkpoint()
    weight = trainer.gpt2.weights[0]
    weight.assign(np.full(weight.shape, np.nan, np.float32))
    with pytest.raises(TrainingDiverged, match="not writing the checkpoint of step 2"):
        trainer._save_checkpoint(0, 2, 2)
    with pytest.raises(TrainingDiverged, match="not saving the trained model"):
        trainer.finalize()
    assert trainer.latest_checkpoint() == good and _all_finite(good)
    assert not (tmp_path / "run" / "model").exists()
    # a non-finite checkpoint of an older version of the trainer: refused, named
    from custom_train_objects.checkpoints import write_variables

    write_variables(good, trainer.backbone, trainer.optimizer)
    fresh = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    with pytest.raises(ValueError, match=f"cannot resume from .*{good.name}: .* hold NaN or infinity"):
        fresh.fit(sub, shapes["train_emb"][:40])


def test_a_checkpoint_of_in_out_gpt2_kernels_is_refused_by_name(shapes, tmp_path):
    """A training checkpoint written before GPT-2's projection kernels were (out, in) (its state.json has no
    ``gpt2_weights_layout``): resuming says what it is and what to do, not "damaged, or another model's"."""
    import json

    hp = small_hp(epochs=1)
    sub = shapes["train"].select_images(range(40))
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    with pytest.raises(TrainingStopped):
        trainer.fit(sub, shapes["train_emb"][:40], stop_after_steps=1)
    state_path = trainer.latest_checkpoint() / "state.json"
    state = json.loads(state_path.read_text())
    assert state["gpt2_weights_layout"] == "out_in"
    del state["gpt2_weights_layout"]  # as the trainer wrote it before
    state_path.write_text(json.dumps(state))
    fresh = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    with pytest.raises(ValueError, match="stored 'in_out', this version trains them 'out_in'"):
        fresh.fit(sub, shapes["train_emb"][:40])


def test_float16_overflows_skipped_by_the_loss_scale_are_not_failures(shapes, tmp_path, monkeypatch):
    """mixed_float16 with a loss scale so high that the first steps overflow: the LossScaleOptimizer skips them
    while it halves the scale, and training goes on; an overflow with the scale already at its floor stops."""
    from custom_train_objects import trainer as trainer_module

    hp = small_hp(epochs=2, batch_size=10, mixed_precision="mixed_float16", warmup_steps=2)
    sub = shapes["train"].select_images(range(60))
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    trainer._build(steps_per_epoch=6)
    trainer.optimizer.dynamic_scale.assign(2.0**20)  # about 2**16 fits these float16 gradients
    before = [w.numpy().copy() for w in trainer.mapper.weights]
    losses = trainer.fit(sub, shapes["train_emb"][:60])["loss"]
    scale = float(trainer.optimizer.dynamic_scale)
    assert 1 < scale < 2.0**20 and len(losses) == 12 and np.isfinite(losses).all()  # skipped, then trained
    assert losses[-1] < losses[0] and (tmp_path / "run" / "model").is_dir()
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, trainer.mapper.weights))
    # the same overflow with the floor above the scale: the gradients themselves overflow, a failure
    monkeypatch.setattr(trainer_module, "MIN_LOSS_SCALE", 2.0**25)
    failing = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run2", loggers=quiet(), progress=False)
    failing._build(steps_per_epoch=6)
    failing.optimizer.dynamic_scale.assign(2.0**20)
    with pytest.raises(trainer_module.TrainingDiverged, match="step 1 .*gradients hold NaN or infinity with the "
                                                              "loss scale already at or below 3.35544e[+]07"):
        failing.fit(sub, shapes["train_emb"][:60])


def test_steps_csv_has_no_repeated_rows_after_a_kill_before_the_first_checkpoint(shapes, tmp_path, monkeypatch):
    """A run killed before its first checkpoint restarts from step 0: the rows it logged are dropped."""
    hp = small_hp(epochs=1, batch_size=10)
    sub, emb = shapes["train"].select_images(range(40)), shapes["train_emb"][:40]
    run = tmp_path / "run"

    def killed(*_):
        raise KeyboardInterrupt  # as kill -9 before the end-of-epoch checkpoint: the rows are on disk

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_model(shapes, hp), hp, run, progress=False).fit(sub, emb)
    assert not (run / "checkpoints").exists()
    with open(run / "logs" / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    Trainer(tiny_model(shapes, hp), hp, run, progress=False).fit(sub, emb)
    with open(run / "logs" / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    with open(run / "logs" / "epochs.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]


def test_csv_logger_resume_drops_a_torn_row(tmp_path):
    """A kill in the middle of a row: its step cut short ("1" of "12") would pass for an early step."""
    from loggers.training_loggers import CSVLogger

    logs = CSVLogger(tmp_path)
    for step in range(1, 12):
        logs.log_step(step, {"loss": 1.0 / step})
    with open(tmp_path / "steps.csv", "a") as f:
        f.write("1")  # the first byte of the row of step 12
    logs.resume(10)
    logs.log_step(11, {"loss": 0.5})
    with open(tmp_path / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 12))


def test_train_output_that_is_a_file_or_under_one_is_refused_before_any_work(shapes, tmp_path, capsys):
    """(was a FileExistsError / NotADirectoryError traceback once the model was built)"""
    from main import main
    from utils.file_utils import UnsafePathError

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    tok_dir = tmp_path / "tokenizer"
    shapes["tokenizer"].save_pretrained(str(tok_dir))
    valid = ["--tokenizer", str(tok_dir), "--gpt2-config", json.dumps(TINY_GPT2), "--prefix-length", str(PREFIX)]
    npz = str(_embedded_npz(shapes, tmp_path / "train.npz", n=20))
    for output, says in ((notes, "is a regular file"), (notes / "run", f"is under {notes}, which is a regular")):
        # a valid run but for its output; then one whose training file does not exist: the output comes first
        for args in ([npz, *valid], [str(tmp_path / "missing.npz")]):
            assert main(["train", *args, "--output", str(output), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert f"the output folder {output} {says}" in err and "Traceback" not in err
        with pytest.raises(UnsafePathError, match="not a folder"):
            Trainer(None, small_hp(), output, loggers=quiet())
    assert notes.read_text() == "mine"


# --------------------------------------------------------------------------- resume: data, damage, durability


def _stopped_run(shapes, hp, run, n=40, stop=1, **fit):
    """A run on the first ``n`` shapes stopped (checkpoint written) after ``stop`` steps."""
    with pytest.raises(TrainingStopped):
        Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False).fit(
            shapes["train"].select_images(range(n)), shapes["train_emb"][:n], stop_after_steps=stop, **fit)


def test_resume_on_other_training_data_is_refused_naming_what_differs(shapes, tmp_path, caplog):
    """state.json records the data's fingerprint: other captions / images / embeddings, or embeddings of another
    CLIP, are refused by name (before: the run went on silently on the new data, its schedule planned for the
    old). A checkpoint written before the fingerprint was recorded still resumes, said in the log."""
    import logging

    hp = small_hp(epochs=1, max_length=12)
    run = tmp_path / "run"
    _stopped_run(shapes, hp, run, n=40, stop=1)
    state_path = run / "checkpoints" / "ckpt-000000001" / "state.json"

    def resume(images, run=run, **fit):
        trainer = Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False)
        return trainer.fit(shapes["train"].select_images(images), shapes["train_emb"][images.start:images.stop],
                           **fit)

    refused = "cannot resume from .*ckpt-000000001: the training data differ: "
    with pytest.raises(ValueError, match=refused + r"their content \(SHA-256"):  # same size, other shapes
        resume(range(40, 80))
    with pytest.raises(ValueError, match=refused + "captions 40 there, 60 now; steps per epoch 2 there, 3 now"):
        resume(range(60))
    state = json.loads(state_path.read_text())
    assert state["data"]["captions"] == 40 and len(state["data"]["sha256"]) == 64
    del state["data"]  # as written before the fingerprint was recorded
    state_path.write_text(json.dumps(state))
    with caplog.at_level(logging.INFO, logger="custom_train_objects.trainer"):
        assert len(resume(range(40))["loss"]) == 2
    assert "written before checkpoints recorded their training data" in caplog.text
    # the same arrays, labelled as another CLIP's embeddings
    _stopped_run(shapes, hp, tmp_path / "clip", n=40, stop=1, embeddings_model_id="clip:aaaa")
    with pytest.raises(ValueError, match=r"the training data differ: embeddings of CLIP clip:aaaa\.\.\. there, "
                                         r"clip:bbbb\.\.\. now \("):
        resume(range(40), run=tmp_path / "clip", embeddings_model_id="clip:bbbb")


def test_resume_with_other_validation_data_is_refused(shapes, tmp_path):
    """Every epoch's ``val_loss`` in a run's history is over one validation set: a resume with another ``--val``,
    or none, was undetected (the curve mixed two sets). state.json records it; the same set resumes."""
    hp = small_hp(epochs=1, max_length=12)
    run = tmp_path / "run"
    val = dict(val_dataset=shapes["test"].select_images(range(20)), val_embeddings=shapes["test_emb"][:20])
    _stopped_run(shapes, hp, run, n=40, stop=1, **val)

    def resume(**fit):
        trainer = Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False)
        return trainer.fit(shapes["train"].select_images(range(40)), shapes["train_emb"][:40], **fit)

    refused = "the training data differ: the validation data "
    with pytest.raises(ValueError, match=refused + r"\(20 captions \(SHA-256 \w+\.\.\.\) there, none now"):
        resume()
    with pytest.raises(ValueError, match=refused + r"\(20 captions .* there, 40 captions .* now"):
        resume(val_dataset=shapes["test"].select_images(range(20, 60)), val_embeddings=shapes["test_emb"][20:60])
    history = resume(**val)
    assert len(history["loss"]) == 2 and "val_loss" in history["epochs"][-1]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(shapes, tmp_path, caplog):
    """A truncated or emptied training_state.npz, or a truncated state.json, of the latest checkpoint: resumed
    from the previous one, said in the log (before: a BadZipFile / EOFError traceback); with nothing readable
    left, the documented "damaged" ValueError."""
    import logging

    hp = small_hp(epochs=1, batch_size=10, checkpoint_every_steps=1)
    sub, emb = shapes["train"].select_images(range(40)), shapes["train_emb"][:40]
    for damage in ("truncated", "emptied", "state.json"):
        run = tmp_path / damage
        _stopped_run(shapes, hp, run, n=40, stop=2)
        first, latest = sorted((run / "checkpoints").glob("ckpt-*"))
        target = latest / ("state.json" if damage == "state.json" else "training_state.npz")
        data = target.read_bytes()
        target.write_bytes(b"" if damage == "emptied" else data[: len(data) // 2])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="custom_train_objects.trainer"):
            history = Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False).fit(sub, emb)
        assert len(history["loss"]) == 4, damage
        assert f"resuming from the previous checkpoint, {first.name}, instead" in caplog.text, damage
        assert "damaged" in caplog.text
    # every checkpoint damaged: a clear ValueError, not a zipfile traceback
    run = tmp_path / "all"
    _stopped_run(shapes, hp, run, n=40, stop=2)
    for checkpoint in (run / "checkpoints").glob("ckpt-*"):
        (checkpoint / "training_state.npz").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ValueError, match="damaged.*no earlier checkpoint could be read either"):
        Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False).fit(sub, emb)


def test_checkpoint_files_and_folder_are_fsynced_before_it_is_published(shapes, tmp_path, monkeypatch):
    """Every file of the staging folder and the folder itself reach the disk before the rename that publishes
    it, and the checkpoints folder after it (before: nothing was fsync'ed: a power cut could leave a
    complete-looking checkpoint of empty files)."""
    from custom_train_objects import trainer as trainer_module

    hp = small_hp(epochs=1)
    trainer = Trainer(tiny_model(shapes, hp), hp, tmp_path / "run", loggers=quiet(), progress=False)
    trainer._build(steps_per_epoch=2)
    trainer.max_length = 10
    events, real_fsync, real_publish = [], os.fsync, trainer_module.publish_dir

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def publish(staging, target, **kwargs):
        events.append(("publish", os.path.realpath(staging)))
        return real_publish(staging, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(trainer_module, "publish_dir", publish)
    final = trainer._save_checkpoint(1, 0, 2)
    published = [i for i, e in enumerate(events) if e[0] == "publish"]
    assert len(published) == 1
    staging = events[published[0]][1]
    synced_before = {path for kind, path in events[: published[0]] if kind == "fsync"}
    for name in ("model.weights.h5", "training_state.npz", "state.json"):
        assert os.path.join(staging, name) in synced_before, name
    assert staging in synced_before
    assert ("fsync", os.path.realpath(final.parent)) in events[published[0]:]


def test_a_step_checkpoint_on_the_last_batch_of_an_epoch_is_written(shapes, tmp_path):
    """checkpoint_every_steps = steps per epoch, save_every beyond it: every epoch end is such a step (before:
    skipped, only the final checkpoint was written); it is the epoch-end checkpoint (batch 0 of the next)."""
    hp = small_hp(epochs=3, save_every=3, checkpoint_every_steps=2)  # 40 captions, batches of 20: 2 per epoch
    sub, emb = shapes["train"].select_images(range(40)), shapes["train_emb"][:40]
    run = tmp_path / "run"
    trainer = Trainer(tiny_model(shapes, hp), hp, run, loggers=quiet(), progress=False, keep_checkpoints=10)
    with pytest.raises(TrainingStopped):
        trainer.fit(sub, emb, stop_after_steps=5)
    assert [p.name for p in sorted((run / "checkpoints").glob("ckpt-*"))] == [
        "ckpt-000000002", "ckpt-000000004", "ckpt-000000005"]
    state = json.loads((run / "checkpoints" / "ckpt-000000002" / "state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"], len(state["epochs"])) == (1, 0, 2, 1)


def test_the_logged_learning_rate_is_the_one_the_update_used(shapes, tmp_path):
    """steps.csv's lr at step s is the schedule at s - 1, the rate of that update (the first one: 0 in
    warmup); before, the rate of the next update was logged."""
    from loggers.training_loggers import build_loggers

    hp = small_hp(epochs=2, lr=1e-3, warmup_steps=3)
    run = tmp_path / "run"
    Trainer(tiny_model(shapes, hp), hp, run, loggers=build_loggers(run, console=False, tensorboard=False),
            progress=False).fit(shapes["train"].select_images(range(40)), shapes["train_emb"][:40])
    schedule = LinearWarmupDecay(1e-3, 3, 4)
    with open(run / "logs" / "steps.csv") as f:
        logged = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert sorted(logged) == [1, 2, 3, 4]
    for step, lr in logged.items():
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-5, abs=1e-12), step
    assert logged[1] == 0.0


def test_train_refuses_init_model_or_val_embeddings_of_another_clip(shapes, tmp_path, capsys):
    """The embeddings are checked against the CLIP the trained model keeps: --init-model's when there is no
    --clip; the --val file against that CLIP (or the training file's id without one). Before: trained on
    another CLIP's embeddings silently, the saved model keeping the old CLIP."""
    from datasets.embeddings import ExtractionResult, clip_model_id, save_embedded_dataset
    from main import main
    from models.siamese.clip import CLIP
    from testing.tiny_models import EMBED_DIM, build_tiny_clip

    clips = [CLIP.from_pretrained(str(build_tiny_clip(tmp_path / f"clip{s}.pt", seed=s))) for s in (0, 1)]
    ids = [clip_model_id(c) for c in clips]
    sub = shapes["train"].select_images(range(20))
    rng = np.random.default_rng(0)

    def npz(name, model_id):
        result = ExtractionResult(rng.normal(size=(20, EMBED_DIM)).astype(np.float32), np.arange(20))
        return str(save_embedded_dataset(tmp_path / name, sub, result, model_id))

    train_a, train_b, val_b = npz("a.npz", ids[0]), npz("b.npz", ids[1]), npz("val_b.npz", ids[1])
    hp = small_hp(epochs=1)
    init = tmp_path / "init"
    tiny_model(shapes, hp, clip=clips[0], prefix_size=EMBED_DIM).save(str(init))
    tok_dir = tmp_path / "tokenizer"
    shapes["tokenizer"].save_pretrained(str(tok_dir))
    common = ["--epochs", "1", "--batch-size", "20", "--prefix-length", str(PREFIX), "--no-progress"]
    new_model = ["--tokenizer", str(tok_dir), "--gpt2-config", json.dumps(TINY_GPT2)]
    refusals = [
        ([train_b, "--init-model", str(init)], f"{train_b} was extracted with another CLIP than the CLIP of {init}"),
        ([train_a, "--val", val_b, "--init-model", str(init)], f"{val_b} was extracted with another CLIP than"),
        ([train_a, "--val", val_b, "--clip", str(tmp_path / "clip0.pt"), *new_model],
         f"{val_b} was extracted with another CLIP than"),
        ([train_a, "--val", val_b, *new_model], f"{val_b} was extracted with another CLIP (or another EXIF"),
    ]
    for i, (args, message) in enumerate(refusals):
        assert main(["train", *args, "--output", str(tmp_path / f"run{i}"), *common]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()
    # the same CLIP throughout: trains
    assert main(["train", train_a, "--val", train_a, "--init-model", str(init), "--output",
                 str(tmp_path / "ok"), *common]) == 0, capsys.readouterr().err
    state = json.loads(next((tmp_path / "ok" / "checkpoints").glob("ckpt-*/state.json")).read_text())
    assert state["data"]["model_id"] == ids[0]
