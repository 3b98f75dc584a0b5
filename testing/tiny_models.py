"""Tiny offline demo models: official-format files with random weights, and the saved model built from them.

The one factory of the tests' tiny models (`shared_tiny_model`: a saved folder per kind / seed, once per
session; `tiny_clipcap`: loaded, with or without its CLIP; ``unitest/conftest.py`` exposes them as
fixtures) and of the notebook's CI run. Everything is built locally, nothing is downloaded:

- ``tiny_clipcap.pt``: an official-format ClipCap checkpoint (``torch.save(model.state_dict())`` of the
  reference ``ClipCaptionModel`` in ``testing/clipcap_official.py``), MLP mapper, 4 prefix tokens,
  a 2-layer GPT-2 of width 64 (one head) whose vocabulary is the tokenizer's;
- ``tiny_clip.pt``: an OpenAI-format CLIP state dict (OpenAI's own ``clip.model.CLIP``, weights cast to fp16
  as in the released files): ViT, 32 px input, 16 px patches, embedding size 32;
- ``tokenizer/``: a byte-level BPE trained on a few sentences, saved in GPT-2's format;
- ``model/``: the three converted by ``models.image_captioning.pretrained.convert_model`` (what ``ClipCap.load`` reads).

Command line (imports torch and torchvision before TensorFlow, as required)::

    python -m testing.tiny_models /tmp/tiny           # prints /tmp/tiny/model
    IMAGE_CAPTIONING_NOTEBOOK_MODEL=/tmp/tiny/model jupyter nbconvert --execute image_captioning.ipynb
"""

import warnings
from pathlib import Path

# torchvision (imported by the `clip` package) must be loaded before TensorFlow
import torch
import torchvision  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "demo"

EMBED_DIM = 32  # CLIP embedding size = ClipCap prefix_size
PREFIX_LENGTH = 4
GPT = dict(n_positions=96, n_embd=64, n_layer=2, n_head=1)  # 96 positions: 4 prefix + the default 67 tokens;
# n_embd = 64 * n_head: the converters infer n_head as n_embd // 64 (a checkpoint does not store it)


