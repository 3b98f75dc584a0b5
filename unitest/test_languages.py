"""Captions in another language, with any GPT-2-family language model (issue 25, section 2).

End to end, offline: a byte-level BPE trained here on French and Chinese text written below, the synthetic
shapes with Chinese captions, a tiny random CLIP, ``main.py extract`` and ``main.py train --stop-token 。`` on
a tiny GPT-2 built on that tokenizer; the model captions in Chinese (every caption CJK text ending with "。"),
saves, loads, exports a serving SavedModel (loaded with ``tf.saved_model.load``) and serves through the web
demo's `Captioner`, all giving the same captions. Then: a French model ending its captions with the
end-of-text token, which stays out of the text; the stop token refused at train / convert / construction time
when it is not one token of the vocabulary; a folder saved before the stop token was recorded keeps "."; and a
GPT-2 of another size (6 layers, n_embd 96, 4 heads: a "distilled" config) converted from a Hugging Face folder
written by transformers, whose head count is an error without its config.json.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.synthetic_shapes import caption_for, make_shapes_dataset, train_shapes_tokenizer
from testing.tiny_models import build_tiny_clip

# text in the tokenizer's training corpus beside the shapes' captions: other words, other sentence ends
TEXTS = [
    "Le chat dort sur le canapé. Il fait beau aujourd'hui ! Où est la gare ?",
    "Une maison blanche au bord de la mer. Deux enfants jouent dans le jardin.",
    "猫在沙发上睡觉。今天天气很好！火车站在哪里？",
    "海边有一座白色的房子。两个孩子在花园里玩。",
]
TINY_GPT2 = dict(n_positions=48, n_embd=64, n_layer=2, n_head=4)
PREFIX = 4
CJK = re.compile(r"[\u4e00-\u9fff]")
# every character a Chinese caption of the shapes may hold (its words and its full stop)
ZH_CHARS = set("".join(caption_for(s, c, b, "zh") for s, c, b in
                       [("circle", "red", "blue"), ("square", "green", "white"), ("triangle", "yellow", "black")]))


def _train_args(emb, tokenizer, clip, run, *extra):
    return ["train", str(emb), "--tokenizer", str(tokenizer), "--gpt2-config", json.dumps(TINY_GPT2),
            "--clip", str(clip), "--output", str(run), "--epochs", "6", "--batch-size", "20", "--lr", "3e-3",
            "--warmup-steps", "10", "--prefix-length", str(PREFIX), "--no-progress", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bilingual tokenizer, a tiny CLIP, the Chinese shapes and their extracted embeddings."""
    from main import main

    root = tmp_path_factory.mktemp("languages")
    tokenizer = train_shapes_tokenizer(root / "tokenizer", vocab_size=400, languages=("fr", "zh"), texts=TEXTS)
    clip = build_tiny_clip(root / "clip.pt", seed=0)
    train = make_shapes_dataset(root / "zh" / "train", num_images=100, seed=0, image_size=32, language="zh")
    val = make_shapes_dataset(root / "zh" / "val", num_images=4, seed=1, image_size=32, language="zh")
    assert main(["extract", str(root / "zh" / "train" / "captions.json"), "--clip", str(clip), "--output",
                 str(root / "emb" / "zh.npz"), "--cache-dir", str(root / "cache"), "--no-progress"]) == 0
    return {"root": root, "tokenizer": tokenizer, "tokenizer_dir": root / "tokenizer", "clip": clip,
            "train": train, "val": val, "emb": root / "emb" / "zh.npz"}


def _is_chinese_caption(text):
    """CJK text of the shapes' Chinese words ending with "。", valid UTF-8 (no replacement character)."""
    return bool(CJK.search(text)) and text.endswith("。") and "\ufffd" not in text and set(text) <= ZH_CHARS


def test_shapes_captions_in_french_and_chinese():
    assert caption_for("circle", "red", "blue", "fr") == "un cercle rouge sur fond bleu."
    assert caption_for("circle", "red", "blue", "zh") == "蓝色背景上的红色圆形。"
    assert caption_for("square", "white", "black", "fr") == "un carré blanc sur fond noir."
    with pytest.raises(ValueError, match="unknown caption language 'de'"):
        caption_for("circle", "red", "blue", "de")


