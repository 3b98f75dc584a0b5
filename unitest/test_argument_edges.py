"""Hostile or careless arguments and files at the edges of tokenizers, decoding options and precisions: each
refused with an error naming the file or the option and what was expected, nothing written where it should not be."""

import json
import os
import shutil
from pathlib import Path

import pytest

from utils.tokenizer import TokenizerError, load_gpt2_tokenizer

# ------------------------------------------------------------------------------ GPT-2 vocabularies


def _vocab_folder(source, directory, edit, layout):
    """A copy of tokenizer folder ``source`` as ``layout`` ("vocab_merges" or "tokenizer_json") whose vocabulary
    ({token: id}) is ``edit(vocab)``."""
    directory.mkdir()
    if layout == "vocab_merges":
        shutil.copy(Path(source) / "merges.txt", directory / "merges.txt")
        vocab = json.loads((Path(source) / "vocab.json").read_text(encoding="utf-8"))
        (directory / "vocab.json").write_text(json.dumps(edit(vocab)), encoding="utf-8")
    else:
        data = json.loads((Path(source) / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"]["vocab"] = edit(data["model"]["vocab"])
        (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def _set(token, value):
    def edit(vocab):
        return {**vocab, token: value}
    return edit


#: vocabularies whose ids do not number the embedding rows: two tokens sharing a row, an id past the last
#: row (the stop token 10**6 was accepted by a 400-row GPT-2: its captions never stopped), a gap, a negative
#: or non-integer id
BAD_VOCABS = {
    "duplicate id": (lambda v: {**v, ".": v["a"]}, "both have id"),
    "id past the rows": (_set(".", 10**6), "outside 0"),
    "gap": (lambda v: {**v, "zz-new-token": len(v) + 5}, "outside 0"),
    "negative id": (_set(".", -1), "outside 0"),
    "float id": (_set(".", 1.5), "integer"),
    "bool id": (_set(".", True), "integer"),
    "string id": (_set(".", "13"), "integer"),
    "not an object": (lambda v: list(v), "JSON object"),
}


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json"])
@pytest.mark.parametrize("case", sorted(BAD_VOCABS))
def test_a_vocabulary_whose_ids_are_not_its_rows_is_refused(gpt2_tokenizer_dir, tmp_path, case, layout):
    """A crafted vocab.json / tokenizer.json loaded silently: ``len(tokenizer)`` (what conversion compares with
    GPT-2's rows) no longer bounded the ids, and two tokens could share one id (decoded as the other)."""
    edit, message = BAD_VOCABS[case]
    directory = _vocab_folder(gpt2_tokenizer_dir, tmp_path / "tok", edit, layout)
    with pytest.raises(TokenizerError, match=message) as raised:
        load_gpt2_tokenizer(directory)
    assert "vocab" in str(raised.value) or "tokenizer.json" in str(raised.value)


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json"])
def test_a_renumbered_but_complete_vocabulary_still_loads(gpt2_tokenizer_dir, tmp_path, layout):
    """Ids 0 .. n-1, each once, in any order of the file: accepted, and its ids are what the file says."""
    def shuffled(vocab):
        return dict(sorted(vocab.items(), key=lambda item: -item[1]))

    directory = _vocab_folder(gpt2_tokenizer_dir, tmp_path / "tok", shuffled, layout)
    tokenizer = load_gpt2_tokenizer(directory)
    reference = load_gpt2_tokenizer(gpt2_tokenizer_dir)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert tokenizer.encode("A cat.") == reference.encode("A cat.")


# ------------------------------------------------------------------------------ CLIP's vocabulary file


def test_clip_tokenizer_save_never_writes_through_a_link(tmp_path):
    """``CLIPTokenizer.save`` copied its vocabulary over whatever held the name, following a link: the file the
    link named (here a user's notes) was replaced by 1.36 MB of gzip."""
    from models.siamese.clip_tokenizer import VOCAB_FILENAME, CLIPTokenizer
    from utils.file_utils import UnsafePathError

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / VOCAB_FILENAME).symlink_to(notes)
    tokenizer = CLIPTokenizer()
    with pytest.raises(UnsafePathError, match="refusing to overwrite"):
        tokenizer.save(out)
    assert notes.read_text() == "my notes\n" and (out / VOCAB_FILENAME).is_symlink()
    # a stranger's file of that name is kept too; a folder of its own (a previous save) is written again
    (out / VOCAB_FILENAME).unlink()
    (out / VOCAB_FILENAME).write_text("not a vocabulary")
    with pytest.raises(UnsafePathError):
        tokenizer.save(out)
    assert (out / VOCAB_FILENAME).read_text() == "not a vocabulary"
    fresh = tmp_path / "fresh"
    target = tokenizer.save(fresh)
    assert Path(target).read_bytes() == Path(tokenizer.vocab_path).read_bytes()
    assert tokenizer.save(fresh) == target  # its own file: replaced by the same bytes
    again = CLIPTokenizer.from_directory(fresh)
    assert (again.tokenize(["a photo of a cat"]) == tokenizer.tokenize(["a photo of a cat"])).all()
    assert not os.path.islink(target)


# ------------------------------------------------------------------------------ command-line batch sizes


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_a_batch_size_below_one_is_a_usage_error_before_any_load(value, tmp_path, capsys):
    """``caption --batch-size 0`` was refused only after the model was loaded (4.8 s on the tiny model, against
    0.3 s for any other bad decoding option); ``evaluate`` after loading the model and reading the dataset.
    Every command that takes the decoding options refuses it when parsing (here the model does not even
    exist: a load would have failed first, with exit 3)."""
    import argparse

    import main
    from utils.cli import EXIT_USAGE, add_decoding_arguments

    with pytest.raises(SystemExit) as raised:  # argparse's usage error
        main.main(["caption", "demo/cat.jpg", "--model", str(tmp_path / "no_such_model"), "--no-progress",
                   "--batch-size", value])
    assert raised.value.code == EXIT_USAGE
    assert "--batch-size" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["--batch-size", value])
    assert raised.value.code == EXIT_USAGE
    assert parser.parse_args(["--batch-size", "3"]).batch_size == 3
