"""Decoding arguments bounded by the model and by what one call may allocate, refused clearly and early.

- a beam wider than GPT-2's vocabulary (``top_k`` over fewer columns than beams: a TensorFlow traceback);
- ``beam_size`` / ``num_captions`` without an upper bound (40 000 sampled captions on the tiny model took
  14 GB; 10**8 a ResourceExhaustedError traceback): declared maxima, refused before the model loads;
- a saved folder whose tokenizer has more tokens than GPT-2 has embedding rows (a stop token without a row
  never stops the captions): refused at load, and a stop id beyond the rows refused by ``generate``;
- ``max_length`` beyond GPT-2's positions refused by ``check_generate_args`` (before any work).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import main
from custom_architectures.decoding import decoding
from custom_architectures.decoding_options import NUM_CAPTIONS
from custom_architectures.samplers import BEAM_SIZE
from models.image_captioning import ClipCap
from models.image_captioning.saving import ModelLoadError
from testing import tiny_models as factory
from testing.tiny_models import random_embeddings

ROOT = Path(__file__).resolve().parents[1]
#: the declared maxima of beam_size and num_captions (`decoding_options.MAX_BEAM_SIZE` / `MAX_NUM_CAPTIONS`)
MAXIMUM = {"beam_size": 256, "num_captions": 4096, "magic_k": 512}


# ------------------------------------------------------------------------ A: beams beyond the vocabulary


def test_beam_size_beyond_the_vocabulary_is_a_clear_value_error(tiny_clipcap):
    """--beam-size 401 on the 400-token model gave "input must have at least k columns" (a traceback)."""
    model = tiny_clipcap
    beams = model.gpt2.vocab_size + 1
    with pytest.raises(ValueError, match=rf"beam_size.*{beams}"):
        model.check_generate_args("beam", beam_size=beams)
    with pytest.raises(ValueError, match=rf"beam_size.*{beams}"):
        model.generate(random_embeddings(1, model.prefix_size), method="beam", beam_size=beams, max_length=3)


def test_beam_size_is_checked_against_the_models_vocabulary(tmp_path_factory):
    """Beams must be at most GPT-2's rows (the first step takes the top beam_size of them), whatever the
    declared maximum: a GPT-2 of 100 rows refuses 101 beams naming both numbers, and takes 100."""
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
    from custom_architectures.transformers_arch.gpt2_arch import GPT2

    model = factory.tiny_clipcap(tmp_path_factory, with_clip=False)  # a fresh load: changed here
    gpt2 = model.gpt2
    small = GPT2(vocab_size=100, n_positions=gpt2.n_positions, n_embd=gpt2.n_embd, n_layer=1, n_head=gpt2.n_head)
    model.backbone = ClipCapBackbone(model.mapper, small)
    with pytest.raises(ValueError, match=r"beam_size=101 .*100"):
        model.check_generate_args("beam", beam_size=101, stop_token=None)
    model.check_generate_args("beam", beam_size=100, stop_token=None)


# ------------------------------------------------------------------ B: maxima of beam_size and num_captions


@pytest.mark.parametrize("method, kwargs, name", [
    ("beam", dict(beam_size=MAXIMUM["beam_size"] + 1), "beam_size"),
    ("beam", dict(beam_size=10**9), "beam_size"),
    ("sample", dict(num_captions=MAXIMUM["num_captions"] + 1), "num_captions"),
    ("sample", dict(num_captions=40000), "num_captions"),
    ("sample", dict(num_captions=10**8), "num_captions"),
    ("magic", dict(magic_k=MAXIMUM["magic_k"] + 1), "magic_k"),  # candidates per step multiply memory too
])
def test_beam_size_and_num_captions_have_declared_maxima(method, kwargs, name):
    value = kwargs[name]
    with pytest.raises(ValueError, match=rf"{name} must be in \[1, {MAXIMUM[name]}\], got {value}"):
        decoding(method, **kwargs)


def test_the_maxima_are_accepted_and_declared():
    from custom_architectures.decoding_options import MAX_BEAM_SIZE, MAX_NUM_CAPTIONS

    assert (MAX_BEAM_SIZE, MAX_NUM_CAPTIONS) == (MAXIMUM["beam_size"], MAXIMUM["num_captions"])
    assert NUM_CAPTIONS.maximum == MAX_NUM_CAPTIONS and BEAM_SIZE.maximum == MAX_BEAM_SIZE
    assert decoding("beam", beam_size=MAX_BEAM_SIZE, num_captions=MAX_BEAM_SIZE).sampler.num_sequences == 256
    assert decoding("sample", num_captions=MAX_NUM_CAPTIONS).num_captions == 4096
    assert decoding("beam", beam_size=np.int64(7)).sampler.num_sequences == 7


def test_maxima_apply_to_the_python_api(tiny_clipcap):
    with pytest.raises(ValueError, match=r"beam_size must be in \[1, 256\]"):
        tiny_clipcap.check_generate_args("beam", beam_size=10**9)
    with pytest.raises(ValueError, match=r"num_captions must be in \[1, 4096\]"):
        tiny_clipcap.check_generate_args("sample", num_captions=10**9)


@pytest.mark.parametrize("options", [["--method", "beam", "--beam-size", "401"],
                                     ["--method", "beam", "--beam-size", str(10**9)],
                                     ["--method", "sample", "--num-captions", "40000", "--max-length", "5"],
                                     ["--method", "sample", "--num-captions", "100000000"]])
def test_the_maxima_are_usage_errors_before_the_model_loads(options, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGE_CAPTIONING_OFFLINE", "1")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(main, "model_or_exit_code", never)
    code = main.main(["caption", str(ROOT / "demo"), "--model", "coco", "--no-save", *options])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ")
    name = "beam_size" if "--beam-size" in options else "num_captions"
    value = options[options.index("--" + name.replace("_", "-")) + 1]
    assert f"{name} must be in [1, {MAXIMUM[name]}], got {value}" in err


# -------------------------------------------------------------- C: tokenizer and stop id beyond GPT-2's rows


def _with_added_token(model_dir, directory, token="<|mark|>"):
    """A copy of the saved folder ``model_dir`` whose tokenizer.json has one more (special) token."""
    shutil.copytree(model_dir, directory)
    path = Path(directory) / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    size = len(data["model"]["vocab"]) + sum(t["id"] >= len(data["model"]["vocab"]) for t in data["added_tokens"])
    data["added_tokens"].append({"id": size, "content": token, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data))
    return Path(directory)


def test_a_tokenizer_larger_than_gpt2s_rows_is_refused_at_load(tiny_model_dir, tmp_path):
    """401 tokens for 400 rows loaded silently; the added token (id 400) has no row: as a stop token the
    captions never stopped."""
    folder = _with_added_token(tiny_model_dir, tmp_path / "bigvocab")
    with pytest.raises(ModelLoadError, match=r"tokenizer.*401 tokens.*400") as info:
        ClipCap.load(str(folder))
    assert str(folder / "tokenizer") in str(info.value)


def test_a_tokenizer_smaller_than_gpt2s_rows_still_loads(tiny_model_dir, tmp_path):
    """GPT-2 checkpoints are often padded (more rows than tokens): legitimate."""
    folder = tmp_path / "smallvocab"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "tokenizer")
    factory.train_gpt2_tokenizer(folder / "tokenizer", vocab_size=300)
    model = ClipCap.load(str(folder))
    assert len(model.tokenizer) < model.gpt2.vocab_size


def test_a_stop_token_without_an_embedding_row_is_refused(tiny_model_dir, tmp_path, tmp_path_factory):
    """A model built in memory with a larger tokenizer (not through `load`): the stop id must have a row."""
    from utils.tokenizer import load_gpt2_tokenizer

    folder = _with_added_token(tiny_model_dir, tmp_path / "bigvocab")
    model = factory.tiny_clipcap(tmp_path_factory, with_clip=False)  # a fresh load: changed here
    model.tokenizer = load_gpt2_tokenizer(str(folder / "tokenizer"))
    rows = model.gpt2.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token '<\|mark\|>'.*id {rows}.*{rows}"):
        model.check_generate_args("greedy", stop_token="<|mark|>")
    with pytest.raises(ValueError, match="stop_token"):
        model.generate(random_embeddings(1, model.prefix_size), stop_token="<|mark|>", max_length=5)
    model.check_generate_args("greedy", stop_token=".")  # a token with a row: fine


# ----------------------------------------------------------------------- H: max_length beyond the positions


def test_max_length_beyond_the_positions_is_refused_by_check_generate_args(tiny_clipcap):
    """The compiled loop feeds prefix + max_length - 1 positions (the last token is never fed)."""
    model = tiny_clipcap
    k, positions = model.prefix_length, model.gpt2.n_positions
    longest = positions - k + 1
    model.check_generate_args("greedy", max_length=longest)
    model.check_generate_args("beam", max_length=longest)
    for length in (longest + 1, 10**9):
        with pytest.raises(ValueError, match=rf"max_length={length}.*n_positions={positions}"):
            model.check_generate_args("greedy", max_length=length)
