"""GPT-2-family files from the Hugging Face hub: a ClipCap's tokenizer (``vocab.json``, ``merges.txt``) and, for
training, its language model (``config.json``, ``model.safetensors``), of any repository (``gpt2``,
``distilgpt2``, ``owner/gpt2-french``...), none special-cased.

Where a repository's files go: ``<store>/downloads/<repo>-tokenizer/`` and ``<repo>-model/`` (``owner--name``
for ``owner/name``), unless the user's Hugging Face cache already holds them all (the name is returned, and
the loaders read that cache). Each file goes through the transport (`utils.downloads.fetch`) with
``huggingface_hub.hf_hub_download`` as its client for `HUB_URL` (staged in ``downloads/.huggingface/``): the
transport publishes it as its own downloads, checked against the SHA-256 recorded in
``downloads/manifest.json`` at its first download (trust on first use; a different new file is deleted),
recorded otherwise; a file already in the folder is checked and never replaced; ``IMAGE_CAPTIONING_MIRROR``
(files named ``<repo>-<file>``: ``gpt2-vocab.json``, ``owner--name-model.safetensors``) and
``IMAGE_CAPTIONING_OFFLINE`` as for every file. An unreachable hub (one metadata request, no retries) or
``HF_HUB_OFFLINE`` is an `OfflineError` at once naming every missing file and where to place it.

Light on purpose (``huggingface_hub`` is imported when a file is fetched): `models.image_captioning.presets`
lists these files for ``download --list`` without it.

Example::

    from models.image_captioning.gpt2_hub import fetch_gpt2_tokenizer
    load_gpt2_tokenizer(fetch_gpt2_tokenizer("gpt2"))   # downloads/gpt2-tokenizer/ (or the HF cache's)
"""

import os
import re

from utils.download_manifest import DownloadError, OfflineError, Source, downloads_dir
from utils.downloads import MIRROR_ENV, fetch