def build_tiny_clip(path, seed=0):
    """Save a random tiny OpenAI CLIP (ViT) state dict in fp16, as OpenAI's files hold it; returns path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports pkg_resources (deprecated)
        from clip.model import CLIP, convert_weights

    torch.manual_seed(seed)
    model = CLIP(embed_dim=EMBED_DIM, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=1)
    convert_weights(model)  # fp16, like the released checkpoints
    torch.save(model.state_dict(), str(path))
    return Path(path)


def build_tiny_clipcap(path, tokenizer_dir, seed=0, stop_boost=3.0, kind="mlp"):
    """Save a random tiny official-format ClipCap checkpoint for the tokenizer's vocabulary.

    kind: ``"mlp"`` (as the COCO / Conceptual weights) or ``"transformer"`` (as the transformer weights,
    which expect a normalised CLIP embedding: 5 prefix positions, clip_length 3, 2 layers, 8 heads).
    """
    from transformers import GPT2Config, GPT2TokenizerFast

    from testing.clipcap_official import ClipCaptionModel

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, **GPT, initializer_range=0.1, bos_token_id=vocab - 1,
                        eos_token_id=vocab - 1)
    if kind == "transformer":
        model = ClipCaptionModel(5, clip_length=3, prefix_size=EMBED_DIM, num_layers=2, mapping_type="transformer",
                                 gpt_config=config).eval()
    else:
        model = ClipCaptionModel(PREFIX_LENGTH, prefix_size=EMBED_DIM, mapping_type=kind, gpt_config=config).eval()
    with torch.no_grad():  # make the stop token likely, so that captions end
        model.gpt.transformer.wte.weight[tokenizer.encode(".")[0]] *= stop_boost
    torch.save(model.state_dict(), str(path))
    return Path(path)


#: the sentences the tests' and benchmarks' tokenizers are trained on
SAMPLE_TEXT = [
    "A man riding a wave on top of a surfboard.",
    "A red circle on a blue background.",
    "A green square on a yellow background.",
    "Two dogs playing with a frisbee in the park.",
    "A plate of food with broccoli and rice.",
    "A cat sitting on a wooden table next to a laptop.",
    "A train traveling down the tracks near a station.",
    "Une personne qui marche dans la rue, sous la pluie.",
]


def train_gpt2_tokenizer(directory, vocab_size=400, texts=None):
    """A byte-level BPE trained on ``texts`` (default `SAMPLE_TEXT`) by the library's trainer
    (`utils.gpt2_tokenizer.train_gpt2_tokenizer`), then saved by transformers' ``GPT2TokenizerFast`` too, so
    that the folder holds the files a hub GPT-2 snapshot holds, as transformers writes them (what the
    tokenizer tests read); checked to hold the whole vocabulary. Returns the directory (str).

    transformers 5's ``GPT2TokenizerFast`` takes ``vocab=`` / ``merges=`` (``vocab_file=`` / ``merges_file=``
    are silently ignored and give an empty ``tokenizer.json``).
    """
    from transformers import GPT2TokenizerFast

    from utils.gpt2_tokenizer import GPT2_SPECIAL_TOKEN
    from utils.gpt2_tokenizer import train_gpt2_tokenizer as train_bpe

    directory = Path(directory)
    trained = len(train_bpe(directory, texts or SAMPLE_TEXT, vocab_size=vocab_size, repeats=20))
    GPT2TokenizerFast(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                      unk_token=GPT2_SPECIAL_TOKEN, bos_token=GPT2_SPECIAL_TOKEN,
                      eos_token=GPT2_SPECIAL_TOKEN).save_pretrained(str(directory))
    loaded = GPT2TokenizerFast.from_pretrained(str(directory))
    if len(loaded) != trained or not loaded.encode("."):
        raise RuntimeError(f"the tokenizer in {directory} did not save correctly ({len(loaded)} tokens, "
                           f"{trained} trained)")
    return str(directory)


def train_tiny_tokenizer(directory):
    """The tiny models' tokenizer (`train_gpt2_tokenizer` at its defaults); returns the directory (Path)."""
    return Path(train_gpt2_tokenizer(directory))


