"""An official ClipCap model by name: its files fetched and verified, converted once into the model store.

``get_pretrained(ClipCap, "coco")`` (what ``ClipCap.load("coco")`` does on first use) downloads the
official checkpoint (checked to be the model its name promises before it is published), the CLIP it was
trained on and the GPT-2 tokenizer (`download_model`), converts them (`convert_model`) into
``<store>/coco/``, and loads that folder on every later call (no torch needed then).

The model class is passed in, as keras-hub's preset loaders receive ``cls``: this module sits below
``clip_cap.py`` (which calls it from ``ClipCap.load``) and never imports it, so no import cycle forms.

Example::

    from models.image_captioning import ClipCap
    from models.image_captioning.pretrained import download_model, get_pretrained
    checkpoint, clip, tokenizer = download_model("coco")          # files only, for an offline install
    model = get_pretrained(ClipCap, "coco", force_convert=True)    # convert again
"""

import os
from pathlib import Path

from models.image_captioning.gpt2_hub import fetch_gpt2_tokenizer
from models.image_captioning.presets import resolve_model
from models.siamese.presets import clip_source, fetch_clip
from utils.convert.common import CheckpointError
from utils.download_manifest import (
    DownloadError,
    OfflineError,
    downloads_dir,
    forget,
    read_manifest,
    sha256_of,
)
from utils.downloads import fetch
from utils.file_utils import check_model_name, check_replaceable, file_lock
from utils.model_store import is_model_folder, is_saved_model, recover_model_dir, saved_model_dir


def fetch_checkpoint(name_or_spec, root=None, progress=True) -> Path:
    """The path of a ClipCap model's checkpoint, downloaded if needed, and checked to be that model's
    (`ModelSpec.expect`; a readable ClipCap checkpoint at least) before it is published or used."""
    from utils.convert.clipcap import check_clipcap_checkpoint  # torch: only when a checkpoint is checked

    spec = resolve_model(name_or_spec)
    return fetch(spec.checkpoint, root, progress,
                 verify=lambda path: check_clipcap_checkpoint(path, spec.expect, name=spec.name))


def download_model(name_or_spec, root=None, progress=True):
    """Download (or find in the cache) every file of a ClipCap model; returns (checkpoint, clip, tokenizer).
    Offline, every missing file is named in one `OfflineError`."""
    spec = resolve_model(name_or_spec)
    found, missing = [], []
    for get in (lambda: fetch_checkpoint(spec, root, progress), lambda: fetch_clip(spec.clip, root, progress),
                lambda: fetch_gpt2_tokenizer(spec.tokenizer, root, progress)):
        try:
            found.append(get())
        except OfflineError as e:  # report every missing file at once, not one per attempt
            missing.append(str(e))
    if missing:
        raise OfflineError(f"model {spec.name!r} cannot be prepared offline:\n  - " + "\n  - ".join(missing)
                           + "\n" + offline_route(spec))
    return tuple(found)


def offline_route(spec):
    """What to do without network when the files are elsewhere (the missing-files error's last lines):
    convert them under a name of one's own, then caption with that name."""
    clip = clip_source(spec.clip).filename
    local = f"my_{spec.name}"
    return (f"Or, with these files somewhere else, convert them without network (see README, 'Without network'):\n"
            f"  python main.py convert <path to {spec.checkpoint.filename}> --clip <path to {clip}> "
            f"--tokenizer <folder with vocab.json and merges.txt> --name {local}\n"
            f"  python main.py caption IMAGES --model {local}")


