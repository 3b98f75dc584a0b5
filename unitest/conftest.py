"""Shared test set-up: quiet, CPU-only TensorFlow and the fixtures the suites share (pytest finds them here).

No test reaches the network: tokenizers are trained here and saved in GPT-2's file format, and weights are
random PyTorch modules saved in the official checkpoint formats. Every tiny model comes from one factory,
`testing.tiny_models`; the expensive fixtures are session-scoped (built once, shared by every suite):

- ``gpt2_tokenizer_dir`` / ``clipcap_tokenizer`` / ``stop_id``: a locally trained GPT-2-format tokenizer.
- ``tiny_checkpoints`` / ``real_checkpoints``: ``{kind: (torch ClipCaptionModel, .pt path)}`` for kind in
  ``mlp``, ``linear``, ``transformer`` at the tiny and the real sizes (`tiny_models.build_parity_checkpoints`);
  ``tiny_models`` / ``real_models``: ``{kind: ClipCap}`` converted from them (the parity suites).
- ``tiny_files`` / ``tiny_model_dir`` / ``tiny_clipcap``: the tiny demo model's source files, its saved
  folder and the loaded model (`tiny_models.shared_tiny_files` / `shared_tiny_model` / `tiny_clipcap`).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test downloads: a name that would need the network fails with our offline error instead (the download
# tests serve files from 127.0.0.1 and lift this themselves).
os.environ.setdefault("IMAGE_CAPTIONING_OFFLINE", "1")
# ... and no test writes into the repository's model store (pretrained_models/)
if "IMAGE_CAPTIONING_HOME" not in os.environ:
    os.environ["IMAGE_CAPTIONING_HOME"] = _store = tempfile.mkdtemp(prefix="image_captioning_test_store_")
    atexit.register(shutil.rmtree, _store, ignore_errors=True)

# torchvision's extension crashes the process (SIGSEGV) when it is loaded after TensorFlow, and transformers'
# PyTorch models load it when it is installed: the PyTorch references must come first.
import pytest
import torch  # noqa: F401
import torchvision  # noqa: F401

from testing import tiny_models as factory
from testing.tiny_models import train_gpt2_tokenizer


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A model store of the test's own (``<tmp>/home``) and no network: for suites that run commands
    (``pytestmark = pytest.mark.usefixtures("isolated_home")``)."""
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGE_CAPTIONING_OFFLINE", "1")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained locally and saved as GPT-2 files (vocab.json, merges.txt)."""
    return train_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def clipcap_tokenizer(gpt2_tokenizer_dir):
    from utils.tokenizer import load_gpt2_tokenizer

    return load_gpt2_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def stop_id(clipcap_tokenizer):
    from utils.tokenizer import stop_token_id

    return stop_token_id(clipcap_tokenizer, ".")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, clipcap_tokenizer, stop_id):
    return factory.build_parity_checkpoints(tmp_path_factory.mktemp("clipcap_tiny"), "tiny", stop_id,
                                            vocab_size=len(clipcap_tokenizer))


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory, stop_id):
    return factory.build_parity_checkpoints(tmp_path_factory.mktemp("clipcap_real"), "real", stop_id)


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoints, gpt2_tokenizer_dir):
    return factory.convert_checkpoints(tiny_checkpoints, gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def real_models(real_checkpoints, gpt2_tokenizer_dir):
    return factory.convert_checkpoints(real_checkpoints, gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """{checkpoint, clip, tokenizer}: the tiny demo model's source files (seed 0)."""
    return factory.shared_tiny_files(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The saved tiny MLP ClipCap (named "tiny"), with its CLIP."""
    return factory.shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_clipcap(tmp_path_factory):
    """The tiny MLP ClipCap loaded from `tiny_model_dir` (shared: do not change it in a test)."""
    return factory.tiny_clipcap(tmp_path_factory)
