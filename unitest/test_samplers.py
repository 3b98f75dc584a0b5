"""The decoding-method registry (`custom_architectures.samplers`): names, construction, validation, and the
command line reading its names instead of listing them. No model needed: fast."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from custom_architectures.samplers import (
    SAMPLERS,
    Beam,
    Greedy,
    Magic,
    Sample,
    deterministic_methods,
    get_sampler,
    sampler_class,
    sampler_options,
)
from utils.cli import add_decoding_arguments

ROOT = Path(__file__).resolve().parents[1]
GENERATE_DEFAULTS = dict(beam_size=5, temperature=1.0, top_k=None, top_p=None, num_captions=1)


def test_registry_names_and_classes():
    assert SAMPLERS == {"greedy": Greedy, "beam": Beam, "sample": Sample, "magic": Magic}
    assert deterministic_methods() == ("greedy", "beam", "magic")
    assert sampler_options("beam") == {"beam_size": 5, "temperature": 1.0, "num_captions": 1}
    assert sampler_options("greedy") == {"num_captions": 1}
    with pytest.raises(ValueError, match=r"method must be one of \('greedy', 'beam', 'sample', 'magic'\), got 'nucleus'"):
        sampler_class("nucleus")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generate_defaults_build_every_method(name):
    sampler = get_sampler(name, **GENERATE_DEFAULTS)  # generate passes every option to every method
    assert type(sampler) is SAMPLERS[name]


def test_options_reach_the_constructor_or_are_checked_and_ignored():
    beam = get_sampler("beam", **dict(GENERATE_DEFAULTS, beam_size=3, temperature=0.5, num_captions=2))
    assert (beam.num_sequences, beam.temperature) == (3, 0.5)
    sample = get_sampler("sample", **dict(GENERATE_DEFAULTS, top_k=4, top_p=0.9, num_captions=2, beam_size=2))
    assert (sample.top_k, sample.top_p, sample.num_sequences) == (4, 0.9, 2)
    with pytest.raises(ValueError, match="beam_size=0"):  # an ignored option is checked by its declaration
        get_sampler("sample", beam_size=0)
    assert get_sampler("greedy", beam_size=9, temperature=3.0).key() == Greedy().key()
    with pytest.raises(ValueError, match="beam_size must be an integer"):
        get_sampler("greedy", beam_size="5")
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        get_sampler("sample", beam_size=2, temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature must be >="):
        get_sampler("greedy", temperature=0.0)


def test_each_sampler_refuses_its_own_bad_arguments():
    with pytest.raises(ValueError, match="one caption per image: use method='beam' or 'sample'"):
        Greedy(num_captions=2)
    with pytest.raises(ValueError, match="num_captions=4 exceeds beam_size=3"):
        Beam(beam_size=3, num_captions=4)
    with pytest.raises(ValueError, match="beam_size=0: beam search needs at least one beam"):
        Beam(beam_size=0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        Sample(top_k=0)


def test_options_of_other_methods_are_refused_or_unknown():
    for name in ("greedy", "beam"):
        with pytest.raises(ValueError, match=rf"^top_k / top_p apply to method='sample', not '{name}'$"):
            get_sampler(name, top_p=0.9)
    with pytest.raises(TypeError, match=r"unknown decoding option\(s\) \['bem_size'\]"):
        get_sampler("beam", bem_size=3)


def test_the_command_line_lists_the_registry():
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    method = next(a for a in parser._actions if a.dest == "method")
    assert tuple(method.choices) == tuple(SAMPLERS)
    help_text = subprocess.run([sys.executable, "main.py", "evaluate", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    assert "{greedy,beam,magic}" in help_text  # evaluate offers the deterministic methods


def test_the_registry_imports_without_tensorflow():
    code = "import sys, main, custom_architectures.samplers; assert 'tensorflow' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_two_stage_top_k_equals_tf_top_k(jit_compile):
    """Same values and indices as tf.math.top_k, ties included (to the lowest index), on the three paths: a
    vocabulary with a divisor (GPT-2's), one padded to chunks of 256 (a prime), and k too large (one stage)."""
    import numpy as np
    import tensorflow as tf

    from custom_architectures.samplers import _top_k_chunk, two_stage_top_k

    assert _top_k_chunk(50257, 5) == 1733 and _top_k_chunk(8191, 5) == 256 and _top_k_chunk(8191, 17) is None
    rng = np.random.default_rng(0)
    for vocab, ks in ((50257, (1, 5, 16)), (8191, (2, 5, 8, 17))):
        x = rng.normal(0.0, 3.0, (12, vocab)).astype(np.float32)
        x[1] = np.round(x[1])  # many ties
        x[2] = 0.0  # all tied: the lowest indices
        x[3, : vocab // 2] = -np.inf  # -inf in half the row
        x[4, 100:140] = 50.0 + np.arange(40)  # the best values in one chunk
        x[5, -3:] = 99.0  # the best values in the last (padded) chunk
        x[6, ::997] = 42.0  # equal best values spread over chunks
        for k in ks:
            top = tf.function(lambda v, k=k: two_stage_top_k(v, k), jit_compile=jit_compile)
            values, indices = top(tf.constant(x))
            expected = tf.math.top_k(x, k)
            np.testing.assert_array_equal(values.numpy(), expected.values.numpy(), err_msg=f"{vocab=} {k=}")
            np.testing.assert_array_equal(indices.numpy(), expected.indices.numpy(), err_msg=f"{vocab=} {k=}")
