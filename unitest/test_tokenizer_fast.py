"""`GPT2Tokenizer` (tokenizers only) against transformers' ``GPT2TokenizerFast``: the same ids, text and
interface on both folder layouts, a save that both read back, and a caption path free of transformers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.gpt2_tokenizer import GPT2Tokenizer
from utils.tokenizer import TokenizerError, load_gpt2_tokenizer, stop_token_id

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", " \n ", "a", ".", "..", " .", "A man riding a wave on top of a surfboard.",
    " A man riding a wave", "A  man   riding", "trailing spaces   ", "line one\nline two\r\nthree",
    "Une personne qui marche dans la rue, sous la pluie.", "zebra 42 ✓", "naïve café déjà vu", "日本語のテキスト",
    "emoji 🐈‍⬛🚀👍🏽 end", "Ω≈ç√∫", "punctuation!?;:'\"()[]{}<>-_/\\|@#$%^&*~`", "it's don't I'm we've they're",
    "<|endoftext|>", "a cat<|endoftext|>a dog", " <|endoftext|> ", "<|endoftext|><|endoftext|>", "<|endoftext",
    "numbers 3.14159 1,000,000 2024-01-01", "\u00a0non-breaking\u2009thin\u200bzero-width", "\x00\x01 control",
    "A" * 300, "surfboard." * 20,
]
ID_ROWS = [[], [0], [0, 0], [14], [5, 0, 7], list(range(50)), list(range(250, 400)), [399, 1, 2]]


def _layout(source, directory, keep):
    """A copy of tokenizer folder ``source`` holding only the files in ``keep``."""
    directory.mkdir()
    for name in keep:
        shutil.copy(Path(source) / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def layouts(gpt2_tokenizer_dir, tmp_path_factory):
    """{layout: folder}: vocab + merges only, tokenizer.json only, and everything transformers saved."""
    tmp = tmp_path_factory.mktemp("layouts")
    return {
        "vocab_merges": _layout(gpt2_tokenizer_dir, tmp / "vm", ["vocab.json", "merges.txt"]),
        "tokenizer_json": _layout(gpt2_tokenizer_dir, tmp / "tj", ["tokenizer.json"]),
        "full": Path(gpt2_tokenizer_dir),
    }


def _reference(directory):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(directory))


def assert_same(ours, ref, texts=TEXTS, id_rows=ID_ROWS):
    """Every behaviour the repository relies on, ours == transformers'."""
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    assert {i: t.content for i, t in ours.added_tokens_decoder.items()} == {
        i: t.content for i, t in ref.added_tokens_decoder.items()}
    assert ours.all_special_tokens == ref.all_special_tokens
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id"), name
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        ids = ref.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(ref.convert_ids_to_tokens(ids)) == ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    valid = [[i for i in row if i < len(ref)] for row in id_rows]
    for row in valid:
        for skip in (False, True):
            assert ours.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip), row
        assert ours.decode(row, clean_up_tokenization_spaces=True) == ref.decode(row, clean_up_tokenization_spaces=True)
        assert ours.convert_ids_to_tokens(row) == ref.convert_ids_to_tokens(row)
    assert ours.decode(valid) == ref.decode(valid) == ours.batch_decode(valid)


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json", "full"])
def test_ids_and_text_equal_gpt2_tokenizer_fast(layouts, layout):
    ours = load_gpt2_tokenizer(layouts[layout])
    assert isinstance(ours, GPT2Tokenizer) and len(ours) >= 300
    ref = _reference(layouts[layout])
    ref.pad_token = ref.eos_token  # what load_gpt2_tokenizer always did
    assert_same(ours, ref)
    assert stop_token_id(ours, ".") == stop_token_id(ref, ".")
    import copy
    import pickle

    assert_same(pickle.loads(pickle.dumps(ours)), ref)  # workers (Beam, pipelines) may copy the tokenizer
    assert_same(copy.deepcopy(ours), ref)


