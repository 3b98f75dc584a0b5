"""Karpathy's splits (``dataset_coco.json``, also ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``).

Each entry of ``images`` has ``filename``, optionally ``filepath`` (COCO: ``train2014`` / ``val2014``),
``split`` (``train``, ``restval``, ``val`` or ``test``), ``sentences`` ([{"raw", "tokens"}]) and ``cocoid`` (COCO)
or ``imgid``. Image paths are ``image_root/filepath/filename``. As usual (and as ClipCap's COCO model),
``train`` includes ``restval`` unless ``include_restval=False``.

Example::

    test = load_karpathy("dataset_coco.json", "coco/", split="test")    # 5000 images, 25010 captions
"""

from pathlib import Path

from datasets.caption_dataset import CaptionDataset, DatasetError
from datasets.coco import _read_json

SPLITS = ("train", "restval", "val", "test")


def load_karpathy(json_file, image_root=None, split="train", include_restval=True):
    """A `CaptionDataset` of one split (or a list of splits) of a Karpathy JSON.

    Captions are the ``raw`` sentences, stripped. Image ids are ``cocoid`` when present (so that results
    can be scored against COCO's own annotations), else ``imgid``, else the path.
    """
    splits = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DatasetError(f"unknown Karpathy split(s) {unknown}; expected some of {SPLITS}")
    if "train" in splits and include_restval and "restval" not in splits:
        splits.append("restval")
    data = _read_json(json_file, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_file} is not a Karpathy split file: it needs a list 'images'")
    root = Path(image_root) if image_root is not None else Path(json_file).parent
    images, ids, index, captions = [], [], [], []
    for k, entry in enumerate(data["images"]):
        if "filename" not in entry or "split" not in entry or "sentences" not in entry:
            raise DatasetError(f"{json_file}: images[{k}] lacks 'filename', 'split' or 'sentences'")
        if entry["split"] not in splits:
            continue
        path = root / entry.get("filepath", "") / entry["filename"]
        image_id = entry.get("cocoid", entry.get("imgid", str(path)))
        for sentence in entry["sentences"]:
            if "raw" not in sentence:
                raise DatasetError(f"{json_file}: a sentence of images[{k}] lacks 'raw'")
            index.append(len(images))
            captions.append(sentence["raw"].strip())
        images.append(str(path))
        ids.append(image_id)
    if not images:
        raise DatasetError(f"{json_file} has no image in split(s) {splits}")
    return CaptionDataset(images, ids, captions, index, name=f"karpathy:{Path(json_file).stem}:{'+'.join(splits)}")
