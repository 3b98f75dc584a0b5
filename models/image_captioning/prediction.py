"""Pipeline-based captioning of many images: ``ClipCap.predict`` delegates here.

Stages run concurrently (`utils.pipeline`), connected by bounded queues::

    read + decode (2 threads) -> CLIP preprocess -> batched CLIP encoding -> batched mapping + decoding
        -> results, in input order, written to map.json after every batch

Inputs are file paths, directories (searched recursively by image extension), glob patterns, PIL images and
numpy arrays (an (N, H, W, C) array is N images). A bad input (missing path, empty or truncated file, a text
file named .jpg, a directory without images, a decompression bomb) gets its own error in its result while
every other image is captioned. EXIF orientation is applied (``exif_transpose=False`` to read the pixels as
stored, as OpenAI's and the official ClipCap code do).

map.json (``pretrained_models/.outputs/<model name>/map.json``, `default_output_dir`, or
``<output_dir>/map.json``) is keyed by the absolute file path; each entry holds the caption, the candidates
with their scores and token ids, the generation settings (the model's name, for display, and its identity,
`models.image_captioning.identity`) and the size and SHA-256 of the file's bytes. The default folder is never
inside the model's folder, which a save (``convert --overwrite``) replaces whole; a map.json left by earlier
versions in ``<store>/<name>/outputs/`` is moved out (`migrate_legacy_outputs`). After every batch it is updated under
an inter-process lock (``map.json.lock``): read, merge this run's new entries, write atomically (temporary
file + ``os.replace``). So an interrupted run keeps everything captioned so far, and concurrent runs writing
the same map.json keep the union of their results (none is lost, each image appears once). The
settings are *not* part of the key: there is one entry per image, the latest. A rerun skips an image when
its entry was made by the same model (identity, not name) with the same settings (method and every generation
argument) from the same bytes (`models.image_captioning.freshness`, the rule ``batch --skip-existing`` follows
too); otherwise (or with ``overwrite=True``) it is captioned again and the entry replaced. Captions drawn at
random without a seed (``method="sample"`` alone) are stored but never reused: a new run draws anew. The
run's view of map.json is refreshed at every write (and every few seconds while reading images), so an
image that a concurrent run captioned meanwhile with the same settings is taken from map.json instead of
being read and captioned again. A file given more than once in a run (a folder and a glob over it, or two
spellings of one path) is read and captioned once: its later copies get the first one's result
(``"cached": True``, no timings). Images given in memory (PIL, numpy) and http(s) URLs (what a URL serves
may change) are captioned but never written to map.json.

Only regular files are read (`utils.image_io`): a FIFO, device or dangling link inside a directory gets its
own error without blocking the run; image files above ``max_file_bytes`` and a map.json above
`MAP_MAX_BYTES` are refused before being read.

map.json is checked before any image is read: its folder must be writable (`check_map_writable`), and a
map.json that is malformed (not JSON, nested too deep, an entry that is not a caption entry) or a symbolic
link (an atomic write would replace the link by a file) is refused, never erased. A write that fails during
the run (disk full) stops the writing, not the captioning: ``predict`` raises `MapWriteError` carrying every
result. A file name with bytes that are not UTF-8 (``caf\xe9.jpg``) is kept as Python holds it (surrogate
escapes) and written to map.json as ``\udce9`` escapes (`utils.file_utils.json_text`): valid UTF-8 that
reads back to the same key.

Example::

    from models.image_captioning.clip_cap import ClipCap
    model = ClipCap.load("coco")
    for r in model.predict(["demo/", "holidays/*.jpg"], method="beam", beam_size=5):
        print(r["image"], r["caption"] if r["error"] is None else r["error"])
"""

import contextlib
import datetime
import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from custom_architectures.batching import power_of_two_at_least
from custom_architectures.decoding import as_decoding
from custom_architectures.decoding_options import check_integer
from custom_architectures.samplers import draw_id
from models.image_captioning.compile_status import CompileStatus
from models.image_captioning.freshness import answers, content_stamp, is_fresh
from utils.file_utils import (
    DEFAULT_MAX_BYTES,
    UnsafePathError,
    check_writable_dir,
    file_lock,
    read_json,
    write_json_atomic,
)
from utils.image_io import ImageReadError, expand_paths, is_url, read_image_file
from utils.pipeline import Pipeline, Stage

