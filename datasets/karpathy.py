"""Karpathy's splits (``dataset_coco.json``, also ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``).

Each entry of ``images`` has ``filename``, optionally ``filepath`` (COCO: ``train2014`` / ``val2014``),
``split`` (``train``, ``restval``, ``val`` or ``test``), ``sentences`` ([{"raw", "tokens"}]) and ``cocoid`` (COCO)
or ``imgid``. Image paths are ``image_root/filepath/filename``. As usual (and as ClipCap's COCO model),
``train`` includes ``restval`` unless ``include_restval=False``.

Example::

    test = load_karpathy("dataset_coco.json", "coco/", split="test")    # 5000 images, 25010 captions
"""

from pathlib import Path

from datasets.caption_dataset import CaptionDataset, DatasetError, check_image_id, check_text, check_type
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
        where = f"{json_file}: images[{k}]"
        check_type(entry, dict, where, "each image")
        if "filename" not in entry or "split" not in entry or "sentences" not in entry:
            raise DatasetError(f"{where} lacks 'filename', 'split' or 'sentences'")
        if check_text(entry["split"], where, "its 'split'") not in splits:
            continue
        filename = check_text(entry["filename"], where, "its 'filename'", empty=False)
        path = root / check_text(entry.get("filepath", ""), where, "its 'filepath'") / filename
        image_id = check_image_id(entry.get("cocoid", entry.get("imgid", str(path))), where)
        for j, sentence in enumerate(check_type(entry["sentences"], list, where, "its 'sentences'")):
            if "raw" not in check_type(sentence, dict, f"{where}: sentences[{j}]", "each sentence"):
                raise DatasetError(f"{where}: sentences[{j}] lacks 'raw'")
            index.append(len(images))
            captions.append(check_text(sentence["raw"], f"{where}: sentences[{j}]", "its 'raw'").strip())
        images.append(str(path))
        ids.append(image_id)
    if not images:
        raise DatasetError(f"{json_file} has no image in split(s) {splits}")
    return CaptionDataset(images, ids, captions, index, name=f"karpathy:{Path(json_file).stem}:{'+'.join(splits)}")
