"""GPT-2's byte-level BPE tokenizer on the `tokenizers` library alone: transformers is never imported.

`GPT2Tokenizer` gives the token ids and decoded text of transformers 5's ``GPT2TokenizerFast`` for a GPT-2
format folder, built the way ``GPT2TokenizerFast.from_pretrained`` builds it:

- the BPE model from ``vocab.json`` + ``merges.txt``, or the vocabulary and merges of ``tokenizer.json``
  (transformers keeps only those and the post-processor of that file; so do we), with GPT-2's BPE settings
  (no dropout, no subword prefix / suffix, no unknown-token fusing); its ids must number its tokens
  (0 .. n-1, each once, the rows of GPT-2's embedding: `_check_vocab`), where transformers takes any;
- a ``ByteLevel`` pre-tokenizer (``add_prefix_space`` from ``tokenizer_config.json``, default False) and
  ``ByteLevel`` decoder;
- the post-processor of ``tokenizer.json``; without one, ``add_bos_token`` / ``add_eos_token`` of the config
  as transformers' template, or else a ``ByteLevel(trim_offsets=True)`` post-processor (GPT-2's converter),
  which adds no token;
- the added tokens (``added_tokens_decoder`` of the config, else ``added_tokens.json`` and the
  ``added_tokens`` of ``tokenizer.json``) then the named special tokens (``special_tokens_map.json`` / config;
  ``<|endoftext|>`` by default for bos, eos and unk), in transformers' order, so new ones get its ids.

Only what this repository calls is implemented (encode, decode, batch ``__call__`` with padding, the special
tokens and their ids, the vocabulary, ``save_pretrained``), with transformers' defaults: ``decode`` keeps
special tokens and does no clean-up of spaces. ``save_pretrained`` writes ``tokenizer.json`` and
``tokenizer_config.json``, which ``GPT2TokenizerFast.from_pretrained`` reads back to the same tokenizer.

Example::

    tokenizer = GPT2Tokenizer.from_directory("pretrained_models/coco/tokenizer")
    ids = tokenizer.encode("A cat on a mat.")
    tokenizer.decode(ids)                         # 'A cat on a mat.'
    tokenizer(["A cat.", "Two dogs."], padding=True)["attention_mask"]
"""

import json
import os
import tempfile

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from utils.file_utils import (
    UnsafePathError,
    atomic_write,
    check_overwritable,
    read_regular_file,
    write_json_atomic,
)
from utils.file_utils import read_json as read_json_file  # `from_directory` has its own read_json

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
GPT2_SPECIAL_TOKEN = "<|endoftext|>"
#: What GPT2TokenizerFast assumes when the config names no token (GPT-2 has no pad token: the loader sets it).
DEFAULT_SPECIAL_TOKENS = {"bos_token": GPT2_SPECIAL_TOKEN, "eos_token": GPT2_SPECIAL_TOKEN,
                          "unk_token": GPT2_SPECIAL_TOKEN}
#: transformers' "no limit" model_max_length (int(1e30)), written when the config gave none.
VERY_LARGE_INTEGER = int(1e30)
#: Bounds every file read (GPT-2's are ~1-2 MB).
MAX_FILE_BYTES = 64 * 1024**2


def _token_text(value):
    """A special token of a config: a string or an ``AddedToken`` dict -> its text (None stays None)."""
    if isinstance(value, dict):
        return value["content"]
    return None if value is None else str(value)


def _added_token(entry, special=None):
    """An ``AddedToken`` dict of a config / tokenizer.json -> ``tokenizers.AddedToken``."""
    fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
    if special is not None:
        fields["special"] = special
    return AddedToken(entry["content"], **fields)


def _check_vocab(vocab, source):
    """``vocab`` ({token: id} of vocab.json or tokenizer.json) itself when its ids number its tokens: integers
    0 .. n-1, each once, as GPT-2's (its ids are the rows of the model's token embedding). ValueError naming
    ``source`` and the first entry otherwise: a repeated id decodes one token as another, and an id past
    ``n - 1`` escapes ``len(tokenizer)``, the bound conversion checks against GPT-2's rows (a stop token of id
    10**6 in a 400-token vocabulary was accepted, and its captions never stopped)."""
    if not isinstance(vocab, dict):
        raise ValueError(f"{source}: the vocabulary must be a JSON object {{token: id}}, got {type(vocab).__name__}")
    count, seen = len(vocab), {}
    for token, index in vocab.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{source}: token {token!r} has id {index!r}: ids are integers 0 .. {count - 1}")
        if not 0 <= index < count:
            raise ValueError(f"{source}: token {token!r} has id {index}, outside 0 .. {count - 1}: the ids of a "
                             f"vocabulary of {count} tokens number them, each id once")
        if index in seen:
            raise ValueError(f"{source}: tokens {seen[index]!r} and {token!r} both have id {index}: each id "
                             "names one token")
        seen[index] = token
    return vocab