def test_a_chinese_model_trains_captions_saves_exports_and_serves(world, tmp_path):
    """extract -> train --stop-token 。 -> caption, save / load, SavedModel, web demo: Chinese captions."""
    import tensorflow as tf

    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.serving import export_savedmodel
    from models.image_captioning.web_demo import Captioner

    run = tmp_path / "run"
    assert main(_train_args(world["emb"], world["tokenizer_dir"], world["clip"], run, "--stop-token", "。")) == 0
    assert json.loads((run / "model" / "config.json").read_text())["stop_token"] == "。"  # saved with the model
    assert json.loads((run / "hparams.json").read_text())["stop_token"] == "。"
    model = ClipCap.load(str(run / "model"))
    assert model.stop_token == "。"
    images = world["val"].images
    out = model.generate(model.encode_images(images), max_length=20)
    captions = [candidates[0]["text"] for candidates in out]
    stop_id = model.tokenizer.encode("。")[0]
    assert all(candidates[0]["tokens"][-1] == stop_id for candidates in out), out  # each ended by "。"
    assert all(_is_chinese_caption(c) for c in captions), captions

    again = ClipCap.load(model.save(tmp_path / "saved"))
    assert again.stop_token == "。" and again.caption(images, max_length=20) == captions

    directory, metadata, _ = export_savedmodel(model, tmp_path / "export", max_length=20, max_batch_size=1)
    assert metadata["stop_token"] == "。" and metadata["stop_token_id"] == stop_id
    served = tf.saved_model.load(directory).signatures["serving_default"](
        images=tf.constant([Path(p).read_bytes() for p in images]))
    assert [t.decode("utf-8") for t in served["captions"].numpy()] == captions

    rows = Captioner(model).caption(images, max_length=20)
    assert [row["candidates"][0]["text"] for row in rows] == captions


def test_a_french_model_ends_with_the_end_of_text_token_kept_out_of_the_text(world, tmp_path):
    """A multilingual vocabulary's natural stop: <|endoftext|> appended to the training captions, ends each
    generated caption, and is not written in its text (nor in the SavedModel's)."""
    import tensorflow as tf

    from custom_train_objects.model_factory import build_clipcap_for_training
    from custom_train_objects.trainer import Trainer
    from hparams.training import TrainingHParams
    from loggers.training_loggers import LoggerList
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.serving import export_savedmodel
    from models.siamese.clip import CLIP

    train = make_shapes_dataset(tmp_path / "fr", num_images=100, seed=0, image_size=32, language="fr")
    clip = CLIP.from_pretrained(str(world["clip"]))
    embeddings = np.asarray(clip.encode_image(train.images), np.float32)
    hp = TrainingHParams(lr=3e-3, warmup_steps=10, batch_size=20, epochs=6, prefix_length=PREFIX, log_every=10,
                         stop_token="<|endoftext|>")
    model = build_clipcap_for_training(hp, prefix_size=embeddings.shape[1], tokenizer=world["tokenizer"],
                                       gpt2_config=TINY_GPT2, clip=clip, name="fr")
    Trainer(model, hp, tmp_path / "run", loggers=LoggerList([]), progress=False).fit(train, embeddings)
    model = ClipCap.load(str(tmp_path / "run" / "model"))
    assert model.stop_token == "<|endoftext|>"
    eos = model.tokenizer.eos_token_id
    out = model.generate(embeddings[:4], max_length=20)
    words = {"un", "cercle", "carré", "triangle", "rouge", "vert", "bleu", "jaune", "blanc", "noir", "sur", "fond"}
    for candidates in out:
        tokens, text = candidates[0]["tokens"], candidates[0]["text"]
        assert tokens[-1] == eos and "<|endoftext|>" not in text and "\ufffd" not in text, candidates
        assert text.startswith("un ") and len(set(text.rstrip(".").split()) & words) >= 3, text

    directory, metadata, _ = export_savedmodel(model, tmp_path / "export", max_length=20, max_batch_size=1)
    assert metadata["stop_token"] == "<|endoftext|>" and metadata["stop_token_id"] == eos
    served = tf.saved_model.load(directory).signatures["embeddings"](embeddings=tf.constant(embeddings[:4]))
    assert [t.decode("utf-8") for t in served["captions"].numpy()] == [c[0]["text"] for c in out]


