"""Training hyper-parameters: the official ClipCap recipe as defaults, saved as JSON, overridable from the CLI.

Defaults are those of the official ``train.py``: transformers' AdamW (``from transformers import AdamW``) at
its defaults (betas 0.9 / 0.999, eps 1e-6, weight decay 0.0; see `custom_train_objects.optimizers`), lr 2e-5
with 5000 warmup steps then linear decay,
batch 40, 10 epochs, a 10-position prefix, the MLP mapper (``mapping_type="transformer"``: 8 layers, 8 heads,
``clip_length`` 10), no prefix normalisation (``--normalize_prefix`` off), GPT-2 fine-tuned
(``prefix_only=False``; ``--only_prefix`` of the official code is ``prefix_only=True``).

Example::

    hp = TrainingHParams(epochs=5, prefix_only=True)
    hp.save("run/hparams.json"); hp = TrainingHParams.load("run/hparams.json")
    parser = argparse.ArgumentParser(); TrainingHParams.add_arguments(parser)
    hp = TrainingHParams.from_args(parser.parse_args(["--lr", "1e-4", "--no-normalize"]))
"""

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, fields

from custom_architectures.transformers_arch.mapper_registry import MAPPERS
from utils.file_utils import json_file_matches, read_json, write_json_atomic

PRECISIONS = (None, "mixed_float16", "mixed_bfloat16")


