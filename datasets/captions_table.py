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
import json
from pathlib import Path

from datasets.caption_dataset import CaptionDataset, DatasetError


def _rows_csv(path, delimiter):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DatasetError(f"{path} is empty: a CSV table needs a header line (e.g. 'image,caption')")
        yield reader.fieldnames
        yield from enumerate(reader, start=2)


def _rows_jsonl(path):
    yield None
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line}: not valid JSON: {e}") from e
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
        image = Path(image)
        pairs.append((image if image.is_absolute() else root / image, str(caption).strip()))
    if not pairs:
        raise DatasetError(f"{path} holds no captions")
    return CaptionDataset.from_pairs(pairs, name=f"table:{path.name}")
