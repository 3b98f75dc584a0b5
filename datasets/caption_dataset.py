"""`CaptionDataset`: images and their captions, each image listed once (what every loader returns).

Captions point at their image by index, so that CLIP embeddings are computed once per image (COCO has five
captions per image; the official ClipCap script encodes each image once per caption) and references can be
grouped per image for evaluation.

Example::

    data = CaptionDataset.from_pairs([("a.jpg", "a red circle."), ("a.jpg", "a round red shape."),
                                      ("b.jpg", "a blue square.")])
    data.images          # ['a.jpg', 'b.jpg']
    data.image_index     # array([0, 0, 1])
    data.references()    # {'a.jpg': ['a red circle.', 'a round red shape.'], 'b.jpg': ['a blue square.']}
"""

from dataclasses import dataclass, field

import numpy as np


class DatasetError(ValueError):
    """A dataset file that cannot be read: missing, malformed, or inconsistent (named in the message)."""


def _shown(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_image_id(value, where):
    """``value`` when it can be an image id: an int or a str (hashable, written back to JSON as it was read);
    else a `DatasetError` naming ``where`` (the file and the entry)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DatasetError(f"{where}: an image id must be an integer or a string, got {_shown(value)}")
    return value


def check_text(value, where, what, empty=True):
    """``value`` when it is a str (non-empty unless ``empty``, no NUL character); else a `DatasetError` naming
    ``where`` and ``what`` (e.g. "its 'caption'")."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be a string, got {_shown(value)}")
    if not empty and not value.strip():
        raise DatasetError(f"{where}: {what} is empty")
    if "\0" in value:
        raise DatasetError(f"{where}: {what} holds a NUL character")
    return value


def check_type(value, kind, where, what):
    """``value`` when it is a ``kind`` (``list`` or ``dict``); else a `DatasetError` naming ``where``."""
    if not isinstance(value, kind):
        name = {list: "a list", dict: "an object"}.get(kind, kind.__name__)
        raise DatasetError(f"{where}: {what} must be {name}, got {_shown(value)}")
    return value


@dataclass
class CaptionDataset:
    """Unique images and captions pointing at them.

    Attributes:
        images: image file paths, each once.
        image_ids: one id per image (the COCO id when there is one, else the path); unique.
        captions: caption texts.
        image_index: (N_captions,) int, the image of every caption.
        name: a label for logs.
    """

    images: list
    image_ids: list
    captions: list
    image_index: np.ndarray
    name: str = "dataset"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.images = [str(p) for p in self.images]
        self.image_ids = list(self.image_ids)
        self.captions = [str(c) for c in self.captions]
        self.image_index = np.asarray(self.image_index, dtype=np.int64).reshape(-1)
        if len(self.image_ids) != len(self.images):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.image_ids)} image ids")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise DatasetError(f"{self.name}: image ids are not unique")
        if len(self.image_index) != len(self.captions):
            raise DatasetError(f"{self.name}: {len(self.captions)} captions but {len(self.image_index)} indices")
        if len(self.image_index) and (self.image_index.min() < 0 or self.image_index.max() >= len(self.images)):
            raise DatasetError(f"{self.name}: a caption points at an image index out of range")

    @classmethod
    def from_pairs(cls, pairs, image_ids=None, name="dataset"):
        """From (image path, caption) pairs; images keep their first-seen order. ``image_ids``: path -> id."""
        images, index, captions, position = [], [], [], {}
        for image, caption in pairs:
            image = str(image)
            if image not in position:
                position[image] = len(images)
                images.append(image)
            index.append(position[image])
            captions.append(caption)
        ids = [image_ids[p] for p in images] if image_ids is not None else list(images)
        return cls(images, ids, captions, np.asarray(index, np.int64), name=name)

    def __len__(self):
        return len(self.captions)

    @property
    def num_images(self):
        return len(self.images)

    def pairs(self):
        """[(image path, caption)] in caption order."""
        return [(self.images[i], c) for i, c in zip(self.image_index, self.captions)]

    def references(self):
        """{image id: [caption, ...]}, in image order (ground truth for evaluation)."""
        refs = {image_id: [] for image_id in self.image_ids}
        for i, caption in zip(self.image_index, self.captions):
            refs[self.image_ids[i]].append(caption)
        return refs

    def select_images(self, keep):
        """A new dataset with only the images whose indices are in ``keep`` (and their captions)."""
        keep = [int(i) for i in keep]
        remap = {old: new for new, old in enumerate(keep)}
        rows = [j for j, i in enumerate(self.image_index) if int(i) in remap]
        return CaptionDataset([self.images[i] for i in keep], [self.image_ids[i] for i in keep],
                              [self.captions[j] for j in rows],
                              np.asarray([remap[int(self.image_index[j])] for j in rows], np.int64),
                              name=self.name, extra=dict(self.extra))

    def summary(self):
        return f"{self.name}: {self.num_images} images, {len(self)} captions"
