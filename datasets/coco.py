"""COCO captions format: an annotations JSON (``captions_train2014.json``) and a folder of images.

The JSON holds ``images`` ([{"id", "file_name", ...}]) and ``annotations`` ([{"image_id", "caption", ...}]).
`write_coco_annotations` writes the same format (the ground truth pycocoevalcap reads) from any
`CaptionDataset`, and `write_coco_results` / `load_coco_results` handle the results format
([{"image_id", "caption"}]).

Example::

    train = load_coco("annotations/captions_train2014.json", "train2014/")
    print(train.summary())          # coco:captions_train2014: 82783 images, 414113 captions
"""

import os
from pathlib import Path

from datasets.caption_dataset import CaptionDataset, DatasetError, check_image_id, check_text, check_type
from utils.file_utils import DEFAULT_MAX_BYTES, UnsafePathError, read_json, write_json_atomic


def _read_json(path, what):
    """The JSON in ``path``: a regular file of at most `utils.file_utils.DEFAULT_MAX_BYTES` (a FIFO or device
    is refused instead of hanging or reading forever)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DatasetError(f"{what} not found: {path}")
    try:
        return read_json(path, DEFAULT_MAX_BYTES)
    except UnsafePathError as e:
        raise DatasetError(f"cannot read the {what}: {e}") from e
    except ValueError as e:  # not UTF-8, not JSON, nested too deep (read_json names the file)
        raise DatasetError(f"cannot read the {what}: {e}") from e


def load_coco(annotations_file, image_dir=None, check_images=False):
    """A `CaptionDataset` from a COCO captions annotations JSON; image paths are ``image_dir/file_name``.

    Args:
        annotations_file: the annotations JSON.
        image_dir: the image folder (default: the JSON's folder).
        check_images: raise if an image file does not exist (otherwise extraction reports it).

    Images without captions are kept (they can still be captioned and scored by CLIPScore); a caption whose
    ``image_id`` is not among ``images`` is an error.
    """
    data = _read_json(annotations_file, "COCO annotations file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{annotations_file} is not a COCO captions file: it needs 'images' and 'annotations'")
    image_dir = Path(image_dir) if image_dir is not None else Path(annotations_file).parent
    images, ids, position = [], [], {}
    for k, image in enumerate(check_type(data["images"], list, annotations_file, "'images'")):
        where = f"{annotations_file}: images[{k}]"
        if "id" not in check_type(image, dict, where, "each image") or "file_name" not in image:
            raise DatasetError(f"{where} lacks 'id' or 'file_name'")
        image_id = check_image_id(image["id"], where)
        file_name = check_text(image["file_name"], where, "its 'file_name'", empty=False)
        if image_id in position:
            raise DatasetError(f"{annotations_file}: image id {image_id!r} appears twice")
        position[image_id] = len(images)
        images.append(str(image_dir / file_name))
        ids.append(image_id)
    index, captions = [], []
    for k, ann in enumerate(check_type(data["annotations"], list, annotations_file, "'annotations'")):
        where = f"{annotations_file}: annotations[{k}]"
        if "image_id" not in check_type(ann, dict, where, "each annotation") or "caption" not in ann:
            raise DatasetError(f"{where} lacks 'image_id' or 'caption'")
        image_id = check_image_id(ann["image_id"], where)
        caption = check_text(ann["caption"], where, "its 'caption'")
        if image_id not in position:
            raise DatasetError(f"{where} refers to unknown image id {image_id}")
        index.append(position[image_id])
        captions.append(caption.strip())
    if check_images:
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{len(missing)} images of {annotations_file} are missing, e.g. {missing[:3]}")
    name = f"coco:{Path(annotations_file).stem}"
    return CaptionDataset(images, ids, captions, index, name=name)


def write_coco_annotations(dataset: CaptionDataset, path, image_dir=None):
    """Write ``dataset`` as a COCO captions annotations JSON (file names relative to ``image_dir``).

    Image ids that are not integers (paths) are replaced by 0..N-1, as COCO tools expect integers; returns
    the {old id: new id} mapping used.
    """
    mapping = {}
    for k, image_id in enumerate(dataset.image_ids):
        mapping[image_id] = image_id if isinstance(image_id, int) else k
    image_dir = Path(image_dir) if image_dir is not None else None
    images = []
    for image, image_id in zip(dataset.images, dataset.image_ids):
        name = os.path.relpath(image, image_dir) if image_dir is not None else image
        images.append({"id": mapping[image_id], "file_name": name})
    annotations = [{"id": j, "image_id": mapping[dataset.image_ids[i]], "caption": c}
                   for j, (i, c) in enumerate(zip(dataset.image_index, dataset.captions))]
    _write_json(path, {"info": {"description": dataset.name}, "images": images, "annotations": annotations,
                       "type": "captions", "licenses": []})
    return mapping


def write_coco_results(results, path):
    """Write [{"image_id", "caption"}] (the format of COCO's caption results and pycocoevalcap's input)."""
    _write_json(path, [{"image_id": r["image_id"], "caption": r["caption"]} for r in results])


def load_coco_results(path):
    """{image_id: caption} from a COCO results JSON; an image with two results is an error."""
    data = _read_json(path, "COCO results file")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a results file is a list of {{'image_id', 'caption'}}")
    out = {}
    for k, r in enumerate(data):
        if not isinstance(r, dict) or "image_id" not in r or "caption" not in r:
            raise DatasetError(f"{path}: entry {k} lacks 'image_id' or 'caption'")
        image_id = check_image_id(r["image_id"], f"{path}: entry {k}")
        if image_id in out:
            raise DatasetError(f"{path}: image id {image_id!r} has more than one result")
        out[image_id] = check_text(r["caption"], f"{path}: entry {k}", "its 'caption'")
    return out


def _write_json(path, data):
    """Atomic, umask-respecting (`utils.file_utils.write_json_atomic`; a unique temporary name, so concurrent
    writers never share one)."""
    write_json_atomic(path, data, indent=None)
