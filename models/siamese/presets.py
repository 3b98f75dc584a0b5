"""OpenAI's published CLIP checkpoints by name: where each file comes from and the SHA-256 it must have.

The names are those of OpenAI's ``clip`` package (``clip.available_models()``, v1.0). Each URL path embeds
the file's SHA-256, which `utils.downloads.fetch` verifies after download and on every use. Light on purpose
(no TensorFlow): the CLI lists and checks names without loading a model.

Example::

    from models.siamese.presets import CLIP_SOURCES, fetch_clip
    path = fetch_clip("ViT-B/32")        # <store>/downloads/ViT-B-32.pt, downloaded once
"""

from pathlib import Path

from utils.downloads import Source, fetch


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


def clip_source(name_or_source) -> Source:
    """The `Source` of a CLIP name (or the `Source` itself); KeyError listing the known names otherwise."""
    if isinstance(name_or_source, Source):
        return name_or_source
    if name_or_source not in CLIP_SOURCES:
        raise KeyError(f"unknown CLIP model {name_or_source!r}; known: {', '.join(CLIP_SOURCES)}")
    return CLIP_SOURCES[name_or_source]


def fetch_clip(name_or_source, root=None, progress=True) -> Path:
    """The path of an OpenAI CLIP ``.pt`` (downloaded and SHA-256-verified on first use)."""
    return fetch(clip_source(name_or_source), root, progress)
