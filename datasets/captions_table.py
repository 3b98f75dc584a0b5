"""A plain table of (image path, caption): CSV (with a header) or JSONL (one object per line).

Relative image paths are taken relative to ``image_root`` (default: the table's folder). An image may have
several rows (several captions); it is listed once in the dataset.

Example (``captions.csv``)::

    image,caption
    photos/cat.jpg,A cat asleep on a sofa.
    photos/cat.jpg,A grey cat lying on cushions.

    data = load_captions_table("captions.csv")
    data = load_captions_table("captions.jsonl", image_column="file", caption_column="text")
"""

import csv
from pathlib import Path

from datasets.caption_dataset import CaptionDataset, DatasetError, check_text
from utils.file_utils import open_regular_file, parse_json

#: the longest physical line read from a table, in bytes (a CSV field stays under the csv module's own limit,
#: 131072 characters, which is kept: a field that long is in practice a quote left open)
MAX_LINE_BYTES = 1 << 20


class _Lines:
    """The lines of the binary file ``f`` decoded as UTF-8 (a byte-order mark on the first one dropped), line
    endings kept (as the csv module wants them); ``number``: the last line read (1-based), for messages.
    `DatasetError` naming the file, the line and the byte offset for bytes that are not UTF-8 or a line over
    `MAX_LINE_BYTES`."""

    def __init__(self, path, f):
        self.path, self.f, self.number, self.offset = path, f, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        raw = self.f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        self.number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DatasetError(f"{self.path}:{self.number}: a line longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{self.path}:{self.number}: not UTF-8 text (byte {self.offset + e.start} of the "
                               f"file: {raw[e.start:e.end]!r}); save the table as UTF-8") from e
        self.offset += len(raw)
        return text


def _rows_csv(path, delimiter):
    with open_regular_file(path, max_bytes=None) as f:
        lines = _Lines(path, f)
        reader = csv.DictReader(lines, delimiter=delimiter)
        try:
            if reader.fieldnames is None:
                raise DatasetError(f"{path} is empty: a CSV table needs a header line (e.g. 'image,caption')")
            yield reader.fieldnames
            for row in reader:
                yield lines.number, row
        except csv.Error as e:  # e.g. a field over the limit: a quote left open swallows the lines after it
            raise DatasetError(f"{path}:{lines.number}: {e} (a quote left open?)") from e


def _rows_jsonl(path):
    yield None
    with open_regular_file(path, max_bytes=None) as f:
        lines = _Lines(path, f)
        for text in lines:
            line = lines.number
            if not text.strip():
                continue
            try:  # depth-limited: a line of 100,000 nested brackets is an error, not a RecursionError
                row = parse_json(text.encode("utf-8"), f"{path}:{line}")
            except ValueError as e:
                raise DatasetError(str(e)) from e
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{line}: each line must be a JSON object")
            yield line, row


def load_captions_table(path, image_root=None, image_column="image", caption_column="caption", delimiter=None):
    """A `CaptionDataset` from a ``.csv`` / ``.tsv`` (header line) or ``.jsonl`` / ``.json`` lines table."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions table not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _rows_jsonl(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows = _rows_csv(path, delimiter or ("\t" if suffix == ".tsv" else ","))
    else:
        raise DatasetError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .jsonl")
    header = next(rows)
    if header is not None:
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise DatasetError(f"{path}: no column {missing} in the header {header}")
    root = Path(image_root) if image_root is not None else path.parent
    pairs = []
    for line, row in rows:
        image, caption = row.get(image_column), row.get(caption_column)
        if not image or caption is None or not str(caption).strip():
            raise DatasetError(f"{path}:{line}: empty or missing {image_column!r} / {caption_column!r}")
        image = Path(check_text(image, f"{path}:{line}", f"{image_column!r}"))  # JSONL: any JSON value
        caption = check_text(caption, f"{path}:{line}", f"{caption_column!r}")
        pairs.append((image if image.is_absolute() else root / image, caption.strip()))
    if not pairs:
        raise DatasetError(f"{path} holds no captions")
    return CaptionDataset.from_pairs(pairs, name=f"table:{path.name}")
