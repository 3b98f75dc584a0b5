"""GPT-2 tokenizer loading (local directory, hub name offline), padding and the stop token id."""

import os

import pytest

from utils.tokenizer import TokenizerError, load_gpt2_tokenizer, stop_token_id

TEXTS = ["A man riding a wave on top of a surfboard.", "Une personne qui marche dans la rue.", "zebra 42 ✓"]


def test_local_directory_loads_and_round_trips(gpt2_tokenizer_dir):
    tokenizer = load_gpt2_tokenizer(gpt2_tokenizer_dir)
    assert len(tokenizer) > 256  # the trained vocabulary, not only the special token
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids and tokenizer.decode(ids) == text
    assert len(tokenizer.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges are used


def test_pad_token_is_eos_for_batching(gpt2_tokenizer_dir):
    tokenizer = load_gpt2_tokenizer(gpt2_tokenizer_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    batch = tokenizer(["A cat.", "Two dogs playing in the park."], padding=True)
    lengths = [sum(m) for m in batch["attention_mask"]]
    assert lengths[0] < lengths[1] and batch["input_ids"][0][-1] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][-1] == 0  # right padding


def test_stop_token_id_comes_from_the_vocabulary(gpt2_tokenizer_dir):
    tokenizer = load_gpt2_tokenizer(gpt2_tokenizer_dir)
    stop = stop_token_id(tokenizer, ".")
    assert stop == tokenizer.convert_tokens_to_ids(".")
    assert tokenizer.encode("surfboard.")[-1] == stop
    with pytest.raises(TokenizerError, match="not a single token"):
        stop_token_id(tokenizer, "riding a wave")
    with pytest.raises(TokenizerError, match="non-empty"):
        stop_token_id(tokenizer, "")


def test_missing_or_incomplete_sources(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json and merges.txt"):
        load_gpt2_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_gpt2_tokenizer(tmp_path / "no" / "such" / "dir")
    # offline (conftest sets HF_HUB_OFFLINE) and not cached: the error says which files and where
    with pytest.raises(TokenizerError, match="vocab.json and merges.txt"):
        load_gpt2_tokenizer("no-such-org/no-such-tokenizer")


@pytest.mark.parametrize("kind", ["fifo", "device link", "huge"])
def test_special_or_huge_tokenizer_files_are_refused(kind, gpt2_tokenizer_dir, tmp_path):
    """A FIFO named vocab.json blocked the load forever; a link to /dev/zero read until memory ran out."""
    import os
    import shutil

    directory = tmp_path / "tok"
    shutil.copytree(gpt2_tokenizer_dir, directory)
    for name in ("tokenizer.json", "vocab.json"):
        (directory / name).unlink(missing_ok=True)
    vocab = directory / "vocab.json"
    if kind == "fifo":
        os.mkfifo(vocab)
    elif kind == "device link":
        vocab.symlink_to("/dev/zero")
    else:
        with open(vocab, "wb") as f:
            f.truncate(65 * 1024**2)  # sparse: no disk used
    message = {"fifo": "FIFO", "device link": "character device", "huge": "more than any tokenizer file"}[kind]
    with pytest.raises(TokenizerError, match=message):
        load_gpt2_tokenizer(directory)


def test_the_one_bpe_trainer_writes_a_folder_transformers_reads(tmp_path):
    """`utils.gpt2_tokenizer.train_gpt2_tokenizer` (the synthetic dataset's and the tests' trainer): GPT-2's
    four files, read by transformers to the same ids, deterministic, retrained in place, and never written
    over a file that is not a tokenizer's."""
    from transformers import GPT2TokenizerFast

    from utils.file_utils import UnsafePathError
    from utils.gpt2_tokenizer import train_gpt2_tokenizer

    texts = ["A cat on a mat.", "Two dogs playing in the park.", "Une personne sous la pluie."]
    ours = train_gpt2_tokenizer(tmp_path / "tok", texts, vocab_size=300, repeats=3)
    assert sorted(os.listdir(tmp_path / "tok")) == ["merges.txt", "tokenizer.json", "tokenizer_config.json",
                                                    "vocab.json"]
    theirs = GPT2TokenizerFast.from_pretrained(str(tmp_path / "tok"))
    for text in (*texts, "A dog on a cat, sous la pluie."):
        assert ours.encode(text) == theirs.encode(text)
    assert ours.eos_token == "<|endoftext|>" and len(ours) == len(theirs)
    vocab = (tmp_path / "tok" / "vocab.json").read_bytes()
    train_gpt2_tokenizer(tmp_path / "tok", texts, vocab_size=300, repeats=3)  # again, over its own files
    assert (tmp_path / "tok" / "vocab.json").read_bytes() == vocab
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.json").write_text("my notes")
    with pytest.raises(UnsafePathError):
        train_gpt2_tokenizer(other, texts, vocab_size=300)
    assert (other / "vocab.json").read_text() == "my notes"
