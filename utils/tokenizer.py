"""GPT-2's tokenizer, loaded from a local directory or a hub name, made ready for batched decoding.

The tokenizer is a `utils.gpt2_tokenizer.GPT2Tokenizer` (the ``tokenizers`` library, ids and text identical
to transformers' ``GPT2TokenizerFast``): loading one never imports transformers, so ``ClipCap.load`` does not
pay for it. A hub name is located in the Hugging Face cache (or downloaded) by ``huggingface_hub``.

GPT-2 has no padding token: `load_gpt2_tokenizer` sets ``pad_token = eos_token`` (``<|endoftext|>``) so
batches can be padded. Padded positions are excluded by the attention/padding mask, never by their id, so
sharing the id with end-of-text is harmless. The stop token of generation is looked up in the vocabulary
(`stop_token_id`), never written as a literal id: another vocabulary gives another id.

Which token ends a caption is the model's choice, recorded with it (``ClipCap.stop_token``, in its
config.json): ``.`` (`DEFAULT_STOP_TOKEN`) for the English GPT-2 checkpoints and every folder that records
none; another language may end its sentences with ``。`` or ``!``, and a multilingual vocabulary may have no
single-token full stop at all: its end-of-text token (``<|endoftext|>``, `is_special_token`) then serves.

Example::

    tokenizer = load_gpt2_tokenizer("gpt2")                 # HF cache, or a local directory
    stop = stop_token_id(tokenizer, ".")                    # 13 for GPT-2's vocabulary
"""

import os

from utils.gpt2_tokenizer import MAX_FILE_BYTES  # GPT-2's files are ~1-2 MB: a larger one is refused