def convert_model(model_class, checkpoint, clip, tokenizer, directory, name=None, overwrite=False, clip_name=None,
                  status=None, **clipcap_kwargs):
    """Convert an official ClipCap ``.pt`` + CLIP ``.pt`` + tokenizer with ``model_class`` (`ClipCap`) and save
    it to ``directory`` atomically.

    ``clip_name``: the OpenAI name of that CLIP ("ViT-B/32"), recorded in the config (``clip_name``) so that
    `ClipCap.save_official` can say which CLIP the exported checkpoint needs.

    The model is written to a temporary sibling directory and renamed, so an interrupted conversion never
    leaves a half-saved model that would be picked up later. An existing ``directory`` is replaced only when
    it is empty or a saved ClipCap (`is_saved_model`) and ``overwrite``; anything else raises `UnsafePathError`
    before the conversion starts (nothing is deleted). ``name`` (default: the folder's name) goes into the
    config; it must be a plain model name. ``status``: a callable given a line as each step starts (the
    ``convert`` command prints them: a conversion takes tens of seconds). Returns the loaded model.
    """
    from models.siamese.clip import CLIP
    from utils.tokenizer import load_gpt2_tokenizer

    directory = Path(directory)
    name = check_model_name(name if name is not None else directory.name)
    check_replaceable(directory, is_saved_model, overwrite)  # refuse before the (long) conversion
    say = status or (lambda line: None)
    # the text encoder is kept too: re-ranking captions by CLIPScore needs it (`models.image_captioning.rerank`)
    if isinstance(clip, str | os.PathLike):
        say(f"reading and converting the CLIP {clip} (image and text encoders) ...")
        clip_model = CLIP.from_pretrained(str(clip))
    else:
        clip_model = clip
    if isinstance(tokenizer, str | os.PathLike):
        say(f"reading the GPT-2 tokenizer {tokenizer} ...")  # a hub name: by the transport (mirror, manifest)
        tok = load_gpt2_tokenizer(fetch_gpt2_tokenizer(str(tokenizer)))
    else:
        tok = tokenizer
    say(f"reading and converting the ClipCap checkpoint {checkpoint} (mapper and GPT-2) ...")
    # name=None: from_pretrained would save into the model store itself; we save once, atomically, below
    model = model_class.from_pretrained(str(checkpoint), clip=clip_model, tokenizer=tok,
                                        clip_name=None if clip_name is None else str(clip_name), **clipcap_kwargs)
    model.name = name
    say(f"saving {directory} ...")
    model.save(directory, overwrite=overwrite)  # a complete new folder renamed into place (replace_dir)
    return model


def get_pretrained(model_class, name_or_spec, root=None, force_convert=False, progress=True):
    """A ready ``model_class`` (`ClipCap`) by official name: downloaded, verified and converted on first use,
    then loaded from ``<store>/<name>/``.

    A checkpoint that cannot be converted is deleted when it was downloaded by this call (it would fail
    again), kept otherwise (it may have been placed by hand); the error says which.

    First uses running at once (two processes or threads) do not race: the download and conversion hold an
    inter-process lock on the model's folder (``<store>/<name>.lock``), so one converts and the others wait,
    then load its folder (a second conversion would find the folder taken and fail).
    """
    spec = resolve_model(name_or_spec)
    directory = recover_model_dir(saved_model_dir(spec.name, root))  # a save killed half-way: finished first
    if is_model_folder(directory) and not force_convert:  # converted already (user files in it or not)
        return model_class.load(str(directory))
    with file_lock(directory):
        if is_model_folder(directory) and not force_convert:  # converted by another process meanwhile
            return model_class.load(str(directory))
        return _download_and_convert(model_class, spec, directory, root, force_convert, progress)


def _recorded(source, root):
    """Whether the manifest holds an entry for ``source`` (True when it cannot be read: then nothing of ours
    is removed from it)."""
    try:
        return source.filename in read_manifest(root)
    except DownloadError:  # damaged: `fetch` says so
        return True


def _download_and_convert(model_class, spec, directory, root, force_convert, progress):
    already_cached = (downloads_dir(root) / spec.checkpoint.filename).is_file()
    recorded_before = already_cached or bool(spec.checkpoint.sha256) or _recorded(spec.checkpoint, root)
    checkpoint, clip, tokenizer = download_model(spec, root, progress)
    try:
        return convert_model(model_class, checkpoint, clip, tokenizer, directory, name=spec.name,
                             overwrite=force_convert, clip_name=spec.clip if isinstance(spec.clip, str) else None,
                             **spec.clipcap_kwargs)
    except CheckpointError as e:
        if not already_cached:  # we downloaded it just now: do not keep a file that cannot be converted
            # ... nor the SHA-256 its download recorded (trust on first use): it would refuse every later,
            # good download of that name
            sha256 = None if recorded_before else sha256_of(checkpoint)
            checkpoint.unlink(missing_ok=True)
            forgotten = sha256 is not None and forget(spec.checkpoint, sha256, root)
            raise CheckpointError(f"{e} (the downloaded file {checkpoint} was deleted"
                                  + (", and its record in the download manifest removed)" if forgotten else ")")
                                  ) from e
        raise CheckpointError(f"{e} (delete or replace {checkpoint} and try again)") from e
