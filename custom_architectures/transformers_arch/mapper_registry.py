"""The ClipCap mapper types by name: the one list of them, readable without importing Keras.

`MAPPERS` maps a ``mapping_type`` to a `MapperType`: the class (the class itself, or ``"module:Class"``, imported
when first needed: the library's own mappers are named so, and the command line lists the names without
importing Keras or TensorFlow) and the constructor arguments the name fixes (``linear`` is `ClipCapMLP` with
``num_hidden_layers=0``). A mapper class takes ``prefix_size`` (D), ``prefix_length`` (K) and ``n_embd`` (C)
among its constructor arguments, has those three as attributes, maps (B, D) to (B, K, C), and writes its
constructor arguments in ``get_config`` (``config = super().get_config(); config.update(...)``).

Everything else reads this table: `clip_cap_arch.build_mapper` / `mapping_type_of` / `mapper_config`, the
training hyper-parameters' ``mapping_type`` choices (`hparams.training`), the trainer's model factory (which
passes the hyper-parameters named like `mapper_arguments`) and the official-checkpoint converter
(`utils.convert.clipcap`, which builds from `mapper_arguments` too).

Example (a new mapper type, as `unitest/test_toy_mapper.py` adds one)::

    MAPPERS["toy"] = MapperType(ToyMapper)           # or "my_package.my_module:ToyMapper"
    mapper_arguments("toy")                          # ('prefix_size', 'prefix_length', 'n_embd', 'width')
"""

import importlib
import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MapperType:
    """One mapper type: ``cls`` (a Keras model class, or ``"package.module:ClassName"``) and ``fixed``, the
    constructor arguments its name sets (not given by callers, not written in `mapper_config`)."""

    cls: object
    fixed: dict = field(default_factory=dict)

    def resolve(self) -> type:
        """The class (imported, for a ``"module:Class"`` name)."""
        if not isinstance(self.cls, str):
            return self.cls
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)


_ARCH = "custom_architectures.transformers_arch.clip_cap_arch:"
#: mapping_type -> `MapperType`. Adding a mapper type: its class, and one entry here.
MAPPERS = {
    "mlp": MapperType(_ARCH + "ClipCapMLP", {"num_hidden_layers": 1}),
    "linear": MapperType(_ARCH + "ClipCapMLP", {"num_hidden_layers": 0}),
    "transformer": MapperType(_ARCH + "ClipCapTransformerMapper"),
}


def mapper_type(mapping_type) -> MapperType:
    """The `MapperType` of ``mapping_type``; `ValueError` naming the registered ones for an unknown one."""
    if not isinstance(mapping_type, str) or mapping_type not in MAPPERS:
        raise ValueError(f"unknown mapping_type {mapping_type!r}: expected one of {', '.join(map(repr, MAPPERS))}")
    return MAPPERS[mapping_type]


def mapper_arguments(mapping_type) -> tuple:
    """The constructor arguments a caller gives a ``mapping_type`` (its class's named parameters, less those
    the type fixes), in the constructor's order: what the model factory reads from the hyper-parameters and
    the converter from a checkpoint's description."""
    entry = mapper_type(mapping_type)
    parameters = inspect.signature(entry.resolve().__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name != "self" and p.name not in entry.fixed
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