#: The stop token of a model that records none (English GPT-2: captions end with a full stop).
DEFAULT_STOP_TOKEN = "."
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # or tokenizer.json alone
#: Every file of a tokenizer directory that is read.
_READ_FILES = (*TOKENIZER_FILES, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json")


class TokenizerError(ValueError):
    """A tokenizer cannot be found or loaded, or a stop token is not a single token."""


def load_gpt2_tokenizer(name_or_dir):
    """A `GPT2Tokenizer` from a local directory or a hub name (through the HF cache); pad = eos.

    A directory must hold ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``. A hub name is looked up in
    the Hugging Face cache (``HF_HOME``), and downloaded only when online; offline and uncached raises a
    `TokenizerError` saying which files are needed and where to put them.
    """
    name_or_dir = os.fspath(name_or_dir)
    if os.path.isdir(name_or_dir):
        tokenizer = _load_directory(name_or_dir)
    else:
        if os.sep in name_or_dir and not os.path.exists(name_or_dir):
            # a hub name has at most one '/', which is os.sep on POSIX: only reject clear paths
            if name_or_dir.count("/") > 1 or name_or_dir.startswith((".", "/", "~")):
                raise TokenizerError(f"tokenizer directory not found: {name_or_dir}")
        try:
            directory = _hub_snapshot(name_or_dir)
        except Exception as e:
            raise TokenizerError(
                f"cannot load the tokenizer {name_or_dir!r} from the Hugging Face hub or its cache "
                f"({type(e).__name__}). Offline, put vocab.json and merges.txt (or tokenizer.json) of "
                f"{name_or_dir!r} in a local directory and pass that directory instead, or fill the HF "
                f"cache (HF_HOME) while online."
            ) from e
        tokenizer = _load_directory(directory)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise TokenizerError(
            f"the tokenizer in {name_or_dir} has an empty vocabulary ({len(tokenizer)} tokens, all special): "
            f"its tokenizer.json was probably saved from a tokenizer built with arguments this transformers "
            f"version ignores; delete tokenizer.json to rebuild it from vocab.json and merges.txt"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.name_or_path = name_or_dir  # named by `stop_token_id`'s errors
    return tokenizer


def _load_directory(directory):
    """The checked `GPT2Tokenizer` of a local folder (`TokenizerError` naming the folder otherwise)."""
    from utils.gpt2_tokenizer import GPT2Tokenizer

    has_pair = all(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES)
    if not (has_pair or os.path.exists(os.path.join(directory, "tokenizer.json"))):
        raise TokenizerError(
            f"{directory} holds no GPT-2 tokenizer: it needs vocab.json and merges.txt (or tokenizer.json)"
        )
    _check_files(directory)
    try:
        return GPT2Tokenizer.from_directory(directory)
    except Exception as e:
        raise TokenizerError(f"cannot load the GPT-2 tokenizer in {directory}: {e}") from e


#: GPT-2 repositories the hub moved under ``openai-community/``: the old name is looked up under both.
_RENAMED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def _hub_snapshot(name):
    """The local folder of hub repository ``name``'s tokenizer files: the HF cache, downloaded when online and
    missing (``huggingface_hub``), never under ``IMAGE_CAPTIONING_OFFLINE=1`` (`utils.downloads.is_offline`:
    the cache only). GPT-2's own names (`_RENAMED`) are also looked up under ``openai-community/``, where the
    hub moved them (a cache filled under either name serves). The library's own loads go through
    `models.image_captioning.gpt2_hub.fetch_gpt2_tokenizer` first (mirror, manifest, one download at a time)."""
    from huggingface_hub import snapshot_download

    from utils.downloads import is_offline

    options = {"allow_patterns": list(_READ_FILES), "local_files_only": is_offline()}
    try:
        return snapshot_download(repo_id=name, **options)
    except Exception:
        if name not in _RENAMED:
            raise
        return snapshot_download(repo_id=f"openai-community/{name}", **options)


def _check_files(directory):
    """Refuse a tokenizer file that is not a regular file of sane size before it is opened (a FIFO
    would block forever, a link to /dev/zero would be read until memory runs out)."""
    from utils.file_utils import path_problem

    for name in _READ_FILES:
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            continue
        problem = path_problem(path)
        if problem:
            raise TokenizerError(f"cannot load the GPT-2 tokenizer in {directory}: {problem}")
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise TokenizerError(f"cannot load the GPT-2 tokenizer in {directory}: {path} has {size} bytes, more "
                                 f"than any tokenizer file ({MAX_FILE_BYTES} bytes)")


def describe_tokenizer(tokenizer):
    """``"the tokenizer 'tok/' (300 tokens)"``: how errors name a tokenizer (its source when it was loaded by
    `load_gpt2_tokenizer`, else its class)."""
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return f"the tokenizer {str(name)!r} ({len(tokenizer)} tokens)"


def is_special_token(tokenizer, token):
    """Whether ``token`` is one of the tokenizer's special tokens (``<|endoftext|>``): as a stop token it ends
    the caption without being written in its text."""
    return token in tuple(getattr(tokenizer, "all_special_tokens", ()) or ())


def stop_token_id(tokenizer, stop_token=DEFAULT_STOP_TOKEN):
    """The id of `stop_token`, which must encode to exactly one token of ``tokenizer``'s vocabulary; a
    `TokenizerError` naming the token and the tokenizer otherwise (with what the vocabulary offers instead).

    Example::

        stop_token_id(load_gpt2_tokenizer("gpt2"), ".")   # 13
        stop_token_id(chinese_tokenizer, "。")             # when "。" is one token of its vocabulary
    """
    if not isinstance(stop_token, str) or not stop_token:
        raise TokenizerError(f"stop_token must be a non-empty string, got {stop_token!r}")
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        eos = getattr(tokenizer, "eos_token", None)
        hint = f", or its end-of-text token {eos!r}" if eos and eos != stop_token else ""
        raise TokenizerError(
            f"stop token {stop_token!r} is not a single token of {describe_tokenizer(tokenizer)}: it encodes "
            f"to {len(ids)} tokens {ids} ({tokenizer.convert_ids_to_tokens(ids)}); choose a token of its "
            f"vocabulary (--stop-token: the mark its captions end with, e.g. '.', '。' or '!'{hint})"
        )
    return int(ids[0])