def test_batch_call_pads_and_truncates_like_transformers(layouts):
    ours, ref = load_gpt2_tokenizer(layouts["full"]), _reference(layouts["full"])
    ref.pad_token = ref.eos_token
    batch = ["A cat.", "Two dogs playing in the park.", "", "emoji 🐈"]
    for kwargs in ({}, {"padding": True}, {"padding": "longest"}, {"padding": "max_length", "max_length": 12},
                   {"padding": True, "truncation": True, "max_length": 4}, {"truncation": True, "max_length": 3}):
        expected = ref(batch, **kwargs)
        got = ours(batch, **kwargs)
        assert got == {k: expected[k] for k in ("input_ids", "attention_mask")}, kwargs
        one = ref(batch[1], **kwargs)
        assert ours(batch[1], **kwargs) == {k: one[k] for k in ("input_ids", "attention_mask")}, kwargs
    with pytest.raises(ValueError, match="max_length"):
        ours(batch, padding="max_length")


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json", "full"])
def test_save_pretrained_round_trips_with_both(layouts, layout, tmp_path):
    from transformers import GPT2TokenizerFast

    ours = load_gpt2_tokenizer(layouts[layout])
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    reloaded, by_transformers = load_gpt2_tokenizer(tmp_path / "saved"), GPT2TokenizerFast.from_pretrained(
        str(tmp_path / "saved"))
    assert by_transformers.pad_token == "<|endoftext|>"  # saved, as GPT2TokenizerFast saves it
    assert_same(reloaded, by_transformers)
    ref = _reference(layouts[layout])
    ref.pad_token = ref.eos_token
    assert_same(reloaded, ref)
    # transformers' own save of it reads back to the same tokenizer too
    by_transformers.save_pretrained(str(tmp_path / "again"))
    assert_same(load_gpt2_tokenizer(tmp_path / "again"), by_transformers)
    # a second save over our own files is allowed; over a stranger's file is not
    ours.save_pretrained(tmp_path / "saved")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "tokenizer.json").write_text("my notes")
    from utils.file_utils import UnsafePathError

    with pytest.raises(UnsafePathError, match="refusing to overwrite"):
        ours.save_pretrained(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "tokenizer.json").read_text() == "my notes"


def _with_config(source, directory, config=None, files=None):
    directory = _layout(source, directory, ["vocab.json", "merges.txt"])
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    for name, data in (files or {}).items():
        (directory / name).write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("case", ["prefix_space", "bos_eos", "added_tokens_json", "extra_special",
                                  "special_tokens_map", "split_special", "clean_up_forced"])