def _read_merges(path):
    """merges.txt -> [(a, b), ...], as ``tokenizers.models.BPE.read_file`` parses it: ``#version`` lines
    skipped, every other line two tokens separated by one space (ValueError naming the line otherwise)."""
    merges = []
    for number, line in enumerate(read_regular_file(path, MAX_FILE_BYTES).decode("utf-8").splitlines(), start=1):
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: a merge is two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class GPT2Tokenizer:
    """GPT-2's tokenizer (a ``tokenizers.Tokenizer``) with the interface of ``GPT2TokenizerFast`` this
    repository uses. Build it with `from_directory`; ``utils.tokenizer.load_gpt2_tokenizer`` adds the checks."""

    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, backend: Tokenizer, config: dict):
        """``backend``: the built ``tokenizers.Tokenizer``; ``config``: the tokenizer_config.json entries
        (special tokens as text), kept for `save_pretrained`."""
        self.backend_tokenizer = backend
        self.config = dict(config)
        for name in SPECIAL_TOKENS_ATTRIBUTES:
            setattr(self, name, _token_text(self.config.get(name)))
        self.add_prefix_space = bool(self.config.get("add_prefix_space", False))
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        # transformers ignores the clean-up for BPE (it corrupts text) unless this flag forces it
        self._force_bpe_clean_up = bool(
            self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.split_special_tokens = bool(self.config.get("split_special_tokens", False))
        self.padding_side = self.config.get("padding_side", "right")
        self.truncation_side = self.config.get("truncation_side", "right")
        self.model_max_length = int(self.config.get("model_max_length", VERY_LARGE_INTEGER))
        backend.encode_special_tokens = self.split_special_tokens

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_directory(cls, directory):
        """Build from a GPT-2 format folder (see the module docstring); ``ValueError`` / ``OSError`` when a
        file is missing or malformed (the loader turns them into a ``TokenizerError``)."""
        directory = os.fspath(directory)

        def read_json(name):
            path = os.path.join(directory, name)
            return read_json_file(path, MAX_FILE_BYTES) if os.path.lexists(path) else None

        config = read_json("tokenizer_config.json") or {}
        tokenizer_json = read_json("tokenizer.json")
        bpe_settings = dict(dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        if tokenizer_json is not None:  # transformers reads its vocabulary, merges and post-processor only
            model = tokenizer_json.get("model") or {}
            if model.get("type") != "BPE":
                raise ValueError(f"{directory}/tokenizer.json is not a BPE tokenizer (model {model.get('type')!r})")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            vocab = _check_vocab(model.get("vocab", {}), f"{directory}/tokenizer.json")
            backend = Tokenizer(BPE(vocab=vocab, merges=merges, **bpe_settings))
            post = tokenizer_json.get("post_processor")
            post_processor = None if post is None else Tokenizer.from_str(json.dumps(
                {**tokenizer_json, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []})).post_processor
            config = {k: v for k, v in config.items() if k not in ("add_bos_token", "add_eos_token")}
        else:  # each file read once, regular and bounded (BPE.read_file would open them again, unchecked)
            vocab = read_json("vocab.json")
            if vocab is None:
                raise ValueError(f"{directory}/vocab.json is missing")
            _check_vocab(vocab, f"{directory}/vocab.json")
            backend = Tokenizer(BPE(vocab=vocab, merges=_read_merges(os.path.join(directory, "merges.txt")),
                                    **bpe_settings))
            post_processor = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        backend.decoder = decoders.ByteLevel()
        if post_processor is not None:
            backend.post_processor = post_processor

        config = cls._special_tokens(config, directory, read_json("special_tokens_map.json"))
        # one call, in order: new tokens get transformers' ids (as one call per token would give them), and
        # `tokenizers` rebuilds its added-token matcher once, not once per token (30,000 tokens: 192 s -> 0.1 s)
        backend.add_tokens(cls._tokens_to_add(config, read_json("added_tokens.json"), tokenizer_json))
        tokenizer = cls(backend, config)
        if post_processor is None:
            tokenizer._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        return tokenizer

    @staticmethod
    def _special_tokens(config, directory, special_tokens_map):
        """The config with its special tokens as transformers settles them (as text; ``AddedToken`` dicts kept
        under ``_special_added`` for their flags)."""
        config = dict(config)
        if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
            config["extra_special_tokens"] = config.pop("additional_special_tokens")
        if "added_tokens_decoder" not in config and special_tokens_map:  # legacy file, as transformers
            for key, value in special_tokens_map.items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    config["extra_special_tokens"] = list(config.get("extra_special_tokens") or []) + [
                        v for v in value if v not in (config.get("extra_special_tokens") or [])]
                else:
                    config[key] = value
        for key, value in DEFAULT_SPECIAL_TOKENS.items():
            config.setdefault(key, value)
        extra = config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            raise ValueError(f"{directory}: model-specific special tokens ({sorted(extra)}) are not GPT-2's")
        return config

    @staticmethod
    def _tokens_to_add(config, added_tokens_file, tokenizer_json):
        """The ``AddedToken``s transformers adds, in its order: the saved added tokens by index, then each
        named / extra special token not among them."""
        saved = {}
        if "added_tokens_decoder" in config:
            saved = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
        else:
            if added_tokens_file:
                special = {_token_text(config.get(k)) for k in SPECIAL_TOKENS_ATTRIBUTES if config.get(k)}
                special.update(_token_text(t) for t in config.get("extra_special_tokens") or [])
                for text, index in added_tokens_file.items():
                    saved[int(index)] = AddedToken(text, rstrip=False, lstrip=False, normalized=text not in special,
                                                   special=text in special)
            for entry in (tokenizer_json or {}).get("added_tokens", []):
                saved[int(entry["id"])] = _added_token(entry)
        tokens = [saved[i] for i in sorted(saved)]
        present = {t.content for t in tokens}
        named = [config.get(k) for k in SPECIAL_TOKENS_ATTRIBUTES] + list(config.get("extra_special_tokens") or [])
        for value in named:
            text = _token_text(value)
            if text is None or text in present:
                continue
            present.add(text)
            tokens.append(_added_token(value, special=True) if isinstance(value, dict)
                          else AddedToken(text, special=True, normalized=False))
        return tokens

    def _set_post_processor(self, add_bos, add_eos):
        """transformers' template when the config asks for bos / eos; GPT-2's ByteLevel otherwise."""
        if not (add_bos or add_eos):
            self.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
            return
        bos, eos = self.bos_token, self.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = ([(bos, self.convert_tokens_to_ids(bos))] if add_bos else []) + (
            [(eos, self.convert_tokens_to_ids(eos))] if add_eos else [])
        self.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                              special_tokens=list(dict.fromkeys(special)))

    # ------------------------------------------------------------------------------------------ vocabulary
    def __len__(self):
        """The whole vocabulary, added tokens included."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self):
        """The base vocabulary, without the added tokens (as transformers' ``vocab_size``)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self):
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self):
        """{id: ``tokenizers.AddedToken``} (``.content`` is the text)."""
        return self.backend_tokenizer.get_added_tokens_decoder()

    @property
    def all_special_tokens(self):
        """The named special tokens then the extra ones, each once (transformers' order)."""
        named = [getattr(self, k) for k in SPECIAL_TOKENS_ATTRIBUTES]
        extra = [_token_text(t) for t in self.config.get("extra_special_tokens") or []]
        return list(dict.fromkeys(t for t in named + extra if t is not None))

    @property
    def all_special_ids(self):
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        """A token -> its id (None when unknown, GPT-2 having no unknown id in its BPE); a list -> a list."""
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids if int(i) not in special]

    def __getattr__(self, name):
        """``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...: the id of that special token (or None)."""
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_TOKENS_ATTRIBUTES:
            token = self.__dict__.get(name[: -len("_id")])
            return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------------------------------ text <-> ids
    def encode(self, text, add_special_tokens=True):
        """One text -> its token ids (GPT-2 adds no special token unless its template says so)."""
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text, add_special_tokens=False):
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    def __call__(self, text, add_special_tokens=True, padding=False, truncation=False, max_length=None,
                 return_attention_mask=True):
        """A text or a list of texts -> ``{"input_ids", "attention_mask"}`` (lists, one row per text).

        ``padding``: False, True / ``"longest"`` (to the longest row) or ``"max_length"``; rows are padded on
        ``padding_side`` with ``pad_token_id`` and mask 0. ``truncation`` (True / ``"longest_first"``) cuts
        rows to ``max_length`` (default ``model_max_length``) on ``truncation_side``.
        """
        batched = isinstance(text, list | tuple)
        texts = list(text) if batched else [text]
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation not in (False, None, "do_not_truncate"):
            limit = self.model_max_length if max_length is None else int(max_length)
            rows = [r[:limit] if self.truncation_side == "right" else r[max(len(r) - limit, 0):] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding not in (False, None, "do_not_pad"):
            if padding == "max_length" and max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = int(max_length) if padding == "max_length" else max((len(r) for r in rows), default=0)
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token (load_gpt2_tokenizer sets pad = eos)")
            for i, row in enumerate(rows):
                fill = max(width - len(row), 0)
                if self.padding_side == "right":
                    rows[i], masks[i] = row + [self.pad_token_id] * fill, masks[i] + [0] * fill
                else:
                    rows[i], masks[i] = [self.pad_token_id] * fill + row, [0] * fill + masks[i]
        out = {"input_ids": rows if batched else rows[0]}
        if return_attention_mask:
            out["attention_mask"] = masks if batched else masks[0]
        return out

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """Token ids -> text (a list of id lists -> a list of texts). Special tokens are kept unless
        ``skip_special_tokens``; transformers ignores the clean-up of spaces for BPE, and so do we."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, list | tuple) and ids and isinstance(ids[0], list | tuple):
            return [self.decode(r, skip_special_tokens, clean_up_tokenization_spaces) for r in ids]
        text = self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and self._force_bpe_clean_up:
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, directory):
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed), as
        ``GPT2TokenizerFast.save_pretrained`` does: both this class and transformers read them back. An
        existing file of those names is replaced only when it is a GPT-2 tokenizer file (a previous save);
        returns the paths written."""
        directory = os.fspath(directory)
        config = {k: v for k, v in self.config.items()
                  if k not in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file",
                               "add_bos_token", "add_eos_token", "added_tokens_decoder", "is_local", "local_files_only")}
        config.update({name: getattr(self, name) for name in SPECIAL_TOKENS_ATTRIBUTES if getattr(self, name)})
        config.update(add_prefix_space=self.add_prefix_space, backend="tokenizers",
                      model_max_length=self.model_max_length, tokenizer_class="GPT2Tokenizer")
        config.setdefault("errors", "replace")
        paths = {name: os.path.join(directory, name) for name in ("tokenizer.json", "tokenizer_config.json")}
        for name, path in paths.items():
            check_overwritable(path, lambda p, n=name: _is_tokenizer_file(p, n), what=f"a tokenizer's {name}")
        atomic_write(paths["tokenizer.json"], self.backend_tokenizer.to_str(pretty=True))
        write_json_atomic(paths["tokenizer_config.json"], dict(sorted(config.items())), indent=2)
        return tuple(paths.values())


