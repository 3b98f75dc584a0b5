"""The official ClipCap models by name: their checkpoint, the CLIP and tokenizer each needs, and what the
checkpoint must be.

- ``coco``: MLP mapper + fine-tuned GPT-2, trained on COCO captions (CLIP ViT-B/32);
- ``conceptual``: MLP mapper + fine-tuned GPT-2, trained on Conceptual Captions (CLIP ViT-B/32);
- ``coco_transformer``: transformer mapper + frozen GPT-2, trained on COCO captions (CLIP RN50x4).

The checkpoints come from Google Drive (rmokady/CLIP_prefix_caption's README) and have no published hash:
their SHA-256 is recorded at the first download (`utils.download_manifest`), and each must be the model its
name promises (`ModelSpec.expect`). Light on purpose (no TensorFlow): the CLI lists and checks names without
loading a model. Fetching and converting a named model is `models.image_captioning.pretrained`.

Example::

    from models.image_captioning.presets import MODELS, resolve_model
    resolve_model("coco_transformer").clip        # 'RN50x4'
"""

from dataclasses import dataclass, field

from models.image_captioning.gpt2_hub import TOKENIZER_FILES, hub_folder, hub_sources, is_hub_name
from models.siamese.presets import CLIP_SOURCES, clip_source
from utils.download_manifest import DownloadError, Source, describe_pin, downloads_dir, read_manifest
from utils.model_store import saved_model_dir


@dataclass(frozen=True)
class ModelSpec:
    """A ClipCap model that can be downloaded by name.

    ``checkpoint``: the official ClipCap ``.pt``; ``clip``: a `CLIP_SOURCES` name or a `Source`;
    ``tokenizer``: ``"gpt2"`` (the hub's GPT-2 tokenizer) or a local directory; ``clipcap_kwargs``:
    extra arguments for ``ClipCap.from_pretrained``; ``expect``: what the checkpoint must be, as
    `utils.convert.clipcap.clipcap_identity` describes it (``mapping_type``, ``prefix_length``,
    ``prefix_size``, ``clip_length``, ``num_layers``, GPT-2's ``n_embd`` / ``n_layer`` / ``vocab_size``...):
    a download that differs is refused (`CheckpointError`) before it is published under this name.
    """

    name: str
    checkpoint: Source
    clip: str | Source
    tokenizer: str = "gpt2"
    description: str = ""
    clipcap_kwargs: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)


#: GPT-2 124M ("gpt2"), which every official ClipCap checkpoint fine-tunes or keeps frozen.
_GPT2_124M = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}


#: The official ClipCap checkpoints (rmokady/CLIP_prefix_caption README), with the CLIP each was trained on.
MODELS = {
    "coco": ModelSpec(
        "coco", Source("coco_weights.pt", drive_id="1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on COCO captions",
        expect={"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512, **_GPT2_124M}),
    "conceptual": ModelSpec(
        "conceptual", Source("conceptual_weights.pt", drive_id="14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on Conceptual Captions",
        expect={"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512, **_GPT2_124M}),
    "coco_transformer": ModelSpec(
        "coco_transformer",
        Source("coco_transformer_weights.pt", drive_id="1GYPToCqFREwi285wPLhuVExlz7DDUDfJ", kind="torch"),
        clip="RN50x4", description="transformer mapper + frozen GPT-2, trained on COCO captions",
        expect={"mapping_type": "transformer", "prefix_length": 40, "clip_length": 40, "num_layers": 8,
                "prefix_size": 640, **_GPT2_124M}),
}


def resolve_model(name_or_spec) -> ModelSpec:
    """A `ModelSpec` from a name in `MODELS` (or the spec itself); unknown names list the known ones."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if name_or_spec in MODELS:
        return MODELS[name_or_spec]
    raise KeyError(f"unknown model name {name_or_spec!r}; known ClipCap models: {', '.join(MODELS)} "
                   f"(or give a directory holding a saved model)")


def spec_files(spec, root=None):
    """(source, cache path) of every file a model needs: what to place where for an offline install."""
    spec = resolve_model(spec)
    clip = clip_source(spec.clip)
    files = [(spec.checkpoint, downloads_dir(root) / spec.checkpoint.filename),
             (clip, downloads_dir(root) / clip.filename)]
    if is_hub_name(spec.tokenizer):  # fetched as `gpt2_hub.fetch_gpt2_tokenizer` does
        folder = hub_folder(spec.tokenizer, "tokenizer", root)
        files += [(s, folder / local) for local, s in hub_sources(spec.tokenizer, TOKENIZER_FILES).items()]
    return files


def describe_sources(root=None):
    """Lines describing every known name (ClipCap and CLIP), its files, their origin, cache path and pinned
    or recorded SHA-256 (``python main.py download --list``)."""
    try:
        manifest = read_manifest(root)
    except DownloadError as e:
        manifest = None
        lines = [f"warning: {e}"]
    else:
        lines = []
    lines.append("ClipCap models:")
    for spec in MODELS.values():
        lines.append(f"  {spec.name}: {spec.description} (CLIP {spec.clip}) -> {saved_model_dir(spec.name, root)}")
        for source, path in spec_files(spec, root):
            lines.append(f"      {source.filename:28s} {source.origin}\n      {'':28s} -> {path}\n"
                         f"      {'':28s} {describe_pin(source, manifest)}")
    lines.append("CLIP models:")
    for name, source in CLIP_SOURCES.items():
        lines.append(f"  {name}: {source.filename} sha256={source.sha256}")
    return lines
