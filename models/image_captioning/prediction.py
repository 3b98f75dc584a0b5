"""Pipeline-based captioning of many images: ``ClipCap.predict`` delegates here.

Stages run concurrently (`utils.pipeline`), connected by bounded queues::

    read + decode (2 threads) -> CLIP preprocess -> batched CLIP encoding -> batched mapping + decoding
        -> results, in input order, written to map.json after every batch

Inputs are file paths, directories (searched recursively by image extension), glob patterns, PIL images and
numpy arrays (an (N, H, W, C) array is N images). A bad input (missing path, empty or truncated file, a text
file named .jpg, a directory without images, a decompression bomb) gets its own error in its result while
every other image is captioned. EXIF orientation is applied (``exif_transpose=False`` to read the pixels as
stored, as OpenAI's and the official ClipCap code do).

map.json (``pretrained_models/<model name>/outputs/map.json``, or ``<output_dir>/map.json``) is keyed by
the absolute file path; each entry holds the caption, the candidates with their scores and token ids, the
generation settings, the model name and the file's size and modification time. After every batch it is updated under
an inter-process lock (``map.json.lock``): read, merge this run's new entries, write atomically (temporary
file + ``os.replace``). So an interrupted run keeps everything captioned so far, and concurrent runs writing
the same map.json keep the union of their results (none is lost, each image appears once). The
settings are *not* part of the key: there is one entry per image, the latest. A rerun skips an image when
its entry was made by the same model with the same settings (method and every generation argument) and the
file is unchanged; otherwise (or with ``overwrite=True``) it is captioned again and the entry replaced. The
run's view of map.json is refreshed at every write (and every few seconds while reading images), so an
image that a concurrent run captioned meanwhile with the same settings is taken from map.json instead of
being read and captioned again. Images given in memory (PIL, numpy) and http(s) URLs (what a URL serves
may change) are captioned but never written to map.json.

Only regular files are read (`utils.image_io`): a FIFO, device or dangling link inside a directory gets its
own error without blocking the run; image files above ``max_file_bytes`` and a map.json above
`MAP_MAX_BYTES` are refused before being read.

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
from custom_architectures.samplers import sampler_class
from models.image_captioning.compile_status import CompileStatus
from utils.file_utils import DEFAULT_MAX_BYTES, file_lock, read_regular_file, write_json_atomic
from utils.image_io import ImageReadError, expand_paths, is_url
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


def default_output_dir(model):
    from utils.model_store import home_dir

    name = getattr(model, "name", None) or "clipcap"
    return home_dir() / name / "outputs"


def load_map(path, max_bytes=MAP_MAX_BYTES):
    """The captions stored in a map.json ({} when there is none); a corrupt file is an error, not erased.

    Only a regular file of at most ``max_bytes`` is read: a FIFO, device, directory or dangling link in
    its place is an error (never read, never replaced).
    """
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(read_regular_file(path, max_bytes).decode("utf-8"))
    except (OSError, ValueError) as e:  # UnsafePathError is a ValueError
        raise ValueError(f"{path} is not a readable map.json ({e}); move it away or fix it "
                         "(or write elsewhere with output_dir / --output-dir)") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a map from file paths to captions")
    return data


def merge_into_map(path, new_entries):
    """Add ``new_entries`` to the map.json at ``path`` under its inter-process lock; returns the merged map.

    Read, merge, write atomically while holding ``<path>.lock``: entries written meanwhile by concurrent
    runs are kept (an image in both gets ours, the latest).
    """
    with file_lock(path):
        merged = load_map(path)
        merged.update(new_entries)
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


def _file_stamp(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def generation_settings(model, method, generate_kwargs, exif_transpose=True):
    """What decides a caption, as stored in map.json and compared on rerun: the model, the method and its
    arguments, and ``exif_transpose`` (it decides which pixels are captioned: an entry made upright must not
    answer a run that reads the pixels as stored)."""
    return generation_settings_for(getattr(model, "name", None), method, generate_kwargs, exif_transpose)


def generation_settings_for(model_name, method, generate_kwargs, exif_transpose=True):
    """`generation_settings` from the model's name alone (no model needed)."""
    return {"model": model_name, "method": method, "exif_transpose": bool(exif_transpose),
            **{k: _jsonable(v) for k, v in sorted(generate_kwargs.items())}}


