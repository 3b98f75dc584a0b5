"""Which calls of a function happen while a graph is traced: the tests that a compiled form traces a block once."""

import tensorflow as tf


def record_traces(monkeypatch, function, *owners):
    """Replace ``function`` (a module function or a class's method) by a wrapper on every owner (modules or
    classes holding it under its name) that records, per call, whether it ran eagerly; returns that list
    (False entries are calls made while a graph was traced)."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(tf.executing_eagerly())
        return function(*args, **kwargs)

    for owner in owners:
        monkeypatch.setattr(owner, function.__name__, recording)
    return calls
