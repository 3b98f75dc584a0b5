"""Decoding options, each declared once: its name, type, default, bounds, help and web-demo control.

An `Option` is everything the library knows of one keyword argument of ``ClipCap.generate``: the command line
makes its flag from it (``--beam-size``, type, help, default), the web demo its control, `Option.validate`
checks a value with it, and the serving export and ``evaluate`` list what they bake in or record from it.

Two kinds:

- a decoding method's own options sit on its sampler class (``Beam.options``: ``beam_size``, ``temperature``,
  `custom_architectures.samplers`), where a new method declares its new ones;
- `DECODER_OPTIONS` are taken by every method: how many captions, how long, the seed, CLIP re-ranking.

Light on purpose (numpy only): the command line reads the declarations without loading TensorFlow.

Example::

    TOY = Option("toy_option", int, 2, "how toy the toy is", minimum=1, control=Control(1, 5, 1))
    TOY.validate(3)        # 3;  TOY.validate(0): ValueError "toy_option must be >= 1, got 0"
    TOY.flag               # '--toy-option'
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The smallest temperature accepted: logits divided by less could overflow float32 to inf (NaN scores).
MIN_TEMPERATURE = 1e-6
#: Seeds are keyed by 32 bits (`samplers.counter_uniform`): larger ones are refused rather than folded.
SEED_LIMIT = 2**32
#: The most beams (``beam_size``) and captions per image (``num_captions``) one call decodes. Each is a row of
#: the decoding loop with its own KV cache (for GPT-2 124M, 12 layers x 2 x 768 float32 per position: ~5.5 MiB
#: a row over 10 prefix + 67 tokens) and its (V,) logits per step, for each image of a decoding chunk (at most
#: ``max_batch_size`` images). Unbounded, 40 000 sampled captions of the 400-token test model took 14 GB and
#: 10**8 asked for a [1, 1, 4e8, 64] tensor (a ResourceExhaustedError traceback): refused before any load now.
#: Beams: 256 rows (~1.4 GiB per image at the default length) is far beyond any use (the official ClipCap beam
#: is 5; the web demo's slider stops at 10), and the model's vocabulary bounds them too
#: (``ClipCap.check_generate_args``). Sampled captions: 4096, because drawing thousands of short captions to
#: estimate a distribution is a real use (the test suite draws 4000 first tokens, ``max_length=1``); more: call
#: again with another seed.
MAX_BEAM_SIZE = 256
MAX_NUM_CAPTIONS = 4096


class _ModelStopToken:
    """The default of ``stop_token`` arguments: the model's own stop token (``ClipCap.stop_token``)."""

    def __repr__(self):
        return "MODEL_STOP_TOKEN"

    def __reduce__(self):  # one object, also across pickling (Beam workers)
        return "MODEL_STOP_TOKEN"


#: ``stop_token=MODEL_STOP_TOKEN`` (the default of ``ClipCap.generate`` and what calls it): the model's stop
#: token, ``.`` for English GPT-2; a string: that token; None: never stop early. Which token ids it means
#: depends on the model's vocabulary: the model resolves it.
MODEL_STOP_TOKEN = _ModelStopToken()


# ---------------------------------------------------------------------------------------------- validation


def check_integer(name, value, minimum=None):
    """``value`` as an int if it is an integer (Python or numpy, not bool) >= ``minimum``; else ValueError.

    A float such as 2.5 (or 3.0) is refused rather than truncated, so a typo never silently changes the search.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name, value):
    """``value`` as a float if it is a finite real number (not bool); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_temperature(temperature):
    """A finite temperature >= `MIN_TEMPERATURE` as a float; else ValueError (NaN, inf, 0 and negatives give
    NaN scores or meaningless captions)."""
    value = check_real("temperature", temperature)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:g}, got {value}"
                         + (" (for the most likely caption use method='greedy')" if value <= 0 else ""))
    return value


def check_seed(seed):
    """A seed in [0, 2**32) as an int; else ValueError (the draws are keyed by 32 bits, and a larger seed
    would silently give the same captions as a smaller one)."""
    seed = check_integer("seed", seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**32) (sampling is keyed by 32 bits; a larger seed would be "
                         f"folded onto a smaller one), got {seed}")
    return seed


def check_num_captions(num_captions):
    """``num_captions`` as an int in [1, `MAX_NUM_CAPTIONS`]; else ValueError (the maximum bounds one call's
    allocation: each caption is a row of the decoding loop, with its own cache)."""
    num_captions = check_integer("num_captions", num_captions, minimum=1)
    if num_captions > MAX_NUM_CAPTIONS:
        raise ValueError(f"num_captions must be in [1, {MAX_NUM_CAPTIONS}], got {num_captions} (each caption "
                         "decodes with its own cache: the bound keeps one call's memory in reach; for more "
                         "sampled captions, call again with another seed)")
    return num_captions


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Control:
    """How the web demo shows an option: a slider from ``minimum`` to ``maximum`` by ``step``, starting at
    ``value`` (None: the option's default); an option with a single choice is a checkbox instead (ticked:
    that choice). ``label``: the words beside it (None: the option's name)."""

    minimum: float = 0
    maximum: float = 1
    step: float = 1
    value: Any = None
    label: str | None = None