logger = logging.getLogger(__name__)

MAP_FILENAME = "map.json"
#: map.json is read whole into memory: a larger one (about 250,000 images) is refused, not read
MAP_MAX_BYTES = DEFAULT_MAX_BYTES
_REFRESH_S = 2.0  # how often the read stage looks at map.json for images captioned by concurrent runs


# ------------------------------------------------------------------------------------------------- inputs


class _Entry:
    """One image to caption: its label in the results, what to read, its map.json key, or an error."""

    __slots__ = ("label", "source", "key", "error")

    def __init__(self, label, source=None, key=None, error=None):
        self.label, self.source, self.key, self.error = label, source, key, error


def _draw_id(entry, index):
    """What an entry's random draws are keyed by (`samplers.draw_id`): its map.json key (absolute path) or URL,
    else (an image in memory) its index."""
    name = entry.key if entry.key is not None else entry.source
    return draw_id(name) if isinstance(name, str) else index


def expand_inputs(images):
    """Paths / directories / globs / PIL images / arrays -> a list of `_Entry`, in input order.

    Each file of a directory or glob becomes an entry (sorted); an input that cannot be expanded (missing
    path, empty directory, pattern without match) becomes one entry holding its error, and so does each
    file of a directory or pattern that is not a regular file (FIFO, socket, device, dangling link).
    In-memory images are labelled by their position in the result list.
    """
    from PIL import Image

    if isinstance(images, str | os.PathLike | Image.Image) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        images = [images]
    entries = []
    for item in images:
        if isinstance(item, str | os.PathLike):
            path = os.fspath(item)
            try:
                paths = expand_paths([path])
            except ImageReadError as e:
                entries.append(_Entry(label=path, error=str(e)))
                continue
            entries.extend(_Entry(label=p, source=p, key=None if is_url(p) else os.path.abspath(p))
                           if problem is None else _Entry(label=p, error=problem) for p, problem in paths)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            entries.extend(_Entry(label=None, source=one) for one in item)
        else:
            entries.append(_Entry(label=None, source=item))
    for i, entry in enumerate(entries):
        if entry.label is None:
            entry.label = i
    return entries


# ------------------------------------------------------------------------------------------------ map.json


def default_output_dir(model_or_name):
    """``<model store>/.outputs/<model name>`` ("clipcap" for a model without a name): where map.json goes by
    default (`utils.model_store.outputs_dir`), outside the model's own folder."""
    from utils.model_store import outputs_dir

    name = model_or_name if isinstance(model_or_name, str | None) else getattr(model_or_name, "name", None)
    return outputs_dir(name or "clipcap")


def migrate_legacy_outputs(name):
    """Move ``<store>/<name>/outputs/map.json`` (where earlier versions wrote, inside the model's folder that
    a save replaces) into `default_output_dir` ``(name)``: merged under both files' locks (an image in both
    keeps the new location's entry), written atomically, then the old file removed; its sidecars
    (``map.json.unsaved-*``) are moved too. A damaged old map.json is left where it is (logged); returns the
    number of entries moved."""
    from utils.model_store import legacy_outputs_dir

    legacy_dir = legacy_outputs_dir(name)
    legacy = legacy_dir / MAP_FILENAME
    sidecars = sorted(legacy_dir.glob(f"{MAP_FILENAME}.unsaved-*.json")) if legacy_dir.is_dir() else []
    if not os.path.lexists(legacy) and not sidecars:
        return 0
    target_dir = default_output_dir(name)
    target_dir.mkdir(parents=True, exist_ok=True)
    for sidecar in sidecars:
        if not sidecar.is_symlink() and not os.path.lexists(target_dir / sidecar.name):
            os.replace(sidecar, target_dir / sidecar.name)
    if not os.path.lexists(legacy):
        return 0
    target = target_dir / MAP_FILENAME
    with file_lock(target), file_lock(legacy):
        try:
            old = load_map(legacy)
        except ValueError as e:
            logger.warning("%s left where it is: %s", legacy, e)
            return 0
        merged = {**old, **load_map(target)}
        write_json_atomic(target, merged)
        os.unlink(legacy)
    logger.info("moved the %d captions of %s to %s", len(old), legacy, target)
    return len(old)


