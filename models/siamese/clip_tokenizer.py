"""OpenAI CLIP's byte-level BPE tokenizer, offline, without importing the ``clip`` package.

Token ids equal ``clip.tokenize``'s: the same text cleaning (ftfy, HTML unescaping twice, whitespace
collapsing, lower-casing), the same pre-tokenisation regex, the same 48,894 merges of OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` and the same ``<|startoftext|>`` / ``<|endoftext|>`` ids (49406, 49407).
The vocabulary file ships with this library (``models/siamese/vocab/``, OpenAI's file unchanged, MIT licence
beside it), so neither torch nor OpenAI's ``clip`` package is needed. A saved model keeps its own copy of the
file, so loading needs nothing else.

Example::

    tokenizer = CLIPTokenizer()                     # the vocabulary shipped in models/siamese/vocab/
    ids = tokenizer.tokenize(["a photo of a cat"])  # (1, 77) int32, zero-padded
"""

import html
import os
from functools import lru_cache

import numpy as np

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file


def default_vocab_path():
    """Path of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` shipped with this library (``models/siamese/vocab/``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab", VOCAB_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenAI's CLIP vocabulary is missing from this checkout: {path} "
                                "(restore it with git, or pass vocab_path= to CLIPTokenizer)")
    return path


#: bounds of a vocabulary file: OpenAI's is 1.36 MB gzipped, 3.2 MB of text
MAX_VOCAB_FILE_BYTES = 8 << 20
MAX_VOCAB_TEXT_BYTES = 8 << 20
_CHUNK = 1 << 16


def read_vocab_text(path, max_file_bytes=MAX_VOCAB_FILE_BYTES, max_text_bytes=MAX_VOCAB_TEXT_BYTES) -> str:
    """The text of a gzipped vocabulary file: a regular file of at most ``max_file_bytes``
    (`utils.file_utils.open_regular_file`), decompressed a bounded piece at a time, never more than
    ``max_text_bytes`` (a small file that inflates to gigabytes is refused, not decompressed); ValueError
    naming the file when it is not gzip, truncated, too large or not UTF-8."""
    import zlib

    from utils.file_utils import open_regular_file

    path = os.fspath(path)
    pieces, size = [], 0
    with open_regular_file(path, max_file_bytes) as f:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        pending = b""
        while True:
            data = pending or inflater.unconsumed_tail or f.read(_CHUNK)
            pending = b""
            if not data:
                if not inflater.eof:
                    raise ValueError(f"{path}: truncated gzip data")
                break
            try:
                piece = inflater.decompress(data, max_text_bytes + 1 - size)
            except zlib.error as e:
                raise ValueError(f"{path}: not gzip data ({e})") from e
            size += len(piece)
            if size > max_text_bytes:
                raise ValueError(f"{path}: decompresses to more than {max_text_bytes} bytes, not a vocabulary file")
            pieces.append(piece)
            if inflater.eof:  # a gzip file may hold several members, one after the other
                pending = inflater.unused_data
                if not pending:
                    pending = f.read(_CHUNK)
                    if not pending:
                        break
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        return b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def _is_vocab_file(path):
    """Whether ``path`` holds a CLIP vocabulary (gzip text of OpenAI's merges, as `read_vocab_text` reads it):
    what `CLIPTokenizer.save` may replace."""
    try:
        return len(read_vocab_text(path).split("\n", _NUM_MERGES + 1)) > _NUM_MERGES
    except (OSError, ValueError):  # UnsafePathError is a ValueError
        return False


@lru_cache(maxsize=1)
def _bytes_to_unicode():
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class CLIPTokenizer:
    """OpenAI's ``SimpleTokenizer`` + ``clip.tokenize``, reading a ``bpe_simple_vocab_16e6.txt.gz``.

    Args:
        vocab_path: the gzipped merges file (default: the one shipped in ``models/siamese/vocab/``).
        context_length: rows are zero-padded to this length (77 for every OpenAI CLIP).
    """

    START, END = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, vocab_path=None, context_length=77, cache_size=50_000):
        import ftfy  # CLIP's text cleaning: imported here so the module loads without them
        import regex

        self._ftfy = ftfy
        self._regex = regex
        self.vocab_path = os.fspath(vocab_path) if vocab_path is not None else default_vocab_path()
        self.context_length = context_length
        try:
            lines = read_vocab_text(self.vocab_path).split("\n")
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.vocab_path} is not a readable CLIP vocabulary file ({e})") from e
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path} is not OpenAI's CLIP BPE merges file")
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [self.START, self.END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token = self.encoder[self.START]
        self.eot_token = self.encoder[self.END]
        self.vocab_size = len(self.encoder)
        self._cache_size = cache_size
        self._cache = {}
        self._pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def _clean(self, text):
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        return self._regex.sub(r"\s+", " ", text).strip().lower()

    def _bpe(self, token):
        if token in (self.START, self.END):
            return [token]
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = word
        return word

    def encode(self, text):
        """Token ids of `text` without the start / end tokens."""
        ids = []
        for token in self._pattern.findall(self._clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token))
        return ids

    def decode(self, ids):
        """Text of token ids (start / end / padding ids are kept as their token strings, 0 is '!')."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, texts, truncate=False):
        """``clip.tokenize``: (N, context_length) int32, ``[sot] + ids + [eot]`` then zeros.

        A text longer than the context raises ``ValueError`` unless ``truncate`` (then the last kept token
        becomes end-of-text, as OpenAI does).
        """
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), self.context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            tokens = [self.sot_token] + self.encode(text) + [self.eot_token]
            if len(tokens) > self.context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} is {len(tokens)} tokens long, more than the context length "
                        f"{self.context_length} (pass truncate=True to cut it): {text[:80]!r}"
                    )
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token
            result[row, : len(tokens)] = tokens
        return result

    def save(self, directory):
        """Copy the vocabulary file into `directory` (created if needed; what `from_directory` reads back);
        returns its path. The copy is read bounded (a regular file of at most `MAX_VOCAB_FILE_BYTES`) and
        written atomically; a file already of that name is replaced only when it is a CLIP vocabulary file (a
        previous save), never through a link (`utils.file_utils.UnsafePathError` otherwise, nothing changed)."""
        from utils.file_utils import atomic_write, check_overwritable, read_regular_file

        directory = os.fspath(directory)
        target = os.path.join(directory, VOCAB_FILENAME)
        if os.path.abspath(target) == os.path.abspath(self.vocab_path):
            return target
        check_overwritable(target, _is_vocab_file, what="a CLIP vocabulary file")
        atomic_write(target, read_regular_file(self.vocab_path, MAX_VOCAB_FILE_BYTES), mode="wb")
        return target

    @classmethod
    def from_directory(cls, directory, context_length=77):
        path = os.path.join(directory, VOCAB_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no CLIP tokenizer vocabulary ({VOCAB_FILENAME})")
        return cls(path, context_length=context_length)