@dataclass(frozen=True)
class Option:
    """One decoding option (a keyword argument of ``ClipCap.generate``), declared once.

    Attributes:
        name: the keyword argument; its command-line flag is `flag` (``top_k`` -> ``--top-k``).
        type: int, float or str (the command line parses the flag with it).
        default: what decoding uses when the option is not given (None: off / no limit).
        help: what it does, for ``--help`` (which methods take it and the default are added there).
        minimum, maximum: inclusive bounds checked by `validate` (None: unbounded); with ``check``, declared
            for readers and enforced by the check itself (``beam_size``, ``num_captions``).
        choices: the values allowed (None: any of ``type``).
        check: a function of the value that validates it and returns it in canonical form, for rules the
            bounds do not say (its own messages); replaces the type and bounds check.
        default_text: how ``--help`` states the default when its value says too little ("no limit").
        ignorable: a method that does not take it may still be given it: checked, then ignored (``generate``
            once passed ``beam_size`` and ``temperature`` to every method); otherwise giving it to such a
            method is refused.
        control: the web demo's `Control` (None: no control in the demo).
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    check: Callable | None = None
    default_text: str | None = None
    ignorable: bool = False
    control: Control | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value):
        """``value`` checked and in canonical form (int, float or str); None: the default. ValueError naming
        the option and the rule otherwise."""
        if value is None:
            return self.default
        if self.check is not None:
            return self.check(value)
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be None or one of {self.choices}, got {value!r}")
            return value
        if self.type is int:
            value = check_integer(self.name, value)
        elif self.type is float:
            value = check_real(self.name, value)
        elif not isinstance(value, self.type):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        return self._check_bounds(value)

    def _check_bounds(self, value):
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                raise ValueError(f"{self.name} must be in [{low}, {high}], got {value}")
            raise ValueError(f"{self.name} must be {'>=' if high is None else '<='} "
                             f"{low if high is None else high}, got {value}")
        return value

    def default_words(self) -> str:
        """The default as ``--help`` states it."""
        return self.default_text if self.default_text is not None else str(self.default)


# ------------------------------------------------------------------------------- shared by several methods

TEMPERATURE = Option("temperature", float, 1.0, "divide the logits by this before softmax", check=check_temperature,
                     ignorable=True, control=Control(0.1, 2.0, 0.05, label="temperature"))

# ---------------------------------------------------------------------------------- taken by every method

NUM_CAPTIONS = Option("num_captions", int, 1, "captions per image, best first (beam: <= --beam-size; sample: "
                      f"independent draws), at most {MAX_NUM_CAPTIONS}; text output numbers them", minimum=1,
                      maximum=MAX_NUM_CAPTIONS, check=check_num_captions,
                      control=Control(1, 5, 1, label="captions per image"))
MAX_LENGTH = Option("max_length", int, 67, "most generated tokens per caption (the stop token included)", minimum=1,
                    control=Control(5, 67, 1, label="max tokens"))
SEED = Option("seed", int, None, "random seed of the draws (--method sample), in [0, 2**32)", check=check_seed,
              default_text="a new random seed per run")
RERANK = Option("rerank", str, None, "re-rank every candidate of a method that gives several per image (beam: "
                "all --beam-size beams; sample: the --num-captions draws) by CLIPScore with the model's CLIP text "
                "encoder, and keep the best --num-captions", choices=("clip",), default_text="the decoder's order",
                control=Control(label="choose by CLIPScore (every candidate re-ranked with CLIP's text encoder)"))
RERANK_WEIGHT = Option("rerank_weight", float, 0.0, "with --rerank clip, rank by clip_score + A * the language "
                       "model's score (average log-probability per token)", default_text="0, CLIPScore alone")

#: The options every method takes, in the order the command line and the web demo show them (after the
#: methods' own options). The sampler is given ``num_captions`` (it refuses what it cannot give); the
#: decoder the others.
DECODER_OPTIONS = (NUM_CAPTIONS, MAX_LENGTH, SEED, RERANK, RERANK_WEIGHT)
#: The options that mean something only for a method giving several candidates per image (the web demo
#: shows their controls for those methods alone).
SEVERAL_CAPTIONS_OPTIONS = (NUM_CAPTIONS, RERANK, RERANK_WEIGHT)