#: Where hub repositories' files come from (``<HUB_URL>/<repo>/resolve/main/<file>``).
HUB_URL = "https://huggingface.co"
REVISION = "main"
#: GPT-2's own repositories, which the hub moved under ``openai-community/`` (the old name still names them).
RENAMED_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
#: A GPT-2-family tokenizer's files, and a language model's (one safetensors file: sharded ones unsupported).
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MODEL_FILES = ("config.json", "model.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_METADATA_TIMEOUT_S = 10  # the one request that tells an unreachable hub


def is_hub_name(name) -> bool:
    """Whether ``name`` is a hub repository id (``name`` or ``owner/name``; no ``..``), not a path."""
    return isinstance(name, str) and _REPO_ID.fullmatch(name) is not None and ".." not in name


def hub_repo(name) -> str:
    """The repository that holds ``name``'s files (``gpt2`` -> ``openai-community/gpt2``)."""
    return f"openai-community/{name}" if name in RENAMED_GPT2 else name


def hub_sources(name, files):
    """{file: `Source`} of hub repository ``name``'s ``files``: named ``<repo>-<file>`` (``owner--name-<file>``:
    one plain file name, on a mirror and in the manifest), from ``<HUB_URL>/<repo>/resolve/main/<file>``."""
    if not is_hub_name(name):
        raise ValueError(f"{name!r} is not a Hugging Face repository name (name or owner/name)")
    stem = name.replace("/", "--")
    return {file: Source(f"{stem}-{file}", url=f"{HUB_URL}/{hub_repo(name)}/resolve/{REVISION}/{file}")
            for file in files}


def hub_folder(name, kind, root=None):
    """``downloads/<repo>-<kind>/``: where repository ``name``'s ``kind`` ("tokenizer", "model") files go."""
    return downloads_dir(root) / f"{name.replace('/', '--')}-{kind}"


def fetch_gpt2_tokenizer(name="gpt2", root=None, progress=True):
    """A directory or hub name that ``utils.tokenizer.load_gpt2_tokenizer`` loads: a local directory as is; a
    hub repository's ``vocab.json`` and ``merges.txt`` (`fetch_hub_files`); anything else as is (the loader
    names it)."""
    if os.path.isdir(name) or not is_hub_name(name):
        return str(name)
    return fetch_hub_files(name, TOKENIZER_FILES, "tokenizer", root, progress)


def fetch_gpt2_model(name, root=None, progress=True):
    """A directory that ``utils.convert.hf_gpt2.load_gpt2`` loads (or the hub name when the Hugging Face cache
    holds it): a local directory as is, a hub repository's ``config.json`` and ``model.safetensors`` as
    `fetch_gpt2_tokenizer` fetches a tokenizer."""
    if os.path.isdir(name) or not is_hub_name(name):
        return str(name)
    return fetch_hub_files(name, MODEL_FILES, "model", root, progress)


def fetch_hub_files(name, files, kind, root=None, progress=True):
    """Hub repository ``name``'s ``files``: the name itself when the Hugging Face cache holds them all (and no
    mirror is set), else `hub_folder` with each file fetched there (`fetch_hub_file`); every missing file
    named in one `OfflineError`."""
    directory = hub_folder(name, kind, root)
    sources = hub_sources(name, files)
    present = all(os.path.lexists(directory / local) for local in sources)
    if not present and not os.environ.get(MIRROR_ENV, "").strip() and _in_hf_cache(name, files):
        return name
    missing = []
    for local, source in sources.items():
        try:
            fetch_hub_file(name, local, source, directory / local, root, progress)
        except OfflineError as e:  # name every missing file at once
            missing.append(str(e))
    if missing:  # lines at a terminal
        raise OfflineError(f"the {kind} {name!r}:\n    - " + "\n    - ".join(missing))
    return str(directory)


def fetch_hub_file(name, file, source, dest, root=None, progress=True):
    """``dest``, holding repository ``name``'s ``file``: fetched by the transport (`utils.downloads.fetch`: a
    file already there checked and never replaced, the mirror's ``<repo>-<file>``, offline mode, one process
    at a time, the manifest) with ``huggingface_hub`` as its client for the hub (`_hub_download`)."""
    return fetch(source, root, progress, dest=dest,
                 client=lambda dest: _hub_download(hub_repo(name), file, source, dest, root, progress))


def _hub_download(repo, file, source, dest, root, progress):
    """``huggingface_hub.hf_hub_download`` of ``repo``'s ``file`` into ``downloads/.huggingface/<repo>/`` (its
    resumable staging); its errors as the transport's: `OfflineError` (no network, ``HF_HUB_OFFLINE``: at once,
    after one metadata request without retries) or `DownloadError`."""
    from httpx2 import TransportError  # huggingface_hub's HTTP client (its dependency)
    from huggingface_hub import get_hf_file_metadata, hf_hub_download
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, OfflineModeIsEnabled
    from tqdm.auto import tqdm

    class _Progress(tqdm):  # huggingface_hub takes a class; this one honours ``progress``
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": not progress})

    staging = downloads_dir(root) / ".huggingface" / repo.replace("/", "--")
    try:
        get_hf_file_metadata(source.url, timeout=_METADATA_TIMEOUT_S, endpoint=HUB_URL)
        return hf_hub_download(repo, file, revision=REVISION, endpoint=HUB_URL, local_dir=staging,
                               tqdm_class=_Progress)
    except (HfHubHTTPError, FileMetadataError) as e:  # before OSError: the server answered, not as the hub does
        raise DownloadError(f"cannot download {source.filename} from {source.url}: {type(e).__name__}: {e}") from e
    except (OfflineModeIsEnabled, TransportError, OSError) as e:
        raise OfflineError(
            f"cannot download {source.filename} from {source.url} ({type(e).__name__}: {e}). No network? "
            f"Download it elsewhere and place it at {dest}, or set {MIRROR_ENV} to a server holding it") from e


def _in_hf_cache(name, files=TOKENIZER_FILES):
    from huggingface_hub import try_to_load_from_cache

    for repo in dict.fromkeys((name, hub_repo(name))):
        found = [try_to_load_from_cache(repo, local) for local in files]
        if all(isinstance(path, str) for path in found):
            return True
    return False
