"""CLIP image embeddings computed once per image, batched, cached on disk, resumable.

`extract_embeddings` reads each *unique* image once (two reader threads), encodes them in batches and
stores every batch in an `EmbeddingCache` as soon as it is computed. A rerun (or a run resumed after an
interruption, or another dataset sharing images) only encodes what the cache does not hold. Images that
cannot be read are reported (returned with their error and logged) and left out: never replaced by zeros.

Cache layout (``<cache_dir>/<model key>/``)::

    model.json          the encoder's identity (model_id) the embeddings belong to
    index.jsonl         one line per shard: {"shard": "shard_000012.npy", "keys": [image key, ...]}
    shard_000012.npy    (B, D) float32 embeddings of those keys, in order

A shard is written to a temporary file and renamed, then its index line is appended and synced: an
interruption leaves at worst an unindexed shard (ignored, overwritten later) or a torn last index line
(ignored). The model key is a hash of ``model_id`` (for CLIP: `clip_model_id`, a hash of its image encoder's
config and weights and of the EXIF setting, versioned: ids of an older recipe name folders no longer used), so
two models never share embeddings. An image's key is its absolute path + size + modification time
(``key_mode="stat"``) or a hash of its bytes (``key_mode="content"``: survives moves and copies). One
writer per cache directory at a time.

Example::

    clip = CLIP.load("pretrained_models/clip_vit_b32")
    result = extract_embeddings(data.images, clip_encoder(clip), cache_dir="cache/embeddings")
    result.embeddings.shape, result.failed     # (N_ok, 512), {index: "no such image file: ..."}
    save_embedded_dataset("train_embeddings.npz", data, result, clip_encoder(clip).model_id)
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.caption_dataset import CaptionDataset, DatasetError
from utils.file_utils import (
    DEFAULT_MAX_BYTES,
    UnsafePathError,
    atomic_open,
    atomic_write,
    check_overwritable,
    file_lock,
    json_text,
    open_regular_file,
    parse_json,
    read_json,
    read_regular_file,
)
from utils.image_io import ImageReadError, read_image

logger = logging.getLogger(__name__)
_SHARD_NAME = re.compile(r"shard_[0-9]{6}\.npy")
INDEX_MAX_BYTES = 1 << 30  # the index of the cache: about 10 million images' keys

INDEX_FILENAME = "index.jsonl"
MODEL_FILENAME = "model.json"


# ------------------------------------------------------------------------------------------------ encoders


@dataclass
class ImageEncoder:
    """What extraction needs from an image model.

    Attributes:
        encode_batch: list of preprocessed images -> (B, D) array.
        model_id: a string that changes whenever the embeddings would (weights, preprocessing).
        preprocess: PIL image -> what ``encode_batch`` takes (runs in the reader threads); default: as is.
        read: image path -> decoded PIL image (runs in the reader threads); default: `read_image` with the
            ``exif_transpose`` given to `extract_embeddings`.
    """

    encode_batch: object
    model_id: str
    preprocess: object = None
    read: object = None


#: the version of `clip_model_id`'s recipe, part of the id: a new recipe never matches an old id (the old ids
#: ("clip:<hash>", of the whole config, text tower included) name cache folders that are no longer used)
CLIP_ID_VERSION = "v2"
#: the config fields of a CLIP that decide its image embeddings (its text tower's are left out: zero when it
#: was loaded visual-only or lazily, yet the images embed the same)
_VISUAL_CONFIG = ("embed_dim", "image_resolution")


def _visual_config(config):
    return {k: v for k, v in dict(config).items() if k in _VISUAL_CONFIG or str(k).startswith("vision_")}


def _hash_clip(clip, config, exif_transpose, version=""):
    h = hashlib.sha256()
    if version:
        h.update(f"clip-image-embeddings/{version}".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"exif_transpose={bool(exif_transpose)}".encode())
    for variable in clip.visual.weights:
        h.update(variable.path.encode())
        h.update(np.ascontiguousarray(np.asarray(variable.numpy())).tobytes())
    return h.hexdigest()


def clip_model_id(clip, exif_transpose=True):
    """A hash of what decides a `CLIP`'s image embeddings: its image-encoder config (``image_resolution``,
    ``vision_*``, ``embed_dim``) and weights, and the EXIF setting; its cache identity. The same whether or
    not its text tower is loaded (``visual_only``, ``lazy_text``, the CLIP inside a saved ClipCap)."""
    digest = _hash_clip(clip, _visual_config(clip.model.config), exif_transpose, CLIP_ID_VERSION)
    return f"clip:{CLIP_ID_VERSION}:{digest}"


def _legacy_clip_model_id(clip, exif_transpose):
    """The id before `CLIP_ID_VERSION` (the whole config hashed): only to keep accepting the files labelled so."""
    return f"clip:{_hash_clip(clip, dict(clip.model.config), exif_transpose)}"


def extracted_with(clip, model_id):
    """Whether embeddings labelled `model_id` came from `clip` (with or without EXIF transposition). An id of
    the older recipe (``clip:<hash>``, written before `CLIP_ID_VERSION`) is checked as it was then."""
    model_id = str(model_id)
    identify = clip_model_id if model_id.startswith(f"clip:{CLIP_ID_VERSION}:") else _legacy_clip_model_id
    return model_id in {identify(clip, exif_transpose) for exif_transpose in (True, False)}


def clip_encoder(clip, exif_transpose=True):
    """An `ImageEncoder` for a `models.siamese.clip.CLIP`: the stages of its `ImageEmbedder` (reading with
    ``exif_transpose``, OpenAI preprocessing, raw image features), identified by `clip_model_id`."""
    embedder = clip.image_embedder(exif_transpose=exif_transpose)
    return ImageEncoder(embedder.encode_batch, clip_model_id(clip, exif_transpose), embedder.preprocess,
                        embedder.read)


# --------------------------------------------------------------------------------------------------- cache


def image_key(path, key_mode="stat", max_bytes=DEFAULT_MAX_BYTES):
    """The cache key of an image file: ``abs path|size|mtime_ns`` or ``sha256:<hash of the bytes>`` (of a regular
    file of at most ``max_bytes``, as `read_image` reads: `utils.file_utils.UnsafePathError` otherwise)."""
    path = os.path.abspath(os.fspath(path))
    if key_mode == "stat":
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key_mode == "content":  # only a regular file is read (a FIFO would block, /dev/zero never end)
        h = hashlib.sha256()
        with open_regular_file(path, max_bytes) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"
    raise ValueError(f"key_mode must be 'stat' or 'content', got {key_mode!r}")


class EmbeddingCache:
    """Embeddings of one model, stored as appended shards + a JSON-lines index (see the module doc)."""

    def __init__(self, cache_dir, model_id):
        if not model_id:
            raise ValueError("an embedding cache needs a model_id (what identifies the encoder)")
        self.model_id = str(model_id)
        self.directory = Path(cache_dir) / hashlib.sha256(self.model_id.encode()).hexdigest()[:24]
        self.directory.mkdir(parents=True, exist_ok=True)
        model_file = self.directory / MODEL_FILENAME
        if model_file.exists():
            stored = read_json(model_file, 1 << 20)
            stored = stored.get("model_id") if isinstance(stored, dict) else stored
            if stored != self.model_id:
                raise DatasetError(f"{self.directory} belongs to another model ({stored!r})")
        else:
            atomic_write(model_file, json.dumps({"model_id": self.model_id}))
        self._rows = {}  # key -> (shard name, row)
        self._shards = {}  # shard name -> array (memory-mapped)
        self.dim = None
        self._load_index()

    def _load_index(self):
        index = self.directory / INDEX_FILENAME
        if not index.exists():
            return
        lines = read_regular_file(index, INDEX_MAX_BYTES).split(b"\n")  # bounded
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:  # depth-limited: a crafted line is an unreadable line, not a RecursionError
                entry = parse_json(line, f"{index}:{number}")
                shard, keys = entry["shard"], entry["keys"]
                if not _SHARD_NAME.fullmatch(shard):  # only our own shard files, never a path elsewhere
                    raise TypeError(shard)
                if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):  # image keys: strings
                    raise TypeError(keys)
            except (ValueError, KeyError, TypeError):
                # a torn line (interrupted append): its shard is recomputed
                logger.warning("%s:%d: unreadable index line ignored", index, number)
                continue
            try:
                array = np.load(self.directory / shard, mmap_mode="r")
            except (OSError, ValueError) as e:
                logger.warning("%s: shard %s unreadable (%s); its %d images will be encoded again",
                               self.directory, shard, e, len(keys))
                continue
            if array.ndim != 2 or len(array) != len(keys):
                logger.warning("%s: shard %s has shape %s for %d keys; ignored", self.directory, shard,
                               array.shape, len(keys))
                continue
            if array.dtype.kind != "f":  # strings, integers, complex: not embeddings `add` wrote (float32)
                logger.warning("%s: shard %s holds %s values, not float embeddings; ignored (its %d images will "
                               "be encoded again)", self.directory, shard, array.dtype, len(keys))
                continue
            if self.dim is not None and array.shape[1] != self.dim:
                raise DatasetError(f"{self.directory}: shards of different widths ({self.dim}, {array.shape[1]})")
            self.dim = array.shape[1]
            self._shards[shard] = array
            for row, key in enumerate(keys):
                self._rows[key] = (shard, row)

    def __len__(self):
        return len(self._rows)

    def __contains__(self, key):
        return key in self._rows

    def get(self, key):
        shard, row = self._rows[key]
        return np.array(self._shards[shard][row], dtype=np.float32)

    def add(self, keys, vectors):
        """Store (B, D) ``vectors`` for ``keys`` as one new shard (atomic), then index it (appended, synced)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        keys = list(keys)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"{len(keys)} keys but vectors of shape {vectors.shape}")
        if not keys:
            return
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise DatasetError(f"{self.directory} holds {self.dim}-d embeddings, got {vectors.shape[1]}-d")
        index = self.directory / INDEX_FILENAME
        with file_lock(index):  # concurrent writers: each shard gets its own number, each index line is whole
            # past every shard of ours (a user's ``shard_notes.npy`` there is neither counted nor touched)
            number = 1 + max([int(p.stem.split("_")[1]) for p in self.directory.glob("shard_*.npy")
                              if _SHARD_NAME.fullmatch(p.name)] or [-1])
            shard = f"shard_{number:06d}.npy"
            with atomic_open(self.directory / shard, "wb") as f:
                np.save(f, vectors)
            line = json_text({"shard": shard, "keys": keys}, indent=None) + "\n"  # non-UTF-8 names stay valid
            if index.exists() and index.stat().st_size:
                with open(index, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line from an interrupted append: end it first
                        line = "\n" + line
            with open(index, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        self.dim = vectors.shape[1]
        self._shards[shard] = vectors
        for row, key in enumerate(keys):
            self._rows[key] = (shard, row)


# ---------------------------------------------------------------------------------------------- extraction


@dataclass
class ExtractionResult:
    """Embeddings of the readable images, in input order (``indices`` into the input list).

    Attributes:
        embeddings: (N_ok, D) float32.
        indices: (N_ok,) the input position of each row.
        failed: {input position: error message} for images that could not be read.
        cache_hits / computed: how many embeddings came from the cache / were encoded now.
    """

    embeddings: np.ndarray
    indices: np.ndarray
    failed: dict = field(default_factory=dict)
    cache_hits: int = 0
    computed: int = 0


def extract_embeddings(images, encoder, cache_dir=None, batch_size=32, key_mode="stat", exif_transpose=None,
                       progress=True, workers=2):
    """Embed each unique image once, reusing and filling the cache; unreadable images are reported.

    Args:
        images: image file paths (duplicates are embedded once).
        encoder: an `ImageEncoder` (e.g. `clip_encoder(clip)`) or a callable ``list[PIL.Image] -> (B, D)``
            (then no cache: it has no model_id; wrap it in an `ImageEncoder` to cache).
        cache_dir: the cache root (None: no cache).
        batch_size: images per encoder call and per cache shard.
        key_mode: ``"stat"`` (path + size + mtime) or ``"content"`` (hash of the bytes).
        exif_transpose: apply EXIF orientation when reading, for an encoder without its own ``read``
            (default True); an encoder that reads (`clip_encoder`) has its own setting, part of its model_id:
            giving one here too is an error.
        progress: a tqdm bar.
        workers: image reader threads.

    Returns:
        an `ExtractionResult`. Failures are also logged (WARNING), one line per image.
    """
    from utils.pipeline import Pipeline, Stage

    if not isinstance(encoder, ImageEncoder):
        if cache_dir is not None:
            raise ValueError("caching needs an ImageEncoder with a model_id (a bare callable has no identity)")
        encoder = ImageEncoder(encoder, model_id="", preprocess=None)
    if encoder.read is not None and exif_transpose is not None:
        raise ValueError("this encoder reads the images itself: give exif_transpose when building it "
                         "(clip_encoder(clip, exif_transpose=...)), not to extract_embeddings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache = EmbeddingCache(cache_dir, encoder.model_id) if cache_dir is not None else None
    paths = [os.fspath(p) for p in images]

    errors = {}  # unique path -> why it could not be read (reported at every index that names it)
    keys = {}  # unique path -> key
    for path in paths:
        if path in keys:
            continue
        try:
            keys[path] = image_key(path, key_mode)
        except (OSError, ValueError) as e:  # ValueError: a NUL character in the path, or not a regular file
            keys[path] = None
            errors[path] = (f"no such image file: {path}" if isinstance(e, FileNotFoundError) else
                            str(e) if isinstance(e, UnsafePathError) else f"{path}: {e}")
    vectors = {}  # unique path -> vector
    hits = 0
    todo = []
    for path, key in keys.items():
        if key is None:
            continue
        if cache is not None and key in cache:
            vectors[path] = cache.get(key)
            hits += 1
        else:
            todo.append(path)

    preprocess = encoder.preprocess or (lambda image: image)
    exif = True if exif_transpose is None else exif_transpose
    read_one = encoder.read or (lambda path: read_image(path, exif_transpose=exif))

    def read(path):
        return preprocess(read_one(path))

    def encode(batch):
        out = np.asarray(encoder.encode_batch(list(batch)), dtype=np.float32)
        if out.ndim != 2 or len(out) != len(batch):
            raise ValueError(f"the encoder returned shape {out.shape} for a batch of {len(batch)} images")
        return list(out)

    pending_keys, pending_vectors = [], []

    def flush():
        if cache is not None and pending_keys:
            cache.add(pending_keys, np.stack(pending_vectors))
        pending_keys.clear()
        pending_vectors.clear()

    if todo:
        pipeline = Pipeline([Stage(read, name="read", workers=workers),
                             Stage(encode, name="encode", batch_size=batch_size, errors="raise")],
                            queue_size=2 * batch_size, progress=progress, desc="extracting embeddings",
                            unit="image")
        try:
            for item in pipeline.run(todo):
                path = item.input
                if item.ok:
                    vectors[path] = item.value
                    pending_keys.append(keys[path])
                    pending_vectors.append(item.value)
                    if len(pending_keys) >= batch_size:
                        flush()
                else:
                    err = item.error
                    errors[path] = str(err) if isinstance(err, ImageReadError) else f"{type(err).__name__}: {err}"
        finally:  # interrupted: keep what was computed
            flush()

    failed = {i: errors[path] for i, path in enumerate(paths) if path in errors}  # every index of a bad path
    for i, message in sorted(failed.items()):
        logger.warning("skipped unreadable image %s: %s", paths[i], message)
    ok = [i for i, p in enumerate(paths) if p in vectors]
    dim = next(iter(vectors.values())).shape[-1] if vectors else 0
    embeddings = np.stack([vectors[paths[i]] for i in ok]) if ok else np.zeros((0, dim), np.float32)
    return ExtractionResult(embeddings, np.asarray(ok, np.int64), failed, hits,
                            len(todo) - sum(path in errors for path in todo))


# ----------------------------------------------------------------------------------- embedded dataset file


def save_embedded_dataset(path, dataset: CaptionDataset, result: ExtractionResult, model_id=""):
    """Write the dataset's readable images, their embeddings and captions to one ``.npz`` (what train reads).

    Images in ``result.failed`` and their captions are left out (listed under ``failed``).
    """
    if len(result.indices) + len(result.failed) < dataset.num_images:
        raise ValueError("the extraction result does not cover every image of the dataset")
    kept = dataset.select_images(result.indices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": dataset.name, "model_id": model_id, "image_ids": kept.image_ids,
            "failed": {dataset.images[i]: m for i, m in result.failed.items()}}
    check_embedded_output(path)
    with atomic_open(path, "wb") as f:
        np.savez(f, embeddings=result.embeddings.astype(np.float32), image_index=kept.image_index,
                 images=np.asarray(kept.images, dtype=str), captions=np.asarray(kept.captions, dtype=str),
                 meta=np.asarray(json.dumps(meta, default=str)))
    return path


def is_embedded_dataset(path) -> bool:
    """Whether ``path`` is a file `save_embedded_dataset` wrote (an .npz with its arrays)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return {"embeddings", "image_index", "images", "captions", "meta"} <= set(f.files)
    except (OSError, ValueError, EOFError):
        return False


def check_embedded_output(path):
    """`UnsafePathError` unless ``path`` is new or an embedded dataset (replaced): never overwrite a user's
    other file, a folder, a link or a special file with the extraction's output."""
    check_overwritable(path, is_embedded_dataset, "an embeddings file (of `extract`)")


def _check_stored(f):
    """Every entry of the .npz ``f`` is stored as `save_embedded_dataset` writes it (``np.savez``: not
    compressed) and holds the array its header declares, so that reading it allocates and reads no more than
    the file holds: a deflated entry may declare gigabytes in a few kilobytes, and an array header any shape
    (numpy allocates it before reading: terabytes, a MemoryError). Both are refused before any array is read."""
    import math
    import zipfile

    for info in f.zip.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"its entry {info.filename} is compressed ({info.file_size} bytes in "
                             f"{info.compress_size}); `extract` writes them uncompressed (np.savez)")
        if not info.filename.endswith(".npy"):
            continue
        with f.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size - member.tell():
                raise ValueError(f"its entry {info.filename} declares a {dtype} array of shape {shape} "
                                 f"({declared} bytes) but holds {info.file_size - member.tell()}")


def load_embedded_dataset(path):
    """(CaptionDataset, embeddings (N_images, D), meta dict) from `save_embedded_dataset`'s file.

    Only such a file is read (no pickled object, an uncompressed .npz, `_check_stored`): anything else, or a
    crafted one (meta that is not an object of ours, embeddings that are not an (N, D) float array), is a
    `DatasetError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"embeddings file not found: {path} (create it with `main.py extract`)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one array
            raise ValueError(f"it holds one {type(loaded).__name__}, not the .npz arrays of `extract`")
        with loaded as f:
            _check_stored(f)
            meta = parse_json(str(f["meta"]).encode(), "its meta")  # depth-limited
            ids = meta.get("image_ids") if isinstance(meta, dict) else None
            if not (isinstance(ids, list) and all(isinstance(i, int | str) and not isinstance(i, bool) for i in ids)):
                raise ValueError("its meta is not an object with image_ids (a list of ids: numbers or strings)")
            embeddings = f["embeddings"]
            if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
                raise ValueError(f"its embeddings are {embeddings.dtype} of shape {embeddings.shape}, not an "
                                 "(images, dimensions) float array")
            embeddings = embeddings.astype(np.float32)
            dataset = CaptionDataset(list(f["images"]), meta["image_ids"], list(f["captions"]),
                                     f["image_index"], name=str(meta.get("name", path.stem)))
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from e
    except (KeyError, ValueError, TypeError, OSError, EOFError) as e:  # TypeError: unhashable image ids...
        raise DatasetError(f"{path} is not an embeddings file written by `main.py extract`: {e}") from e
    if len(embeddings) != dataset.num_images:
        raise DatasetError(f"{path}: {len(embeddings)} embeddings for {dataset.num_images} images")
    return dataset, embeddings, meta
