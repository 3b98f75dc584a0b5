"""Model names → download sources, verified resumable downloads, and the converted-model store.

Names:

- ClipCap models (`MODELS`): ``coco`` (MLP mapper, COCO), ``conceptual`` (MLP mapper, Conceptual Captions),
  ``coco_transformer`` (transformer mapper, COCO). The official checkpoints come from Google Drive (gdown);
  each names the CLIP it was trained on and the GPT-2 tokenizer.
- CLIP models (`CLIP_SOURCES`): OpenAI's published files (``ViT-B/32``, ``RN50x4``, ...). Their URL path
  embeds the file's SHA-256, which is verified after download.
- The GPT-2 tokenizer: through ``huggingface_hub`` and its cache (``utils.tokenizer.load_gpt2_tokenizer``).

Files are cached in ``pretrained_models/downloads/``; a converted model is saved once in
``pretrained_models/<name>/`` and loaded from there afterwards (no torch needed then). Downloads are
atomic (a ``.part`` file renamed only once complete and verified) and resumable (HTTP ``Range``); a file
that fails its checksum or is not a checkpoint is deleted, never kept.

Environment variables:

- ``IMAGE_CAPTIONING_MIRROR=<base URL>``: fetch every file from ``<base URL>/<file name>`` instead of its
  origin (file names: see ``python main.py download --list``; the GPT-2 tokenizer's files are
  ``gpt2-vocab.json`` and ``gpt2-merges.txt``). Checksums are still verified.
- ``IMAGE_CAPTIONING_OFFLINE=1``: never download; a missing file raises `OfflineError` saying which file
  to put where. The same error is raised when the network cannot be reached.
- ``IMAGE_CAPTIONING_HOME=<dir>``: where the model store lives (default: ``pretrained_models/`` in the
  repository).

Example::

    from utils.downloads import get_pretrained
    model = get_pretrained("coco")          # downloads, verifies, converts once, then loads
    print(model.caption("demo/cat.jpg"))
"""

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MIRROR_ENV = "IMAGE_CAPTIONING_MIRROR"
OFFLINE_ENV = "IMAGE_CAPTIONING_OFFLINE"
HOME_ENV = "IMAGE_CAPTIONING_HOME"

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A file could not be downloaded, or what was downloaded is not what was expected."""


class OfflineError(DownloadError):
    """A file is needed, is not in the cache, and cannot be downloaded (offline mode or no network)."""


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One downloadable file.

    ``filename`` is its name in the cache and on a mirror; ``url`` a direct HTTP(S) address, or
    ``drive_id`` a Google Drive file id; ``sha256`` (when known) is verified; ``kind="torch"`` checks that
    the bytes are a PyTorch checkpoint (zip archive or pickle), which catches the HTML pages Google Drive
    serves instead of a file when its quota is exceeded.
    """

    filename: str
    url: str | None = None
    drive_id: str | None = None
    sha256: str | None = None
    kind: str | None = None

    @property
    def origin(self):
        if self.url:
            return self.url
        if self.drive_id:
            return f"https://drive.google.com/uc?id={self.drive_id}"
        return None


def _openai_clip(url):
    # OpenAI's URLs are .../clip/models/<sha256>/<file name>
    return Source(filename=url.rsplit("/", 1)[1], url=url, sha256=url.rsplit("/", 2)[1], kind="torch")