def train_gpt2_tokenizer(directory, texts, vocab_size=400, repeats=1):
    """Train a byte-level BPE on ``texts`` (each seen ``repeats`` times, merges down to frequency 1, GPT-2's
    ``<|endoftext|>`` as its special token) and save it in GPT-2's format into ``directory`` (created if
    needed): ``vocab.json`` + ``merges.txt`` as `tokenizers` writes them, then ``tokenizer.json`` +
    ``tokenizer_config.json`` (`GPT2Tokenizer.save_pretrained`); each file written atomically, an existing
    one replaced only when it is a tokenizer file. Returns the `GPT2Tokenizer`.

    The one trainer of the synthetic dataset's tokenizers (`datasets.synthetic_shapes`) and of the tests'
    and benchmarks' tiny ones (`testing.tiny_models`); training is deterministic for the same texts.
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts) * repeats, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=[GPT2_SPECIAL_TOKEN])
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for written in bpe.save_model(scratch):  # vocab.json, merges.txt
            name = os.path.basename(written)
            target = check_overwritable(os.path.join(directory, name), lambda p, n=name: _is_tokenizer_file(p, n),
                                        what=f"a tokenizer's {name}")
            atomic_write(target, read_regular_file(written, MAX_FILE_BYTES), mode="wb")
    tokenizer = GPT2Tokenizer.from_directory(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _is_tokenizer_file(path, name):
    """Whether ``path`` (named ``name``) is a GPT-2 tokenizer file a save may replace."""
    if name == "merges.txt":
        with open(path, "rb") as f:
            return f.read(9) == b"#version:"
    try:
        data = read_json_file(path, MAX_FILE_BYTES)
    except (OSError, ValueError, UnsafePathError):
        return False
    if name == "tokenizer.json":
        return isinstance(data, dict) and (data.get("model") or {}).get("type") == "BPE"
    if name == "vocab.json":
        return isinstance(data, dict) and all(isinstance(v, int) for v in data.values())
    return isinstance(data, dict) and data.get("tokenizer_class") in ("GPT2Tokenizer", "GPT2TokenizerFast")


def _clean_up_tokenization(text):
    """transformers' ``clean_up_tokenization`` (used only when a config forces it for BPE)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