# ---------------------------------------------------------------------------------------------- the model


def _is_fresh(cached, settings, key):
    """Whether the map.json entry ``cached`` holds the caption of file ``key`` as it is now, for ``settings``."""
    if cached is None or cached.get("settings") != settings:
        return False
    try:
        return all(cached.get(k) == v for k, v in _file_stamp(key).items())
    except OSError:
        return False


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
    """Every returned caption, best first: text, score and token ids (as `ClipCap.generate` gives them)."""
    return [{"text": c["text"], "score": float(c["score"]),
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
        method: a decoding method (``"greedy"``, ``"beam"``, ``"sample"``: `custom_architectures.samplers`).
        save: write map.json (and reuse what it holds); False captions everything and writes nothing.
        overwrite: caption again images that map.json already holds with the same settings.
        display: show the captioned images in a grid with their captions (matplotlib).
        output_dir: where map.json goes (default ``pretrained_models/<model.name>/outputs/``).
        return_candidates: add ``candidates`` (every returned caption with its score and token ids, best
            first; entries that map.json held from before token ids were stored have none).
        progress: a tqdm bar with images per second.
        exif_transpose: apply the EXIF orientation (OpenAI's / the official code do not).
        max_file_bytes: refuse image files larger than this many bytes (None: no limit); each gets its error.
        status: a callable given a line before and after each first compilation (`compile_status`); the
            progress bar starts after the first results, so its ETA does not count the compilation.
        **generate_kwargs: passed to ``model.generate`` (``beam_size``, ``max_length``, ``temperature``,
            ``top_k``, ``top_p``, ``num_captions``, ``seed``, ``stop_token``).

    Returns:
        a list of dicts ``{"image": path or index, "caption": str or None, "error": None or message,
        "cached": bool, "timings": {stage: seconds}}`` (+ ``"candidates"``). Per-image timings of the
        batched stages are the batch's time divided by its size.

    Example::

        results = predict(model, "demo/", method="beam", beam_size=3, return_candidates=True)
    """
    sampler_class(method)  # ValueError naming the decoding methods
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clip = _check_model(model)
    sampler, max_length = method, None  # what the decoder's compile check is given (a model without checks)
    if hasattr(model, "check_generate_args"):  # bad decoding arguments fail before any image is read
        sampler, max_length, _, _ = model.check_generate_args(method, **generate_kwargs)
    entries = expand_inputs(images)
    settings = generation_settings(model, method, generate_kwargs, exif_transpose)
    map_path = Path(output_dir if output_dir is not None else default_output_dir(model)) / MAP_FILENAME
    stored = load_map(map_path) if save else {}

    results = [None] * len(entries)
    todo = []
    for i, entry in enumerate(entries):
        if entry.error is not None:
            results[i] = _result(entry, error=entry.error)
            logger.warning("cannot caption %s: %s", entry.label, entry.error)
            continue
        if save and not overwrite and entry.key is not None:
            cached = stored.get(entry.key)
            if _is_fresh(cached, settings, entry.key):
                results[i] = _result(entry, caption=cached["caption"], candidates=cached.get("candidates"),
                                     cached=True)
                continue
        todo.append(i)

    view = _MapView(map_path, stored)
    skip_others = save and not overwrite
    # read -> preprocess -> encode: the stages of `clip.encode_image` / model.encode_images, run concurrently
    embedder = clip.image_embedder(exif_transpose=exif_transpose, max_bytes=max_file_bytes)

    def read(i):
        key = entries[i].key
        if skip_others and key is not None:
            cached = view.get(key)
            if _is_fresh(cached, settings, key):  # a concurrent run captioned it meanwhile
                raise _CaptionedElsewhere(cached)
        return embedder.read(entries[i].source)

    compiling = CompileStatus(model, status)
    details = ", ".join([method, *(f"{k}={v}" for k, v in sorted(generate_kwargs.items()))])
    if status and todo:  # what is about to happen, before the first batch's silent seconds
        status(f"captioning {len(todo)} image(s), batches of {batch_size}, {details}"
               + (f" ({len(entries) - len(todo)} more answered from {map_path})" if len(todo) < len(entries) else ""))
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

    def encode(batch):
        compiles = clip.will_compile(len(batch), long_run)
        padded = _pad(batch, clip_bucket) if compiles else batch
        if stage_lines:
            stage_lines(f"encoding {len(batch)} image(s) with CLIP ...")
        with compiling.first_call("the CLIP encoder", len(padded)) if compiles else contextlib.nullcontext():
            return list(embedder.encode_batch(padded, compile_now=long_run))[:len(batch)]  # B x (D,)

    def generate(batch):
        compiles = model.decoder_will_compile(len(batch), sampler, max_length, long_run)
        padded = np.stack(_pad(batch, decode_bucket) if compiles else batch)  # rows are decoded independently
        if stage_lines:
            stage_lines(f"decoding {len(batch)} caption(s) ({details}) ...")
        with (compiling.first_call("the decoder", power_of_two_at_least(len(padded)), details) if compiles
              else contextlib.nullcontext()):
            return model.generate(padded, method=method, compile_now=long_run, **generate_kwargs)[:len(batch)]

    pipeline = Pipeline([
        Stage(read, name="read", workers=2),
        Stage(embedder.preprocess, name="preprocess"),
        # model stages fail for every image alike (bad arguments, memory): stop instead of retrying per image
        Stage(encode, name="encode", batch_size=batch_size, errors="raise"),
        Stage(generate, name="generate", batch_size=batch_size, errors="raise"),
    ], queue_size=2 * batch_size, progress=progress, desc=f"captioning ({method})", unit="image",
        bar_from_first_result=True)

    pending = {}
    try:
        for item in pipeline.run(todo):
            i = item.input
            entry = entries[i]
            if item.ok:
                generated = item.value
                results[i] = _result(entry, caption=generated[0]["text"], candidates=_candidates(generated),
                                     timings=item.timings)
                if save and entry.key is not None:
                    pending[entry.key] = _map_entry(results[i], settings, entry.key)
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
                view.set(_save(map_path, pending))  # with what concurrent runs wrote meanwhile
                pending = {}
    except BaseException:  # also on KeyboardInterrupt: keep every caption already made, re-raise the cause
        if pending:
            try:
                _save(map_path, pending)
            except ValueError as e:  # a damaged map.json (the batch went to a sidecar): not the cause
                logger.error("%s", e)
        raise
    if pending:
        _save(map_path, pending)
    if status and save and any(r["error"] is None and not r.get("cached") for r in results):
        status(f"captions saved in {map_path}")

    if not return_candidates:
        for r in results:
            r.pop("candidates", None)
    if display:
        show_results(entries, results)
    return results


def _pad(batch, size):
    """``batch`` (a list) extended with copies of its last item up to ``size`` (None: as is)."""
    if size is None or len(batch) >= size:
        return list(batch)
    return list(batch) + [batch[-1]] * (size - len(batch))


def _result(entry, caption=None, candidates=None, error=None, timings=None, cached=False):
    return {"image": entry.label, "caption": caption, "candidates": candidates, "error": error,
            "cached": cached, "timings": dict(timings or {})}


def _map_entry(result, settings, key):
    entry = {"caption": result["caption"], "candidates": result["candidates"], "settings": settings,
             "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        entry.update(_file_stamp(key))
    except OSError:
        pass
    return entry


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
