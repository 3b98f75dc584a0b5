"""What the tests and the benchmarks share: the tiny models, the reference configurations and the PyTorch
references (OpenAI's CLIP, the official ClipCap code, its training step).

Floor 6 of the house (ARCHITECTURE.md): above the library, below ``unitest/``, ``benchmarks/`` and
``main.py``, which import it; nothing of the library imports it (`unitest/test_import_graph.py`), so torch,
transformers and OpenAI's ``clip`` package, which its modules import, never lie on a user's path. The
torch-free parts a library module needs live lower (the BPE trainer: `utils.gpt2_tokenizer`).
"""

import custom_layers  # noqa: F401  (chooses Keras' backend before anything imports Keras)