@dataclass
class TrainingHParams:
    """Everything that decides a training run (saved with every checkpoint and model)."""

    # optimisation (official recipe)
    lr: float = 2e-5
    warmup_steps: int = 5000
    batch_size: int = 40
    epochs: int = 10
    weight_decay: float = 0.0  # transformers.AdamW's default (the official code); decoupled, every parameter
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-6  # transformers.AdamW's default, added to sqrt(v) before bias correction
    gradient_clip_norm: float | None = None  # clip the global gradient norm (None: no clipping)
    mixed_precision: str | None = None  # None, "mixed_float16" (loss scaling) or "mixed_bfloat16"
    # model
    prefix_length: int = 10
    mapping_type: str = "mlp"  # a `mapper_registry.MAPPERS` name; the fields named like its arguments build it
    clip_length: int = 10  # transformer mapper only
    num_layers: int = 8  # transformer mapper only
    num_heads: int = 8  # transformer mapper only
    normalize: bool = False  # divide CLIP embeddings by their L2 norm before the mapper
    prefix_only: bool = False  # train the mapper only; GPT-2 frozen, in inference mode
    # data
    max_length: int | None = None  # caption tokens; None: min(mean + 10 std, max) of the training captions
    stop_token: str | None = None  # None: the model's (--init-model's, else "."); recorded in the saved model
    append_stop: bool = True  # append the stop token to captions that do not end with it
    shuffle: bool = True
    # run
    seed: int = 0
    save_every: int = 1  # checkpoint every N epochs (and at the end)
    checkpoint_every_steps: int | None = None  # also checkpoint every N steps (mid-epoch resume)
    jit_compile: bool = False  # XLA-compile the train step
    log_every: int = 10  # steps between CSV / TensorBoard rows

    def __post_init__(self):
        self.validate()

    def _type_errors(self):
        """Each field of another type than its annotation (a hand-edited or foreign hparams.json: ``"lr": "1e-4"``,
        ``"normalize": "no"``, ``"batch_size": 2.5``, NaN), one message each; an int where a float goes is made
        a float. Checked before the ranges, which would raise a TypeError on a string or pass a truthy one."""
        errors = []
        for f in fields(self):
            kind = _FIELD_TYPES[f.name]
            value = getattr(self, f.name)
            optional = type(None) in typing.get_args(kind)
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            if value is None and optional:
                continue
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
            if ok and base is float and not math.isfinite(value):
                ok = False
            if not ok:
                expected = {bool: "true or false", int: "an integer", float: "a finite number",
                            str: "a string"}[base] + (" or null" if optional else "")
                errors.append(f"{f.name} must be {expected}, got {value!r:.80}")
        return errors

    def validate(self):
        errors = self._type_errors()
        if errors:  # the ranges below compare numbers: not checked on values of the wrong type
            raise ValueError("invalid training hyper-parameters: " + "; ".join(errors))
        if self.lr <= 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "epochs", "prefix_length", "clip_length", "num_layers", "num_heads",
                     "save_every", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.epsilon <= 0 or not (0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1):
            errors.append(f"need weight_decay >= 0, epsilon > 0 and betas in [0, 1), got weight_decay="
                          f"{self.weight_decay}, epsilon={self.epsilon}, betas=({self.beta_1}, {self.beta_2})")
        if self.warmup_steps < 0:
            errors.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mapping_type not in MAPPERS:
            errors.append(f"mapping_type must be one of {tuple(MAPPERS)}, got {self.mapping_type!r}")
        if self.mixed_precision not in PRECISIONS:
            errors.append(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.gradient_clip_norm is not None and self.gradient_clip_norm <= 0:
            errors.append(f"gradient_clip_norm must be > 0, got {self.gradient_clip_norm}")
        if self.max_length is not None and self.max_length < 1:
            errors.append(f"max_length must be >= 1, got {self.max_length}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            errors.append(f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}")
        if errors:
            raise ValueError("invalid training hyper-parameters: " + "; ".join(errors))

    # --- JSON -------------------------------------------------------------------------------------------

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"hyper-parameters are a JSON object of names and values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hyper-parameters {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides):
        return self.from_dict({**self.to_dict(), **overrides})

    def save(self, path):
        path = os.fspath(path)
        write_json_atomic(path, self.to_dict(), indent=2)  # atomic, umask permissions
        return path

    @classmethod
    def load(cls, path):
        data = read_json(path, 1 << 20)  # bounded, depth-limited, the file named in errors
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    # --- command line ----------------------------------------------------------------------------------

    #: what an unset (None) default means, for ``--help``
    UNSET_HELP = {"gradient_clip_norm": "no clipping", "mixed_precision": "float32",
                  "max_length": "min(mean + 10 std, max) of the training captions' lengths",
                  "checkpoint_every_steps": "at the end of every save_every-th epoch only",
                  "stop_token": "the --init-model's, else '.'"}

    #: what each field does, for ``--help`` (its default is appended)
    FIELD_HELP = {
        "lr": "peak learning rate", "warmup_steps": "linear warmup steps from 0 to --lr, then linear decay to 0",
        "batch_size": "captions per optimizer step (global, over every replica and worker)",
        "epochs": "passes over the training captions",
        "weight_decay": "AdamW's decoupled weight decay (every parameter)", "beta_1": "Adam's beta_1",
        "beta_2": "Adam's beta_2", "epsilon": "Adam's epsilon, added to sqrt(v) (transformers.AdamW's place)",
        "gradient_clip_norm": "clip the global gradient norm to this value",
        "mixed_precision": "Keras mixed-precision policy", "prefix_length": "prefix positions K fed to GPT-2",
        "mapping_type": "the mapper type (its other arguments: the hyper-parameters of the same names)",
        "clip_length": "transformer mapper: learned constant positions", "num_layers": "transformer mapper: layers",
        "num_heads": "transformer mapper: attention heads",
        "normalize": "L2-normalise the CLIP embeddings before the mapper (the official --normalize_prefix)",
        "prefix_only": "train the mapper only, GPT-2 frozen without dropout (the official --only_prefix)",
        "max_length": "caption tokens kept (longer captions are cut)",
        "stop_token": "the token that ends a caption, one token of the tokenizer's vocabulary ('.', '。', '!', "
                      "'<|endoftext|>'), recorded in the saved model", "append_stop": "append --stop-token to captions without it",
        "shuffle": "shuffle the batches by (seed, epoch)", "seed": "seed of new weights, shuffling and dropout",
        "save_every": "checkpoint every N epochs (and at the end)",
        "checkpoint_every_steps": "also checkpoint every N steps (resume mid-epoch)",
        "jit_compile": "XLA-compile the training step", "log_every": "steps between CSV / TensorBoard rows",
    }

    @classmethod
    def add_arguments(cls, parser):
        """Add ``--<name>`` for every field (default: unset, so that only given values override)."""
        group = parser.add_argument_group("hyper-parameters (default: the official ClipCap recipe)")
        group.add_argument("--hparams", help="a JSON file of hyper-parameters (command-line values win)")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = cls.UNSET_HELP.get(f.name, f.default) if f.default is None else f.default
            kind = hints[f.name]
            if kind is bool:
                group.add_argument(flag, dest=f"hp_{f.name}", action=argparse.BooleanOptionalAction,
                                   default=None, help=f"{cls.FIELD_HELP[f.name]} (default: {default})")
                continue
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            choices = None
            if f.name == "mapping_type":
                choices = tuple(MAPPERS)  # the registry, as it stands when the parser is built
            elif f.name == "mixed_precision":
                choices = [p for p in PRECISIONS if p]
            group.add_argument(flag, dest=f"hp_{f.name}", type=base, default=None, choices=choices,
                               metavar=None if choices else f.name.upper(),
                               help=f"{cls.FIELD_HELP[f.name]} (default: {default})")

    @classmethod
    def from_args(cls, args, base=None):
        """``base`` (or ``--hparams`` file, or the defaults) overridden by the flags that were given."""
        hp = base or (cls.load(args.hparams) if getattr(args, "hparams", None) else cls())
        overrides = {f.name: getattr(args, f"hp_{f.name}") for f in fields(cls)
                     if getattr(args, f"hp_{f.name}", None) is not None}
        return hp.replace(**overrides)


#: each field's annotation, resolved (`TrainingHParams._type_errors`)
_FIELD_TYPES = typing.get_type_hints(TrainingHParams)


def is_hparams_file(path) -> bool:
    """Whether ``path`` holds hyper-parameters written by `TrainingHParams.save` (a previous run's), which a
    new run may overwrite; any other file is the user's."""
    names = {f.name for f in fields(TrainingHParams)}
    return json_file_matches(path, lambda d: isinstance(d, dict) and "lr" in d and set(d) <= names)