#: OpenAI's published CLIP checkpoints (the ``_MODELS`` table of the ``clip`` package, v1.0).
CLIP_SOURCES = {
    name: _openai_clip(url) for name, url in {
        "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
        "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
        "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
        "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
        "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    }.items()
}

#: The GPT-2 tokenizer files as named on a mirror (without a mirror the Hugging Face hub serves them).
GPT2_TOKENIZER_FILES = {
    "vocab.json": Source("gpt2-vocab.json", url="https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json"),
    "merges.txt": Source("gpt2-merges.txt", url="https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A ClipCap model that can be downloaded by name.

    ``checkpoint``: the official ClipCap ``.pt``; ``clip``: a `CLIP_SOURCES` name or a `Source`;
    ``tokenizer``: ``"gpt2"`` (the hub's GPT-2 tokenizer) or a local directory; ``clipcap_kwargs``:
    extra arguments for ``ClipCap.from_pretrained``.
    """

    name: str
    checkpoint: Source
    clip: str | Source
    tokenizer: str = "gpt2"
    description: str = ""
    clipcap_kwargs: dict = field(default_factory=dict)


#: The official ClipCap checkpoints (rmokady/CLIP_prefix_caption README), with the CLIP each was trained on.
MODELS = {
    "coco": ModelSpec(
        "coco", Source("coco_weights.pt", drive_id="1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on COCO captions"),
    "conceptual": ModelSpec(
        "conceptual", Source("conceptual_weights.pt", drive_id="14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on Conceptual Captions"),
    "coco_transformer": ModelSpec(
        "coco_transformer",
        Source("coco_transformer_weights.pt", drive_id="1GYPToCqFREwi285wPLhuVExlz7DDUDfJ", kind="torch"),
        clip="RN50x4", description="transformer mapper + frozen GPT-2, trained on COCO captions"),
}


def resolve_model(name_or_spec) -> ModelSpec:
    """A `ModelSpec` from a name in `MODELS` (or the spec itself); unknown names list the known ones."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if name_or_spec in MODELS:
        return MODELS[name_or_spec]
    raise KeyError(f"unknown model name {name_or_spec!r}; known ClipCap models: {', '.join(MODELS)} "
                   f"(or give a directory holding a saved model)")


# ------------------------------------------------------------------------------------------------ places


def home_dir() -> Path:
    """The model store: ``$IMAGE_CAPTIONING_HOME`` or ``pretrained_models/`` in the repository."""
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "pretrained_models"


def downloads_dir(root=None) -> Path:
    return Path(root or home_dir()) / "downloads"


def is_offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def mirror_url(source: Source) -> str | None:
    """``<mirror>/<file name>`` when ``IMAGE_CAPTIONING_MIRROR`` is set, else None."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return None
    return base.rstrip("/") + "/" + urllib.parse.quote(source.filename)


def _where_from(source):
    mirror = mirror_url(source)
    if mirror:
        return mirror
    if source.drive_id:
        return f"{source.origin} (Google Drive; e.g. `gdown {source.drive_id}`)"
    return source.origin


# -------------------------------------------------------------------------------------------- downloading


def fetch(source: Source, root=None, progress=True) -> Path:
    """The cached path of ``source``, downloading and verifying it first if needed.

    Raises `OfflineError` (offline mode, or the network is unreachable) naming the URL and the exact path
    where to place the file by hand, and `DownloadError` when the download is not what was expected (the
    bad file is deleted).
    """
    dest = downloads_dir(root) / source.filename
    if dest.is_file():
        return dest
    if is_offline():
        raise OfflineError(
            f"{source.filename} is not in the cache and downloads are disabled ({OFFLINE_ENV}=1). "
            f"Download it from {_where_from(source)} and place it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = mirror_url(source)
    if url is None and source.url is None and source.drive_id is not None:
        _drive_download(source, dest, progress)
    else:
        _http_download(url or source.url, dest, source, progress)
    return dest


def _unreachable(source, dest, url, error):
    return OfflineError(
        f"cannot download {source.filename} from {url} ({type(error).__name__}: {error}). No network? "
        f"Download it elsewhere and place it at {dest}, or set {MIRROR_ENV} to a server holding it")


def _http_download(url, dest, source, progress):
    """Resumable download to ``<dest>.part`` (HTTP Range), verified, then renamed to ``dest``."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "image_captioning"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the partial file may be complete
            _verify_and_publish(part, dest, source, url)
            return
        raise DownloadError(f"cannot download {source.filename} from {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(source, dest, url, e) from e
    with response:
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: asked to resume at byte {offset}, the server answered "
                                    f"{response.headers.get('Content-Range')!r}; delete {part} and retry")
            mode = "ab"
        else:  # the server ignored the Range header: start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=source.filename, disable=not progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except OSError as e:  # includes TimeoutError
                raise DownloadError(f"download of {source.filename} from {url} interrupted after "
                                    f"{f.tell()} bytes ({e}); run again to resume from {part}") from e
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"download of {source.filename} from {url} stopped at {part.stat().st_size} of "
                            f"{total} bytes; run again to resume from {part}")
    _verify_and_publish(part, dest, source, url)


def _content_range_start(value):
    try:  # "bytes 100-999/1000"
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _drive_download(source, dest, progress):
    """Google Drive through gdown (it resumes from its own partial file), then verified like the rest."""
    import gdown

    staging = dest.with_name(dest.name + ".gdown")
    try:
        gdown.download(id=source.drive_id, output=str(staging), quiet=not progress, resume=True)
    except Exception as e:  # gdown raises its own exceptions and requests' ConnectionError
        if isinstance(e, OSError | ConnectionError) or "connection" in type(e).__name__.lower():
            raise _unreachable(source, dest, source.origin, e) from e
        raise DownloadError(f"cannot download {source.filename} from {source.origin} with gdown: "
                            f"{type(e).__name__}: {e}. Download it by hand and place it at {dest}") from e
    _verify_and_publish(staging, dest, source, source.origin)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_and_publish(part, dest, source, url):
    problem = None
    if source.sha256:
        actual = sha256_of(part)
        if actual != source.sha256:
            problem = f"SHA-256 mismatch: expected {source.sha256}, got {actual}"
    if problem is None and source.kind == "torch":
        problem = _not_a_torch_file(part)
    if problem:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{source.filename} downloaded from {url} is corrupt or not the expected file "
                            f"({problem}); it was deleted. Run again to retry, or place a good copy at {dest}")
    os.replace(part, dest)
    logger.info("downloaded %s to %s", source.filename, dest)


def _not_a_torch_file(path):
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip archive (torch>=1.6) or legacy pickle
        return None
    if head.lstrip()[:1] == b"<":
        return "an HTML page, not a checkpoint (Google Drive's quota or confirmation page?)"
    return f"not a PyTorch checkpoint (starts with {head[:16]!r})"


# ------------------------------------------------------------------------------------------- whole models


def fetch_clip(name_or_source, root=None, progress=True) -> Path:
    """The path of an OpenAI CLIP ``.pt`` (downloaded and SHA-256-verified on first use)."""
    if isinstance(name_or_source, Source):
        return fetch(name_or_source, root, progress)
    if name_or_source not in CLIP_SOURCES:
        raise KeyError(f"unknown CLIP model {name_or_source!r}; known: {', '.join(CLIP_SOURCES)}")
    return fetch(CLIP_SOURCES[name_or_source], root, progress)


def fetch_gpt2_tokenizer(name="gpt2", root=None, progress=True):
    """A directory or hub name that ``utils.tokenizer.load_gpt2_tokenizer`` loads.

    A local directory is returned as is. ``"gpt2"`` without a mirror goes through the Hugging Face hub's
    cache (handled by ``load_gpt2_tokenizer``); with ``IMAGE_CAPTIONING_MIRROR`` set, ``gpt2-vocab.json``
    and ``gpt2-merges.txt`` are fetched from the mirror into ``downloads/gpt2-tokenizer/``.
    """
    if os.path.isdir(name):
        return str(name)
    if name != "gpt2":
        return name  # another hub repository: the hub and its cache handle it
    directory = downloads_dir(root) / "gpt2-tokenizer"
    if all((directory / local).is_file() for local in GPT2_TOKENIZER_FILES):
        return str(directory)
    if os.environ.get(MIRROR_ENV, "").strip():
        directory.mkdir(parents=True, exist_ok=True)
        for local, source in GPT2_TOKENIZER_FILES.items():
            os.replace(fetch(source, root, progress), directory / local)
        return str(directory)
    if is_offline() and not _in_hf_cache(name):
        raise OfflineError(
            f"the GPT-2 tokenizer is neither in {directory} nor in the Hugging Face cache, and downloads are "
            f"disabled ({OFFLINE_ENV}=1). Download vocab.json and merges.txt from "
            f"https://huggingface.co/openai-community/gpt2 and place them in {directory}/")
    return name


def _in_hf_cache(name):
    from huggingface_hub import try_to_load_from_cache

    for repo in (name, f"openai-community/{name}"):
        found = [try_to_load_from_cache(repo, local) for local in GPT2_TOKENIZER_FILES]
        if all(isinstance(path, str) for path in found):
            return True
    return False


def spec_files(spec, root=None):
    """(source, cache path) of every file a model needs: what to place where for an offline install."""
    spec = resolve_model(spec)
    clip = spec.clip if isinstance(spec.clip, Source) else CLIP_SOURCES[spec.clip]
    files = [(spec.checkpoint, downloads_dir(root) / spec.checkpoint.filename),
             (clip, downloads_dir(root) / clip.filename)]
    if spec.tokenizer == "gpt2":
        files += [(s, downloads_dir(root) / "gpt2-tokenizer" / local) for local, s in GPT2_TOKENIZER_FILES.items()]
    return files


def saved_model_dir(name, root=None) -> Path:
    return Path(root or home_dir()) / name


def is_saved_model(directory) -> bool:
    return (Path(directory) / "config.json").is_file()


def download_model(name_or_spec, root=None, progress=True):
    """Download (or find in the cache) every file of a ClipCap model; returns (checkpoint, clip, tokenizer)."""
    spec = resolve_model(name_or_spec)
    found, missing = [], []
    for get in (lambda: fetch(spec.checkpoint, root, progress), lambda: fetch_clip(spec.clip, root, progress),
                lambda: fetch_gpt2_tokenizer(spec.tokenizer, root, progress)):
        try:
            found.append(get())
        except OfflineError as e:  # report every missing file at once, not one per attempt
            missing.append(str(e))
    if missing:
        raise OfflineError(f"model {spec.name!r} cannot be prepared offline:\n  - " + "\n  - ".join(missing))
    return tuple(found)


def convert_model(checkpoint, clip, tokenizer, directory, name=None, clip_name=None, **clipcap_kwargs):
    """Convert an official ClipCap ``.pt`` + CLIP ``.pt`` + tokenizer and save it to ``directory`` atomically.

    ``clip_name``: the OpenAI name of that CLIP ("ViT-B/32"), recorded in the config (``clip_name``) so that
    `ClipCap.save_official` can say which CLIP the exported checkpoint needs.

    The model is written to a temporary sibling directory and renamed, so an interrupted conversion never
    leaves a half-saved model that would be picked up later. Returns the loaded `ClipCap`.
    """
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP
    from utils.tokenizer import load_gpt2_tokenizer

    directory = Path(directory)
    # ClipCap needs only the image encoder: the text encoder is neither converted nor saved
    clip_model = clip if not isinstance(clip, str | os.PathLike) else CLIP.from_pretrained(str(clip), visual_only=True)
    tok = load_gpt2_tokenizer(str(tokenizer)) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    # name=None: from_pretrained would save into the model store itself; we save once, atomically, below
    model = ClipCap.from_pretrained(str(checkpoint), clip=clip_model, tokenizer=tok, **clipcap_kwargs)
    model.config["name"] = name or directory.name
    if clip_name is not None:
        model.config["clip_name"] = str(clip_name)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save(str(staging))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def get_pretrained(name_or_spec, root=None, force_convert=False, progress=True):
    """A ready `ClipCap` by name: downloaded, verified and converted on first use, then loaded from disk.

    Example::

        model = get_pretrained("coco")   # pretrained_models/coco/ afterwards; later calls just load it
    """
    from utils.convert.common import CheckpointError

    spec = resolve_model(name_or_spec)
    directory = saved_model_dir(spec.name, root)
    if is_saved_model(directory) and not force_convert:
        from models.image_captioning.clip_cap import ClipCap

        return ClipCap.load(str(directory))
    already_cached = (downloads_dir(root) / spec.checkpoint.filename).is_file()
    checkpoint, clip, tokenizer = download_model(spec, root, progress)
    try:
        return convert_model(checkpoint, clip, tokenizer, directory, name=spec.name,
                             clip_name=spec.clip if isinstance(spec.clip, str) else None, **spec.clipcap_kwargs)
    except CheckpointError as e:
        if not already_cached:  # we downloaded it just now: do not keep a file that cannot be converted
            checkpoint.unlink(missing_ok=True)
            raise CheckpointError(f"{e} (the downloaded file {checkpoint} was deleted)") from e
        raise CheckpointError(f"{e} (delete or replace {checkpoint} and try again)") from e


def describe_sources(root=None):
    """Lines describing every known name, its files, their origin and their cache path (for the CLI)."""
    lines = ["ClipCap models:"]
    for spec in MODELS.values():
        lines.append(f"  {spec.name}: {spec.description} (CLIP {spec.clip}) -> {saved_model_dir(spec.name, root)}")
        for source, path in spec_files(spec, root):
            lines.append(f"      {source.filename:28s} {source.origin}\n      {'':28s} -> {path}")
    lines.append("CLIP models:")
    for name, source in CLIP_SOURCES.items():
        lines.append(f"  {name}: {source.filename} sha256={source.sha256}")
    return lines