class MapWriteError(OSError):
    """map.json could not be written (disk full, read-only folder...): ``results`` holds every result of the
    run all the same (``unsaved`` of them made by it are in no map.json), ``path`` the map.json."""

    def __init__(self, message, path, results=None, unsaved=0):
        super().__init__(message)
        self.path, self.results, self.unsaved = path, results, unsaved


def _check_not_symlink(path):
    """Refuse a map.json that is a symbolic link: the atomic write would replace the link by a file
    (`utils.file_utils.check_overwritable` refuses links alike)."""
    if os.path.islink(path):
        raise UnsafePathError(f"{path} is a symbolic link (to {os.readlink(path)!r}): refusing to read or replace "
                              "it (a write would replace the link by a file); give the folder it is in as "
                              "output_dir / --output-dir, or remove the link")


def _is_candidate(value):
    """A stored candidate: ``{"text": str, "score": number, ...}`` (what `_candidates` writes)."""
    return (isinstance(value, dict) and isinstance(value.get("text"), str)
            and isinstance(value.get("score"), int | float) and not isinstance(value.get("score"), bool))


def _check_entries(data):
    """Every entry of a map.json is ``{"caption": str, "settings": {...}, "candidates": [{"text": str,
    "score": number, ...}, ...] or absent, ...}``: a ValueError naming the first entry of another shape (the
    file is never erased: a hand-edited or foreign file is not ours). Candidates are checked too: they are
    handed back as results (``--num-captions`` prints each one's text)."""
    for key, entry in data.items():
        candidates = entry.get("candidates") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("caption"), str)
                and isinstance(entry.get("settings"), dict)
                and (candidates is None or (isinstance(candidates, list) and all(map(_is_candidate, candidates))))):
            raise ValueError(f"the entry {key!r} is not a caption entry (a JSON object with a 'caption' string, "
                             "'settings' and 'candidates' of 'text' and 'score'), got "
                             f"{json.dumps(entry)[:80]}")


def load_map(path, max_bytes=MAP_MAX_BYTES):
    """The captions stored in a map.json ({} when there is none); a corrupt file is an error, not erased.

    Only a regular file of at most ``max_bytes`` is read (`utils.file_utils.read_json`: nesting bounded too):
    a FIFO, device, directory, symbolic link or dangling link in its place is an error (never read, never
    replaced), and so is an entry that is not a caption entry.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    try:
        _check_not_symlink(path)
        data = read_json(path, max_bytes)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not a map from file paths to captions")
        _check_entries(data)
    except (OSError, ValueError) as e:  # UnsafePathError is a ValueError
        raise ValueError(f"{path} is not a readable map.json ({e}); move it away or fix it "
                         "(or write elsewhere with output_dir / --output-dir)") from e
    return data


def check_map_writable(map_path):
    """Before any work: the folder of ``map_path`` can be written (`utils.file_utils.check_writable_dir`:
    `MapWriteError` naming it otherwise) and the map.json there, if any, is a readable one (ValueError).
    Returns what it holds (`load_map`)."""
    try:
        check_writable_dir(Path(map_path).parent)
    except OSError as e:
        raise MapWriteError(f"{e} (map.json is written there; choose another output_dir / --output-dir)",
                            map_path) from e
    return load_map(map_path)


def merge_into_map(path, new_entries):
    """Add ``new_entries`` to the map.json at ``path`` under its inter-process lock; returns the merged map.

    Read, merge, write atomically while holding ``<path>.lock``: entries written meanwhile by concurrent
    runs are kept (an image in both gets ours, the latest).
    """
    with file_lock(path):
        merged = load_map(path)
        merged.update(new_entries)
        _check_not_symlink(path)  # made a link since it was read: not replaced either
        write_json_atomic(path, merged)
    return merged


def _save(map_path, pending):
    """`merge_into_map`; when map.json was damaged meanwhile (by another program: it is never overwritten),
    this batch's entries go to a new ``map.json.unsaved-<pid>-<n>.json`` beside it, named in the error."""
    try:
        return merge_into_map(map_path, pending)
    except ValueError as e:
        for n in itertools.count():
            sidecar = Path(map_path).with_name(f"{Path(map_path).name}.unsaved-{os.getpid()}-{n}.json")
            if not os.path.lexists(sidecar):
                break
        write_json_atomic(sidecar, pending)
        raise ValueError(f"{e}; the {len(pending)} captions of this batch were saved to {sidecar}") from e


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def generation_settings(model, method, generate_kwargs, exif_transpose=True):
    """What decides a caption, as stored in map.json and compared on rerun: the model (its identity,
    ``model.identity``; its name only for display), the method and its arguments, and ``exif_transpose`` (it
    decides which pixels are captioned: an entry made upright must not answer a run that reads the pixels as
    stored). A random method without a seed is marked ``"unseeded"``: its captions came from a seed drawn for
    that run and recorded nowhere, so they answer no later request (`freshness.answers`), which asks for a
    new draw."""
    return generation_settings_for(getattr(model, "name", None), model.identity, method, generate_kwargs,
                                   exif_transpose)


