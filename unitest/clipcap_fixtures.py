"""Session fixtures shared by the ClipCap suites: random official-format checkpoints and their conversions.

A suite takes the fixtures with ``from unitest.clipcap_fixtures import *  # noqa: F403`` (``__all__`` lists
only fixtures). Each importing module gets its own fixture definitions, so the values are kept in the
session's ``config.stash``: the 124M-parameter GPT-2 is built, saved and converted once per session.

- ``tiny_checkpoints`` / ``real_checkpoints``: ``{kind: (torch ClipCaptionModel, .pt path)}`` for kind in
  ``mlp``, ``linear`` (legacy single Linear) and ``transformer``. Real sizes: MLP K=10, prefix 512; single
  Linear K=40, prefix 512; transformer K=L=40, 8 layers, prefix 640; GPT-2 124M (shared by the three).
  The MLP files are saved with the transformers-4.11 ``attn.bias`` / ``attn.masked_bias`` buffers.
- ``tiny_models`` / ``real_models``: ``{kind: ClipCap}`` converted from those files.

Weights use a larger init scale so that next-token distributions are far from ties (a decision comparison
then means something: the tests also check the margins), and the stop token's embedding is boosted so
that some captions end before the maximum length.
"""

import numpy as np
import pytest
import torch

from unitest.reference import clipcap_official as ref

__all__ = ["clipcap_tokenizer", "stop_id", "tiny_checkpoints", "real_checkpoints", "tiny_models", "real_models"]

KINDS = ("mlp", "linear", "transformer")
TINY_INIT_SCALE = 5.0
REAL_INIT_SCALE = 3.0
STOP_BOOST = 3.0


def torch_prefix(model, embeddings, normalize):
    """The official projection of CLIP embeddings (N, D) numpy -> (N, K, C) torch."""
    e = torch.from_numpy(np.asarray(embeddings, np.float32))
    with torch.no_grad():
        return model.project(ref.normalize_embedding(e) if normalize else e)


def random_embeddings(n, dim, seed=0):
    """Embeddings of CLIP's magnitude (norm ~10), not unit vectors: normalisation must matter."""
    return np.random.default_rng(seed).normal(0.0, 0.5, size=(n, dim)).astype(np.float32)


_STASH = {name: pytest.StashKey() for name in __all__}


def _once(request, name, build):
    """The session's value of fixture `name`, built by `build()` the first time any module asks."""
    stash = request.config.stash
    if _STASH[name] not in stash:
        stash[_STASH[name]] = build()
    return stash[_STASH[name]]


@pytest.fixture(scope="session")
def clipcap_tokenizer(gpt2_tokenizer_dir):
    from utils.tokenizer import load_gpt2_tokenizer

    return load_gpt2_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def stop_id(clipcap_tokenizer):
    from utils.tokenizer import stop_token_id

    return stop_token_id(clipcap_tokenizer, ".")


@pytest.fixture(scope="session")
def tiny_checkpoints(request, tmp_path_factory, clipcap_tokenizer, stop_id):
    return _once(request, "tiny_checkpoints", lambda: _tiny_checkpoints(tmp_path_factory, clipcap_tokenizer, stop_id))


def _tiny_checkpoints(tmp_path_factory, clipcap_tokenizer, stop_id):
    directory = tmp_path_factory.mktemp("clipcap_tiny")
    out = {}
    for i, kind in enumerate(KINDS):
        model = ref.build_random_clipcap(kind, "tiny", seed=i, init_scale=TINY_INIT_SCALE,
                                         vocab_size=len(clipcap_tokenizer), stop_token_id=stop_id,
                                         stop_boost=STOP_BOOST)
        out[kind] = (model, ref.save_official(model, directory / f"{kind}.pt", legacy_buffers=kind == "mlp"))
    return out


@pytest.fixture(scope="session")
def real_checkpoints(request, tmp_path_factory, stop_id):
    return _once(request, "real_checkpoints", lambda: _real_checkpoints(tmp_path_factory, stop_id))


def _real_checkpoints(tmp_path_factory, stop_id):
    directory = tmp_path_factory.mktemp("clipcap_real")
    out, gpt = {}, None
    for i, kind in enumerate(KINDS):
        model = ref.build_random_clipcap(kind, "real", seed=10 + i, init_scale=REAL_INIT_SCALE, stop_token_id=stop_id,
                                         stop_boost=STOP_BOOST, gpt=gpt)
        gpt = model.gpt
        out[kind] = (model, ref.save_official(model, directory / f"{kind}.pt", legacy_buffers=kind == "mlp"))
    return out


@pytest.fixture(scope="session")
def tiny_models(request, tiny_checkpoints, gpt2_tokenizer_dir):
    return _once(request, "tiny_models", lambda: _convert(tiny_checkpoints, gpt2_tokenizer_dir))


@pytest.fixture(scope="session")
def real_models(request, real_checkpoints, gpt2_tokenizer_dir):
    return _once(request, "real_models", lambda: _convert(real_checkpoints, gpt2_tokenizer_dir))


def _convert(checkpoints, gpt2_tokenizer_dir):
    from models.image_captioning.clip_cap import ClipCap

    return {kind: ClipCap.from_pretrained(path, tokenizer=gpt2_tokenizer_dir)
            for kind, (_, path) in checkpoints.items()}

