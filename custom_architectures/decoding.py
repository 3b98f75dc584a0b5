"""A decoding request checked once: the method, its sampler and every option, as one `Decoding`.

``decoding(method, **options)`` validates a whole request (``generate``'s keyword arguments) against the
registry (`custom_architectures.samplers`) and the declarations (`custom_architectures.decoding_options`):
the method's own options by its sampler's constructor, the options of other methods (checked and ignored,
or refused), and those every method takes (``num_captions``, ``max_length``, ``seed``, ``rerank``,
``rerank_weight``). What it returns is carried from the entry (the command line, ``predict``, Beam's
handler, the serving export) to ``ClipCap.generate``, which checks nothing again: a run checks its decoding
arguments once. Only what needs the model (the stop token's id, CLIP's text tower) is the model's to check.

Light on purpose (no TensorFlow): the command line checks a request before it loads anything.

Example::

    request = decoding("beam", beam_size=5, num_captions=3)
    request.sampler, request.max_length, request.given     # Beam(5), 67, {'beam_size': 5, 'num_captions': 3}
    model.generate(embeddings, request)                    # = model.generate(embeddings, method="beam", ...)
"""

from dataclasses import dataclass

from custom_architectures.decoding_options import DECODER_OPTIONS, MODEL_STOP_TOKEN, NUM_CAPTIONS, RERANK
from custom_architectures.samplers import Sampler, _or, get_sampler, methods_options, several_caption_methods


@dataclass(frozen=True)
class Decoding:
    """A checked decoding request (`decoding` makes it).

    Attributes:
        method: the method's name (`samplers.SAMPLERS`).
        sampler: its `Sampler`, built from the method's options.
        values: every option of the method and of the decoder, given or default, checked (what runs: what
            ``evaluate`` records).
        given: the options given (checked; ``stop_token`` too when given): what keys stored results
            (map.json, Beam records), as the request was made.
        stop_token: `MODEL_STOP_TOKEN` (the model's own), a token string, or None (never stop early); the
            model resolves it to an id.
    """

    method: str
    sampler: Sampler
    values: dict
    given: dict
    stop_token: object = MODEL_STOP_TOKEN

    @property
    def max_length(self) -> int:
        return self.values["max_length"]

    @property
    def num_captions(self) -> int:
        return self.values["num_captions"]

    @property
    def seed(self):
        return self.values["seed"]

    @property
    def rerank(self):
        return self.values["rerank"]

    @property
    def rerank_weight(self) -> float:
        return self.values["rerank_weight"]

    def own_values(self) -> dict:
        """``{option: value}`` of the method's own options (what the serving export and evaluate record)."""
        return {option.name: self.values[option.name] for option in type(self.sampler).options}


def request_options(methods=None):
    """Every option a request for ``methods`` (names; None: every registered method) may hold, in the order
    the command line lists them: the methods' own (`samplers.methods_options`), then those every method takes
    (`decoding_options.DECODER_OPTIONS`)."""
    return [*methods_options(methods).values(), *DECODER_OPTIONS]


def decoding(method="greedy", stop_token=MODEL_STOP_TOKEN, **options):
    """The checked `Decoding` of ``method`` with ``options`` (``ClipCap.generate``'s keyword arguments; None
    means not given). Raises ValueError for a bad value or an option the method refuses, TypeError for an
    option no method knows, each naming the option."""
    decoder = {option.name: option for option in DECODER_OPTIONS}
    every = {**methods_options(), **decoder}
    unknown = sorted(set(options) - set(every))
    if unknown:
        raise TypeError(f"unknown decoding option(s) {unknown}: the methods take {sorted(every)}")
    # the method's options (num_captions too: it refuses what it cannot give) are checked by its constructor
    sampler = get_sampler(method, **{key: value for key, value in options.items()
                                     if key not in decoder or key == NUM_CAPTIONS.name})
    given = {key: every[key].validate(value) for key, value in options.items() if value is not None}
    values = {option.name: given.get(option.name, option.default)
              for option in (*type(sampler).options, *DECODER_OPTIONS)}
    if values["rerank"] is not None and sampler.single_caption:
        raise ValueError(f"rerank={values['rerank']!r} re-ranks several candidates per image: use method "
                         f"{_or(several_caption_methods())} (got {method!r}, which gives one)")
    if values["rerank"] is None and values["rerank_weight"] != 0.0:
        raise ValueError(f"rerank_weight is used only with rerank={RERANK.choices[0]!r}")
    if not (stop_token is MODEL_STOP_TOKEN or stop_token is None or isinstance(stop_token, str)):
        raise ValueError(f"stop_token must be a token (a string) or None, got {stop_token!r}")
    if stop_token is not MODEL_STOP_TOKEN:
        given["stop_token"] = stop_token
    return Decoding(method, sampler, values, given, stop_token)


def as_decoding(method, options):
    """``method`` when it is a `Decoding` already (then ``options`` must be empty: they are in it), else
    `decoding` (``method``, ``**options``)."""
    if isinstance(method, Decoding):
        if options:
            raise TypeError(f"options {sorted(options)} given beside a Decoding: they belong in it")
        return method
    return decoding(method, **options)