def generation_settings_for(model_name, model_identity, method, generate_kwargs, exif_transpose=True):
    """`generation_settings` from the model's name and identity alone (no model needed: a saved folder's
    identity is in its metadata.json, `models.image_captioning.identity.recorded_identity`)."""
    if not model_identity:
        raise ValueError("generation settings need the model's identity (its name may be another model's)")
    from custom_architectures.samplers import SAMPLERS

    generate_kwargs = _rerank_settings(generate_kwargs)
    sampler = SAMPLERS.get(method)
    draws = getattr(sampler, "draws", None)  # how random draws are keyed (sampling)
    # random draws without a seed: each run draws a new one, recorded nowhere (`freshness.answers`: never reused)
    unseeded = not getattr(sampler, "deterministic", True) and generate_kwargs.get("seed") is None
    return {"model": model_name, "model_identity": model_identity, "method": method,
            "exif_transpose": bool(exif_transpose), **({"draws": draws} if draws else {}),
            **({"unseeded": True} if unseeded else {}),
            **{k: _jsonable(v) for k, v in sorted(generate_kwargs.items())}}


def _rerank_settings(generate_kwargs):
    """The re-ranking options in one form, so that equal requests key equal entries: none without
    re-ranking (entries made before it existed still answer), ``rerank`` and ``rerank_weight`` (default 0.0)
    with it."""
    kwargs = dict(generate_kwargs)
    if kwargs.get("rerank") is None:
        kwargs.pop("rerank", None)
        if not kwargs.get("rerank_weight"):  # 0 without re-ranking means nothing (another value is refused)
            kwargs.pop("rerank_weight", None)
    else:
        kwargs["rerank_weight"] = float(kwargs.get("rerank_weight", 0.0))
    return kwargs


# ---------------------------------------------------------------------------------------------- the model


class _CaptionedElsewhere(Exception):  # noqa: N818 (a signal, not a failure)
    """Raised by the read stage for an image that a concurrent run captioned meanwhile (its entry kept)."""

    def __init__(self, entry):
        super().__init__("captioned by a concurrent run")
        self.entry = entry


class _MapView:
    """This run's latest view of map.json: replaced at each write, re-read every `_REFRESH_S` otherwise."""

    def __init__(self, path, data):
        self.path, self.data, self.time = path, data, time.monotonic()
        self.stamp = None  # (inode, size, mtime) of the version last read by `get`
        self._lock = threading.Lock()

    def set(self, data):
        self.data, self.time = data, time.monotonic()

    def _stamp(self):
        try:
            st = os.stat(self.path)
            return st.st_ino, st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def get(self, key):
        if time.monotonic() - self.time > _REFRESH_S and self._lock.acquire(blocking=False):
            try:  # no file lock needed: map.json is replaced atomically, a read sees a whole version
                stamp = self._stamp()
                if stamp != self.stamp:  # re-read (a large map.json takes a while) only when it changed
                    self.set(load_map(self.path))
                    self.stamp = stamp
                self.time = time.monotonic()
            except ValueError as e:  # a damaged map.json is reported when this run writes it
                logger.debug("cannot refresh %s: %s", self.path, e)
                self.time = time.monotonic()
            finally:
                self._lock.release()
        return self.data.get(key)


def _check_model(model):
    clip = getattr(model, "clip", None)
    if clip is None:
        raise ValueError("this ClipCap model has no CLIP image encoder (model.clip is None): load it with "
                         "one (ClipCap.from_pretrained(..., clip=CLIP.from_pretrained('ViT-B/32'))) or "
                         "caption CLIP embeddings with model.generate(embeddings)")
    return clip