def test_configurations_follow_transformers(gpt2_tokenizer_dir, tmp_path, case):
    """The tokenizer_config.json / special_tokens_map.json / added_tokens.json entries that change ids or text."""
    config, files = {
        "prefix_space": ({"add_prefix_space": True}, None),
        "bos_eos": ({"add_bos_token": True, "add_eos_token": True}, None),
        "added_tokens_json": (None, {"added_tokens.json": {"<|sep|>": 400, "newword": 401}}),
        "extra_special": ({"additional_special_tokens": ["<|img|>"]}, None),
        "special_tokens_map": (None, {"special_tokens_map.json": {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>"}}),
        "split_special": ({"split_special_tokens": True}, None),
        "clean_up_forced": ({"clean_up_tokenization_spaces": True,
                             "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}, None),
    }[case]
    directory = _with_config(gpt2_tokenizer_dir, tmp_path / "tok", config, files)
    texts = TEXTS + ["x <|sep|> y newword", "a <|img|> b", "<|pad|>", "it 's a cat , isn't it ?"]
    ours, ref = load_gpt2_tokenizer(directory), _reference(directory)
    if ref.pad_token is None:
        ref.pad_token = ref.eos_token
    assert_same(ours, ref, texts, ID_ROWS + [[400, 401, 402]])
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    assert_same(load_gpt2_tokenizer(saved), _reference(saved), texts)


def test_loading_a_folder_imports_neither_transformers_nor_torch(gpt2_tokenizer_dir):
    code = ("import sys; sys.path.insert(0, '.'); from utils.tokenizer import load_gpt2_tokenizer; "
            f"t = load_gpt2_tokenizer({str(gpt2_tokenizer_dir)!r}); t.decode(t.encode('a cat.')); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_clipcap_load_and_caption_do_not_import_transformers(tiny_model_dir):
    """ClipCap.load of a saved model and a caption of an image: no transformers, no torch (issue 12)."""
    code = ("import sys; sys.path.insert(0, '.'); "
            "from models.image_captioning import ClipCap; "
            f"m = ClipCap.load({str(tiny_model_dir)!r}); "
            "assert isinstance(m.caption(['demo/cat.jpg'], max_length=5)[0], str); "
            "print(sorted(x for x in ('transformers', 'torch') if x in sys.modules))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-3000:]


def test_a_hub_name_is_built_from_its_cached_snapshot(layouts, monkeypatch):
    """A hub name: huggingface_hub finds the files (cache or download), ours is built from that folder;
    ``gpt2`` is also looked up as ``openai-community/gpt2``; still no transformers."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        asked.append(repo_id)
        assert local_files_only  # conftest sets IMAGE_CAPTIONING_OFFLINE: never a download
        assert "tokenizer.json" in allow_patterns and "vocab.json" in allow_patterns
        if repo_id != "openai-community/gpt2":
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(layouts["vocab_merges"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tokenizer = load_gpt2_tokenizer("gpt2")
    assert asked == ["gpt2", "openai-community/gpt2"] and isinstance(tokenizer, GPT2Tokenizer)
    assert tokenizer.encode("A cat.") == load_gpt2_tokenizer(layouts["vocab_merges"]).encode("A cat.")
    asked.clear()
    with pytest.raises(TokenizerError, match="vocab.json and merges.txt"):
        load_gpt2_tokenizer("someone/gpt2")
    assert asked == ["someone/gpt2"]


def _with_added_tokens(source, directory, added):
    """A tokenizer.json-only folder with ``added`` (dicts with id and content) after its own added tokens."""
    directory.mkdir()
    data = json.loads((Path(source) / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = data.get("added_tokens", []) + added
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def _added(i, content, special=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def test_many_added_tokens_get_transformers_ids(gpt2_tokenizer_dir, tmp_path):
    """Added tokens mixed: new ones, special ones, words already in the vocabulary, a repeated content, out of
    order: the ids GPT2TokenizerFast gives them (the one-call add keeps the one-at-a-time order)."""
    vocab_word = next(w for w in json.loads((Path(gpt2_tokenizer_dir) / "vocab.json").read_text()) if len(w) > 2)
    added = [_added(400 + i, f"<t{i}>", special=i % 3 == 0) for i in range(300)]
    added += [_added(900, vocab_word), _added(901, "<t5>"), _added(350, "<early>", special=True)]
    directory = _with_added_tokens(gpt2_tokenizer_dir, tmp_path / "tok", added)
    ours, ref = load_gpt2_tokenizer(directory), _reference(directory)
    ref.pad_token = ref.eos_token
    assert_same(ours, ref, TEXTS[:8] + ["a <t1> b<t3><early> <t299>", vocab_word], ID_ROWS[:3] + [[400, 401, 699]])


def test_thirty_thousand_added_tokens_load_in_linear_time(gpt2_tokenizer_dir, tmp_path):
    """30,000 added tokens took 192 s (one `add_tokens` call per token: each rebuilds the matcher); one call."""
    import time

    count = 30_000
    directory = _with_added_tokens(gpt2_tokenizer_dir, tmp_path / "tok",
                                   [_added(1000 + i, f"<tok{i}>") for i in range(count)])
    start = time.perf_counter()
    ours = load_gpt2_tokenizer(directory)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{elapsed:.1f} s"  # a generous guard: ~0.1 s now
    assert len(ours) == len(json.loads((Path(gpt2_tokenizer_dir) / "vocab.json").read_text())) + count
    assert ours.encode("x<tok0>y<tok29999>")[1] == ours.convert_tokens_to_ids("<tok0>")
    assert ours.convert_ids_to_tokens([ours.convert_tokens_to_ids("<tok29999>")]) == ["<tok29999>"]
