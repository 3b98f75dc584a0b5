"""Build GPT-2-format tokenizers offline, for tests and the offline demo models."""

from pathlib import Path

SAMPLE_TEXT = [
    "A man riding a wave on top of a surfboard.",
    "A red circle on a blue background.",
    "A green square on a yellow background.",
    "Two dogs playing with a frisbee in the park.",
    "A plate of food with broccoli and rice.",
    "A cat sitting on a wooden table next to a laptop.",
    "A train traveling down the tracks near a station.",
    "Une personne qui marche dans la rue, sous la pluie.",
]


def train_gpt2_tokenizer(directory, vocab_size=400, texts=None):
    """Train a byte-level BPE on `texts` and save it in GPT-2's format; returns the directory (str).

    The result loads with ``GPT2TokenizerFast.from_pretrained(directory)``; ``<|endoftext|>`` is its
    special token, as in GPT-2.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = list(texts or SAMPLE_TEXT) * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(directory))
    # Save through transformers too, so the directory holds the same files as a hub GPT-2 snapshot.
    # (transformers 5 ignores vocab_file/merges_file keywords: give the files as vocab/merges)
    tok = GPT2TokenizerFast(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
    )
    tok.save_pretrained(str(directory))
    return str(directory)