def _candidates(generated):
    """Every returned caption, best first: text, score, CLIPScore when re-ranked, and token ids (as
    `ClipCap.generate` gives them)."""
    return [{"text": c["text"], "score": float(c["score"]),
             **({"clip_score": float(c["clip_score"])} if "clip_score" in c else {}),
             **({"tokens": [int(t) for t in c["tokens"]]} if "tokens" in c else {})} for c in generated]


# ------------------------------------------------------------------------------------------------ predict


def predict(model, images, batch_size=16, method="greedy", save=True, overwrite=False, display=False,
            output_dir=None, return_candidates=False, progress=True, exif_transpose=True,
            max_file_bytes=DEFAULT_MAX_BYTES, status=None, **generate_kwargs):
    """Caption many images concurrently; one result per image, in input order.

    Args:
        model: a `ClipCap` (with its CLIP).
        images: a path, directory, glob pattern, PIL image or numpy array, or a list of them.
        batch_size: images per CLIP-encoding and decoding batch.
        method: a decoding method (``"greedy"``, ``"beam"``, ``"sample"``: `custom_architectures.samplers`), or
            a `custom_architectures.decoding.Decoding` checked already (then no ``generate_kwargs``).
        save: write map.json (and reuse what it holds); False captions everything and writes nothing.
        overwrite: caption again images that map.json already holds with the same settings.
        display: show the captioned images in a grid with their captions (matplotlib).
        output_dir: where map.json goes (default `default_output_dir`: ``pretrained_models/.outputs/<model.name>/``).
        return_candidates: add ``candidates`` (every returned caption with its score and token ids, best
            first; entries that map.json held from before token ids were stored have none).
        progress: a tqdm bar with images per second.
        exif_transpose: apply the EXIF orientation (OpenAI's / the official code do not).
        max_file_bytes: refuse image files larger than this many bytes (None: no limit); each gets its error.
        status: a callable given a line before and after each first compilation (`compile_status`); the
            progress bar starts after the first results, so its ETA does not count the compilation.
        **generate_kwargs: passed to ``model.generate`` (``beam_size``, ``max_length``, ``temperature``,
            ``top_k``, ``top_p``, ``num_captions``, ``seed``, ``stop_token``, ``rerank``, ``rerank_weight``);
            all of them key the results in map.json.

    Returns:
        a list of dicts ``{"image": path or index, "caption": str or None, "error": None or message,
        "cached": bool (answered from map.json or by an earlier copy of the file in this run),
        "timings": {stage: seconds}}`` (+ ``"candidates"``). Per-image timings of the
        batched stages are the batch's time divided by its size.

    Example::

        results = predict(model, "demo/", method="beam", beam_size=3, return_candidates=True)
    """
    request = as_decoding(method, generate_kwargs)  # the one check of the decoding arguments: carried from here
    batch_size = check_integer("batch_size", batch_size, minimum=1)  # 2.5 or "2": named, not a TypeError
    clip = _check_model(model)
    if hasattr(model, "check_generate_args"):  # what needs the model (stop token, CLIP's text tower), first
        model.check_generate_args(request)
    method, generate_kwargs = request.method, request.given
    entries = expand_inputs(images)
    settings = generation_settings(model, method, generate_kwargs, exif_transpose) if save else None
    if save and output_dir is None and getattr(model, "name", None):
        try:
            migrate_legacy_outputs(model.name)
        except OSError as e:  # a read-only store: the old results stay where they are, this run goes on
            logger.warning("earlier results of %s not moved to %s: %s", model.name, default_output_dir(model), e)
    map_path = Path(output_dir if output_dir is not None else default_output_dir(model)) / MAP_FILENAME
    # before any image is read: results that could not be written at the end would be lost
    stored = check_map_writable(map_path) if save else {}

    results = [None] * len(entries)
    todo = []
    first_of, repeats = {}, {}  # a file given twice (a folder and a glob over it): read and captioned once
    for i, entry in enumerate(entries):
        if entry.error is not None:
            results[i] = _result(entry, error=entry.error)
            logger.warning("cannot caption %s: %s", entry.label, entry.error)
            continue
        if entry.key is not None:
            if entry.key in first_of:
                repeats[i] = first_of[entry.key]
                continue
            first_of[entry.key] = i
        if save and not overwrite and entry.key is not None:
            cached = stored.get(entry.key)
            if is_fresh(cached, settings, entry.key, max_file_bytes):
                results[i] = _result(entry, caption=cached["caption"], candidates=cached.get("candidates"),
                                     cached=True)
                continue
        todo.append(i)
    answered = sum(r is not None and r["cached"] for r in results)  # by map.json

    view = _MapView(map_path, stored)
    skip_others = save and not overwrite
    # read -> preprocess -> encode: the stages of `clip.encode_image` / model.encode_images, run concurrently
    embedder = clip.image_embedder(exif_transpose=exif_transpose, max_bytes=max_file_bytes)

    stamps = {}  # input index -> size and SHA-256 of the bytes its caption is made from (map.json entries)

    def read(i):
        key = entries[i].key
        if not save or key is None:  # nothing stored: no stamp needed
            return embedder.read(entries[i].source)
        data = read_image_file(entries[i].source, max_file_bytes)  # read once: hashed and decoded
        stamps[i] = stamp = content_stamp(data)
        if skip_others:
            cached = view.get(key)
            if answers(cached, settings, stamp):  # a concurrent run captioned it meanwhile
                raise _CaptionedElsewhere(cached)
        return embedder.read_bytes(data, entries[i].source)

    compiling = CompileStatus(model, status)
    details = ", ".join([method, *(f"{k}={v}" for k, v in sorted(generate_kwargs.items()))])
    if status and todo:  # what is about to happen, before the first batch's silent seconds
        status(f"captioning {len(todo)} image(s), batches of {batch_size}, {details}"
               + (f" ({answered} more answered from {map_path})" if answered else ""))
    # one batch: the progress bar would appear only at the end (it counts captions), so say each stage
    stage_lines = status if status and len(todo) <= batch_size else None

    # one compiled shape per run: a last, partial batch is padded (with copies of its last item, results
    # dropped) to the bucket of the full ones, where the stage compiles per shape (XLA). Under "auto" a
    # stage's first call runs uncompiled; a run of more than two batches compiles at once instead, so that
    # the progress bar's rate never includes a compilation (`custom_architectures.compile_policy`).
    bucket = power_of_two_at_least(max(1, min(batch_size, len(todo))))
    long_run = True if len(todo) > 2 * bucket else None
    clip_bucket = bucket if getattr(clip, "jit_compile", False) else None
    decode_bucket = bucket if getattr(model, "jit_compile", False) else None

    encoded = [0]  # batches encoded so far (the encode stage is one thread)

    def encode(batch):
        encoded[0] += 1
        # as `generate`'s: a short run's last batch builds nothing in the background
        compile_now = long_run if long_run or encoded[0] * batch_size < len(todo) else False
        compiles = clip.will_compile(len(batch), compile_now)
        padded = _pad(batch, clip_bucket) if compiles else batch
        if stage_lines:
            stage_lines(f"encoding {len(batch)} image(s) with CLIP ...")
        with compiling.first_call("the CLIP encoder", len(padded)) if compiles else contextlib.nullcontext():
            return list(embedder.encode_batch(padded, compile_now=compile_now))[:len(batch)]  # B x (D,)

    decoded = [0]  # batches decoded so far (the generate stage is one thread)

    def generate(batch, indices):
        decoded[0] += 1
        # a short run's last batch: its shape will not recur, so nothing is built in the background (a
        # build still running when the process ends delays its exit by the compilation)
        compile_now = long_run if long_run or decoded[0] * batch_size < len(todo) else False
        compiles = model.decoder_will_compile(len(batch), request.sampler, request.max_length, compile_now)
        padded = np.stack(_pad(batch, decode_bucket) if compiles else batch)  # rows are decoded independently
        if stage_lines:
            stage_lines(f"decoding {len(batch)} caption(s) ({details}) ...")
        with (compiling.first_call("the decoder", power_of_two_at_least(len(padded)), details) if compiles
              else contextlib.nullcontext()):
            # each image's draws keyed by its name (`samplers.draw_id`): the same captions whichever images share
            # the batch (the read stage's threads deliver them in any order) and wherever it is in the input
            ids = [_draw_id(entries[i], i) for i in indices] + [0] * (len(padded) - len(batch))
            return model.generate(padded, method=request, compile_now=compile_now, image_ids=ids)[:len(batch)]

    pipeline = Pipeline([
        Stage(read, name="read", workers=2),
        Stage(embedder.preprocess, name="preprocess"),
        # model stages fail for every image alike (bad arguments, memory): stop instead of retrying per image
        Stage(encode, name="encode", batch_size=batch_size, errors="raise"),
        Stage(generate, name="generate", batch_size=batch_size, errors="raise", with_inputs=True),
    ], queue_size=2 * batch_size, progress=progress, desc=f"captioning ({method})", unit="image",
        bar_from_first_result=True)

    pending = {}
    saver = _Saver(map_path, view)
    try:
        for item in pipeline.run(todo):
            i = item.input
            entry = entries[i]
            if item.ok:
                generated = item.value
                results[i] = _result(entry, caption=generated[0]["text"], candidates=_candidates(generated),
                                     timings=item.timings)
                if save and entry.key is not None:
                    pending[entry.key] = _map_entry(results[i], settings, stamps.pop(i))
            elif isinstance(item.error, _CaptionedElsewhere):
                cached = item.error.entry
                results[i] = _result(entry, caption=cached["caption"], candidates=cached.get("candidates"),
                                     cached=True, timings=item.timings)
            else:
                message = str(item.error) if isinstance(item.error, ImageReadError) else (
                    f"{type(item.error).__name__} in {item.stage}: {item.error}")
                results[i] = _result(entry, error=message, timings=item.timings)
                logger.warning("cannot caption %s: %s", entry.label, message)
            if len(pending) >= batch_size:
                saver.save(pending)
                pending = {}
    except BaseException:  # also on KeyboardInterrupt: keep every caption already made, re-raise the cause
        if pending:
            try:
                saver.save(pending)
            except ValueError as e:  # a damaged map.json (the batch went to a sidecar): not the cause
                logger.error("%s", e)
        raise
    if pending:
        saver.save(pending)
    for i, first in repeats.items():  # the first copy's result; nothing was done for this one
        results[i] = dict(results[first], image=entries[i].label, timings={},
                          cached=results[first]["error"] is None)
    if status and save and saver.error is None and any(r["error"] is None and not r.get("cached") for r in results):
        status(f"captions saved in {map_path}")

    if not return_candidates:
        for r in results:
            r.pop("candidates", None)
    if display:
        show_results(entries, results)
    if saver.error is not None:  # every result made, some not saved: the caller gets them with the error
        raise MapWriteError(f"cannot write {map_path}: {saver.error}; {saver.unsaved} captions of this run are "
                            "not saved (free space or choose another output_dir / --output-dir)",
                            map_path, results, saver.unsaved)
    return results