def test_a_stop_token_outside_the_vocabulary_is_refused_before_any_work(world, default_model, tmp_path, capsys):
    """"。" is no token of a French-only vocabulary: train, convert and ClipCap refuse it at once, naming
    the token and the tokenizer."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from utils.tokenizer import TokenizerError

    french = tmp_path / "fr_tokenizer"
    train_shapes_tokenizer(french, vocab_size=300, languages=("fr",))
    run = tmp_path / "run"
    assert main(_train_args(world["emb"], french, world["clip"], run, "--stop-token", "。")) == 3
    err = capsys.readouterr().err
    assert "stop token '。' is not a single token of the tokenizer" in err and str(french) in err, err
    assert not (run / "checkpoints").exists() and not (run / "model").exists()  # nothing trained

    assert main(["convert", str(tmp_path / "absent.pt"), "--clip", str(world["clip"]), "--tokenizer", str(french),
                 "--stop-token", "。", "--output", str(tmp_path / "converted")]) == 3
    err = capsys.readouterr().err
    assert "stop token '。' is not a single token" in err and str(french) in err, err

    model = ClipCap.load(str(default_model))
    with pytest.raises(TokenizerError, match="'stop.' is not a single token of the tokenizer"):
        model.stop_token = "stop."
    with pytest.raises(TokenizerError, match="not a single token"):
        ClipCap(model.backbone, model.tokenizer, info={"stop_token": "fin."})


@pytest.fixture(scope="module")
def default_model(world):
    """A model trained for a few steps on the Chinese shapes with the default stop token: its saved folder."""
    from main import main

    run = world["root"] / "default"
    assert main(_train_args(world["emb"], world["tokenizer_dir"], world["clip"], run, "--epochs", "1")) == 0
    return run / "model"


def test_a_folder_without_a_recorded_stop_token_keeps_the_full_stop(world, default_model, tmp_path):
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.identity import compute_identity

    folder = default_model
    config = json.loads((folder / "config.json").read_text())
    assert config["stop_token"] == "."  # the default, recorded
    model = ClipCap.load(str(folder))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    del config["stop_token"]  # as written before the stop token was recorded
    (old / "config.json").write_text(json.dumps(config))
    legacy = ClipCap.load(str(old))
    assert legacy.stop_token == "."
    embeddings = model.encode_images(world["val"].images)
    assert legacy.generate(embeddings, max_length=12) == model.generate(embeddings, max_length=12)
    # the identity of a "." model is what it was (no stop token in it); another stop token, another identity
    assert compute_identity(legacy) == model.identity
    legacy.stop_token = "。"
    assert legacy.identity != model.identity


def test_a_distilled_gpt2_size_converts_from_a_hugging_face_folder_and_captions(world, tmp_path, capsys):
    """6 layers, n_embd 96, 4 heads (24-wide: not the released 64-wide heads), written by transformers:
    converted from its folder (logits equal to transformers'), trained into a ClipCap that captions; the same
    folder without config.json fails on the head count."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from utils.convert.common import CheckpointError
    from utils.convert.hf_gpt2 import load_gpt2

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(world["tokenizer"]), n_positions=48, n_embd=96, n_layer=6, n_head=4)
    hf_model = GPT2LMHeadModel(config).eval()
    folder = tmp_path / "distilled"
    hf_model.save_pretrained(folder)
    gpt2 = load_gpt2(folder)
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head) == (6, 96, 4)
    ids = np.array([world["tokenizer"].encode("蓝色背景上的红色圆形。un cercle rouge.")])
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(gpt2(token_ids=ids)), expected, atol=1e-4)

    run = tmp_path / "run"
    assert main(_with_gpt2(_train_args(world["emb"], world["tokenizer_dir"], world["clip"], run, "--stop-token",
                                       "。", "--epochs", "2"), folder)) == 0
    model = ClipCap.load(str(run / "model"))
    assert model.gpt2.n_head == 4 and model.gpt2.n_layer == 6
    captions = model.caption(world["val"].images, max_length=12)
    assert len(captions) == 4 and all(isinstance(c, str) and "\ufffd" not in c for c in captions)

    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json.*n_head.*cannot be inferred.*n_embd=96, n_layer=6"):
        load_gpt2(folder)
    capsys.readouterr()
    assert main(_with_gpt2(_train_args(world["emb"], world["tokenizer_dir"], world["clip"], tmp_path / "run2"),
                           folder)) == 3
    err = capsys.readouterr().err
    assert "n_head" in err and "config.json" in err, err


def test_convert_records_the_stop_token_and_official_models_keep_the_full_stop(tiny_files, tmp_path):
    """``convert --stop-token`` records it in config.json; without it the converted model ends with "." (the
    official English models' captions unchanged), and its identity is what it was."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap

    common = [str(tiny_files["checkpoint"]), "--clip", str(tiny_files["clip"]), "--tokenizer",
              str(tiny_files["tokenizer"])]
    assert main(["convert", *common, "--output", str(tmp_path / "eos"), "--stop-token", "<|endoftext|>"]) == 0
    assert main(["convert", *common, "--output", str(tmp_path / "dot")]) == 0
    assert json.loads((tmp_path / "eos" / "config.json").read_text())["stop_token"] == "<|endoftext|>"
    eos, dot = ClipCap.load(str(tmp_path / "eos")), ClipCap.load(str(tmp_path / "dot"))
    assert (eos.stop_token, dot.stop_token) == ("<|endoftext|>", ".")
    embeddings = np.random.default_rng(0).normal(size=(3, dot.prefix_size)).astype(np.float32)
    tokens = [[c["tokens"] for c in out] for out in dot.generate(embeddings, max_length=20)]
    assert tokens == [[c["tokens"] for c in out] for out in dot.generate(embeddings, max_length=20, stop_token=".")]
    assert eos.identity != dot.identity


def _with_gpt2(args, folder):
    """``args`` with ``--gpt2 folder`` instead of ``--gpt2-config``."""
    at = args.index("--gpt2-config")
    return args[:at] + ["--gpt2", str(folder)] + args[at + 2:]