def build_tiny_files(directory, seed=0):
    """The three source files of the tiny model in ``directory``; returns {checkpoint, clip, tokenizer}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(directory / "tokenizer")
    return {"checkpoint": build_tiny_clipcap(directory / "tiny_clipcap.pt", tokenizer, seed),
            "clip": build_tiny_clip(directory / "tiny_clip.pt", seed),
            "tokenizer": tokenizer}


def build_tiny_model(directory, seed=0, name="tiny"):
    """Build the tiny files and convert them into ``directory/model`` (a saved ClipCap); returns that path."""
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model

    files = build_tiny_files(directory, seed)
    model_dir = Path(directory) / "model"
    convert_model(ClipCap, files["checkpoint"], files["clip"], files["tokenizer"], model_dir, name=name)
    return model_dir


def _shared_dir(tmp_path_factory):
    # one copy per test session, shared by every test module (the base temp dir is per session)
    return tmp_path_factory.getbasetemp() / "tiny_models"


def shared_tiny_files(tmp_path_factory):
    """The tiny source files (checkpoint, CLIP, tokenizer) of the session, seed 0, built on first use."""
    directory = _shared_dir(tmp_path_factory)
    files = {"checkpoint": directory / "tiny_clipcap.pt", "clip": directory / "tiny_clip.pt",
             "tokenizer": directory / "tokenizer"}
    if not all(p.exists() for p in files.values()):
        files = build_tiny_files(directory)
    return files


def shared_tiny_model(tmp_path_factory, kind="mlp", seed=0):
    """THE tiny ClipCap of the tests, as a saved folder (built once per session and per kind / seed).

    kind: ``"mlp"`` or ``"transformer"`` (`build_tiny_clipcap`); seed: of the ClipCap weights (the CLIP and
    the tokenizer are the session's, seed 0). The seed-0 MLP model is named ``tiny``, the others
    ``tiny_<kind>[_<seed>]``.
    """
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model
    from utils.model_store import is_model_folder

    directory = _shared_dir(tmp_path_factory)
    suffix = ("" if kind == "mlp" else f"_{kind}") + ("" if seed == 0 else f"_{seed}")
    model_dir = directory / f"model{suffix}"
    if not is_model_folder(model_dir):
        files = shared_tiny_files(tmp_path_factory)
        checkpoint = files["checkpoint"]
        if suffix:
            checkpoint = build_tiny_clipcap(directory / f"tiny_clipcap{suffix}.pt", files["tokenizer"], seed=seed,
                                            kind=kind)
        convert_model(ClipCap, checkpoint, files["clip"], files["tokenizer"], model_dir, name=f"tiny{suffix}")
    return model_dir


def tiny_clipcap(tmp_path_factory, kind="mlp", seed=0, with_clip=True):
    """The in-memory `ClipCap` of `shared_tiny_model` (a fresh load: a test may change it); ``with_clip=False``
    loads it without its CLIP (``model.clip is None``: embeddings in, captions out)."""
    from models.image_captioning.clip_cap import ClipCap

    model = ClipCap.load(str(shared_tiny_model(tmp_path_factory, kind=kind, seed=seed)))
    if not with_clip:
        model.clip = None
    return model


# ------------------------------------------------------------------------------ parity-size checkpoints
# The ClipCap parity suites' models (conftest fixtures ``tiny_checkpoints`` / ``real_checkpoints``): the
# reference ``ClipCaptionModel`` at the "tiny" and the real sizes (MLP K=10, prefix 512; single Linear K=40,
# prefix 512; transformer K=L=40, 8 layers, prefix 640; GPT-2 124M shared by the three). Weights use a larger
# init scale so that next-token distributions are far from ties (a decision comparison then means something:
# the tests also check the margins), and the stop token's embedding is boosted so that some captions end
# before the maximum length. The MLP files are saved with the transformers-4.11 attn.bias buffers.

KINDS = ("mlp", "linear", "transformer")
TINY_INIT_SCALE = 5.0
REAL_INIT_SCALE = 3.0
STOP_BOOST = 3.0


def random_embeddings(n, dim, seed=0):
    """Embeddings of CLIP's magnitude (norm ~10), not unit vectors: normalisation must matter."""
    import numpy as np

    return np.random.default_rng(seed).normal(0.0, 0.5, size=(n, dim)).astype(np.float32)


def build_parity_checkpoints(directory, size, stop_id, vocab_size=None):
    """{kind: (torch ClipCaptionModel, official .pt path)} for every kind of `KINDS` at ``size`` ("tiny" or
    "real"; the real ones share one GPT-2)."""
    from testing import clipcap_official as ref

    directory = Path(directory)
    out, gpt = {}, None
    for i, kind in enumerate(KINDS):
        if size == "tiny":
            model = ref.build_random_clipcap(kind, "tiny", seed=i, init_scale=TINY_INIT_SCALE, vocab_size=vocab_size,
                                             stop_token_id=stop_id, stop_boost=STOP_BOOST)
        else:
            model = ref.build_random_clipcap(kind, "real", seed=10 + i, init_scale=REAL_INIT_SCALE,
                                             stop_token_id=stop_id, stop_boost=STOP_BOOST, gpt=gpt)
            gpt = model.gpt
        out[kind] = (model, ref.save_official(model, directory / f"{kind}.pt", legacy_buffers=kind == "mlp"))
    return out


def convert_checkpoints(checkpoints, tokenizer_dir):
    """{kind: ClipCap} converted from `build_parity_checkpoints`' files (no CLIP)."""
    from models.image_captioning.clip_cap import ClipCap

    return {kind: ClipCap.from_pretrained(path, tokenizer=tokenizer_dir) for kind, (_, path) in checkpoints.items()}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny offline demo model (random weights).")
    parser.add_argument("directory", help="where to write the source files and the converted model")
    parser.add_argument("--seed", type=int, default=0)
    print(build_tiny_model(parser.parse_args().directory, parser.parse_args().seed))