class _Saver:
    """Writes each batch of new entries to map.json (`_save`) and keeps ``view`` up to date; after a write
    fails (OSError: disk full, read-only...) it stops trying and counts what is left unsaved, so that the run
    finishes and its results are returned with the error (`MapWriteError`) instead of lost."""

    def __init__(self, map_path, view):
        self.map_path, self.view = map_path, view
        self.error, self.unsaved = None, 0

    def save(self, pending):
        if self.error is None:
            try:
                self.view.set(_save(self.map_path, pending))  # with what concurrent runs wrote meanwhile
                return
            except OSError as e:
                self.error = e
                logger.error("cannot write %s: %s", self.map_path, e)
        self.unsaved += len(pending)


def _pad(batch, size):
    """``batch`` (a list) extended with copies of its last item up to ``size`` (None: as is)."""
    if size is None or len(batch) >= size:
        return list(batch)
    return list(batch) + [batch[-1]] * (size - len(batch))


def _result(entry, caption=None, candidates=None, error=None, timings=None, cached=False):
    return {"image": entry.label, "caption": caption, "candidates": candidates, "error": error,
            "cached": cached, "timings": dict(timings or {})}


def _map_entry(result, settings, stamp):
    """A map.json entry: the caption, its candidates, the settings and the stamp of the bytes captioned."""
    return {"caption": result["caption"], "candidates": result["candidates"], "settings": settings,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **stamp}


def show_results(entries, results, ncols=4):
    """Show the captioned images in a grid (matplotlib); failed ones are listed in the log instead."""
    import matplotlib.pyplot as plt

    from utils.plot_utils import plot_captions

    shown = [(e, r) for e, r in zip(entries, results) if r["error"] is None]
    if not shown:
        return None
    figure = plot_captions([e.source for e, _ in shown], [r["caption"] for _, r in shown], ncols=ncols,
                           titles=[os.path.basename(str(r["image"])) for _, r in shown])
    plt.show()
    return figure
