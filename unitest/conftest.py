"""Shared test set-up: quiet, CPU-only TensorFlow and fixtures every suite needs.

No test reaches the network: tokenizers are trained here and saved in GPT-2's file format, and weights are
random PyTorch modules saved in the official checkpoint formats by each suite.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
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
import pytest  # noqa: E402
import torch  # noqa: E402, F401
import torchvision  # noqa: E402, F401

from unitest.tokenizer_utils import train_gpt2_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained locally and saved as GPT-2 files (vocab.json, merges.txt)."""
    return train_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"), vocab_size=400)
