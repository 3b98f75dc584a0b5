"""Batched, KV-cached, XLA-compiled decoding of GPT-2 from a prefix of embeddings (ClipCap).

One loop serves every decoding method: the K prefix positions of a batch of B images are prefilled into a
preallocated cache with one `GPT2.call_with_cache` call, then one token per step is fed in a
``tf.while_loop`` that exits early once every sequence is finished. The whole loop is one
``tf.function(jit_compile=True)`` with static shapes, compiled once per (batch size, prefix length,
max_length, sampler) and cached on the `PrefixDecoder` instance.

What differs between methods lives in small sampler classes, which see the logits (N, V) of the N = B * W
rows (W = `Sampler.num_sequences` rows per image) and choose the next tokens:

- `Greedy`: argmax. Equals the official ClipCap ``generate2`` (its top-p 0.8 filter never removes the
  most likely token, so it is greedy).
- `Beam`: the official ClipCap ``generate_beam``: candidates ranked by average log-prob, finished beams
  frozen with their sum and length, competing by their average in one slot.
- `Sample`: temperature / top-k / top-p sampling, seeded; ``num_captions`` > 1 draws several captions per
  image.

Max length counts generated tokens; the stop token is kept in the output and its id comes from the
tokenizer (``stop_token_id=None`` never stops).

Example::

    decoder = PrefixDecoder(gpt2)
    out = decoder(prefix, Beam(beam_size=5), max_length=67, stop_token_id=tokenizer.encode(".")[0])
    out.tokens[0][0]          # best token ids of image 0 (stop token included)
"""

import math
import os
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from utils.batching import pad_batch, power_of_two_at_least  # noqa: E402

NEG_INF = float("-inf")
#: The smallest temperature accepted: logits divided by less could overflow float32 to inf (NaN scores).
MIN_TEMPERATURE = 1e-6
#: Seeds are keyed by 32 bits (`counter_uniform`): larger ones are refused rather than folded onto smaller.
SEED_LIMIT = 2**32


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


def check_beam_size(beam_size):
    beam_size = check_integer("beam_size", beam_size)
    if beam_size == 0:
        raise ValueError("beam_size=0: beam search needs at least one beam; use beam_size >= 1 (beam_size=1 is "
                         "greedy decoding)")
    if beam_size < 0:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    return beam_size


# ------------------------------------------------------------------------------------------------- samplers


def _mix32(x):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x85EBCA6B, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 13))
    x = x * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def counter_uniform(shape, seed, step):
    """Uniform floats in (0, 1) of a 2-D `shape`, a pure function of (seed, step, element index).

    A counter-based hash written with integer ops, so that eager and XLA-compiled decoding draw exactly the
    same numbers (TensorFlow's stateless RNG kernels and XLA's do not agree bit for bit).
    """
    xor = tf.bitwise.bitwise_xor
    index = tf.cast(tf.reshape(tf.range(shape[0] * shape[1]), shape), tf.uint32)
    key = _mix32(xor(_mix32(tf.cast(seed, tf.uint32)), tf.cast(step, tf.uint32)))
    bits = _mix32(_mix32(xor(index, key)) + key)
    # top 24 bits -> (0, 1), never exactly 0 or 1
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * (1.0 / (1 << 24))


class Sampler:
    """Chooses next tokens from logits, inside the compiled loop.

    The loop calls ``first`` once on the prefill logits (B, V) (one row per image) and ``next`` on the
    logits (N, V) of every later step, N = B * `num_sequences`. Both get and return a ``state`` dict of
    tensors with at least ``finished`` (N,) bool, ``lengths`` (N,) float32 (generated tokens counted),
    ``scores`` (N,) float32 (sum of log-probs); ``next`` may return ``parents`` (N,) int32, the rows each
    new row continues (beam search), or None when rows never swap.
    """

    num_sequences = 1

    def key(self):
        """Hashable description of everything that changes the compiled graph."""
        return (type(self).__name__,) + tuple(sorted(vars(self).items()))

    def initial_state(self, valid):
        """``valid`` (N,) bool: False for padding rows, which start finished."""
        n = tf.shape(valid)[0]
        return {"finished": tf.logical_not(valid), "lengths": tf.zeros((n,), tf.float32),
                "scores": tf.zeros((n,), tf.float32)}

    def first(self, logits, state, stop_id, seed):
        raise NotImplementedError

    def next(self, logits, state, stop_id, seed, step):
        raise NotImplementedError


class _IndependentRows(Sampler):
    """Rows decode independently: a finished row emits padding (0) and keeps its score and length."""

    temperature = 1.0

    def choose(self, logits, seed, step):
        """(N, V) temperature-scaled logits -> (N,) int32 token ids."""
        raise NotImplementedError

    def first(self, logits, state, stop_id, seed):
        logits = tf.repeat(logits, self.num_sequences, axis=0) if self.num_sequences > 1 else logits
        tokens, state, _ = self.next(logits, state, stop_id, seed, tf.constant(0, tf.int32))
        return tokens, state

    def next(self, logits, state, stop_id, seed, step):
        logits = logits / self.temperature if self.temperature != 1.0 else logits  # (N, V)
        tokens = self.choose(logits, seed, step)  # (N,)
        token_logp = tf.gather(tf.nn.log_softmax(logits, axis=-1), tokens, batch_dims=1)  # (N,)
        active = tf.logical_not(state["finished"])
        tokens = tf.where(active, tokens, 0)
        state = {
            "finished": tf.logical_or(state["finished"], tf.equal(tokens, stop_id)),
            "lengths": state["lengths"] + tf.cast(active, tf.float32),
            "scores": state["scores"] + tf.where(active, token_logp, 0.0),
        }
        return tokens, state, None


class Greedy(_IndependentRows):
    """The most likely token at every step (ties: lowest id, as ``torch.argmax``).

    Same tokens as the official ClipCap ``generate2``, whose top-p filter always keeps the argmax.
    """

    def choose(self, logits, seed, step):
        return tf.argmax(logits, axis=-1, output_type=tf.int32)


class Sample(_IndependentRows):
    """Random sampling from softmax(logits / temperature), optionally restricted to the top-k tokens and/or
    the smallest set of most likely tokens whose probability reaches top_p (the first token is always
    kept). ``num_captions`` rows per image draw independently; the draws are a pure function of the seed,
    the step and the row's position in the (padded) batch, so a given seed and batch layout always give the
    same captions, compiled or eager.

    Example: ``Sample(temperature=0.7, top_p=0.9, num_captions=3)``
    """

    def __init__(self, temperature=1.0, top_k=None, top_p=None, num_captions=1):
        self.temperature = check_temperature(temperature)
        self.top_k = None if top_k is None else check_integer("top_k", top_k, minimum=1)
        if top_p is not None and not 0.0 < check_real("top_p", top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        self.top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
        self.num_sequences = check_integer("num_captions", num_captions, minimum=1)

    def choose(self, logits, seed, step):
        vocab = logits.shape[-1]
        if self.top_k is not None and self.top_k < vocab:
            kth = tf.math.top_k(logits, self.top_k).values[:, -1:]  # (N, 1)
            logits = tf.where(logits < kth, NEG_INF, logits)
        if self.top_p is not None:
            sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")  # (N, V)
            cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
            # keep token i (sorted) while the mass before it is <= top_p: always at least the first
            keep = 1 + tf.reduce_sum(tf.cast(cumulative[:, :-1] <= self.top_p, tf.int32), axis=-1)  # (N,)
            threshold = tf.gather(sorted_logits, keep - 1, batch_dims=1)[:, None]  # (N, 1)
            logits = tf.where(logits < threshold, NEG_INF, logits)
        uniform = counter_uniform(tf.shape(logits), seed, step)  # (N, V) in (0, 1)
        gumbel = -tf.math.log(-tf.math.log(uniform))  # Gumbel-max: argmax(logits + g) ~ softmax(logits)
        return tf.argmax(logits + gumbel, axis=-1, output_type=tf.int32)


class Beam(Sampler):
    """The official ClipCap beam search (``generate_beam``), batched over images.

    Per step: log-probs = log softmax(logits / temperature). Step 0 takes the top `beam_size` tokens of
    each image's single prefix. Later, candidates over beams x vocabulary are ranked by (running sum of
    log-probs) / (generated tokens); a beam that emitted the stop token is frozen: it keeps its sum and
    length and competes with its average in one slot. Stops when all beams are frozen or at max length;
    final order by average log-prob.
    """

    def __init__(self, beam_size=5, temperature=1.0):
        self.num_sequences = check_beam_size(beam_size)
        self.temperature = check_temperature(temperature)

    def _log_probs(self, logits):
        logits = logits / self.temperature if self.temperature != 1.0 else logits
        return tf.nn.log_softmax(logits, axis=-1)

    def first(self, logits, state, stop_id, seed):
        w = self.num_sequences
        scores, tokens = tf.math.top_k(self._log_probs(logits), w)  # (B, W) each
        tokens = tf.reshape(tokens, (-1,))  # (N,)
        state = {
            "finished": tf.logical_or(state["finished"], tf.equal(tokens, stop_id)),
            "lengths": tf.ones_like(state["lengths"]),
            "scores": tf.reshape(scores, (-1,)),
        }
        return tokens, state

    def next(self, logits, state, stop_id, seed, step):
        w = self.num_sequences
        logp = self._log_probs(logits)  # (N, V)
        n, vocab = tf.shape(logp)[0], logp.shape[-1]
        stopped = state["finished"]
        frozen_row = tf.where(tf.range(vocab) == 0, 0.0, NEG_INF)[None]  # (1, V): only token 0, log-prob 0
        lengths = state["lengths"] + tf.cast(tf.logical_not(stopped), tf.float32)  # (N,)
        # Exact two-stage top-k: the best W of a row are the only candidates it can contribute.
        row_scores = tf.where(stopped[:, None], frozen_row, logp)
        row_top, row_tokens = tf.math.top_k(row_scores, w)  # (N, W)
        average = (state["scores"][:, None] + row_top) / lengths[:, None]  # (N, W)
        b = n // w
        average = tf.reshape(average, (b, w * w))  # (B, W*W), ordered (beam, rank)
        best, flat = tf.math.top_k(average, w)  # (B, W)
        parents = tf.reshape(tf.range(b)[:, None] * w + flat // w, (-1,))  # (N,) source row of each new row
        tokens = tf.gather(tf.reshape(row_tokens, (-1,)), parents * w + tf.reshape(flat % w, (-1,)))  # (N,)
        lengths = tf.gather(lengths, parents)
        # As the official code, sums are recomputed as average * length; an image whose beams are all frozen
        # would have left the official loop already: its sums stay exactly as they were.
        image_done = tf.repeat(tf.reduce_all(tf.reshape(stopped, (b, w)), axis=1), w)  # (N,)
        scores = tf.where(image_done, tf.gather(state["scores"], parents), tf.reshape(best, (-1,)) * lengths)
        state = {
            "finished": tf.logical_or(tf.gather(stopped, parents), tf.equal(tokens, stop_id)),
            "lengths": lengths,
            "scores": scores,
        }
        return tokens, state, parents


# --------------------------------------------------------------------------------------------------- decoder


@dataclass
class DecodeOutput:
    """Per image, W candidates best first: token lists (stop token kept), average log-probs, sums."""

    tokens: list  # [B][W] list[int]
    scores: np.ndarray  # (B, W) average log-prob per generated token (the beam ranking)
    steps: int  # decoding steps run (< max_length when every sequence finished early)


class PrefixDecoder:
    """Decodes GPT-2 continuations of prefixes (B, K, C) with one compiled loop per shape and sampler.

    Compiled functions are cached on this instance, keyed by (batch size, K, max_length, sampler key), so a
    second call with the same shapes reuses the compiled loop. Batches are padded up to a power of two
    (at most `max_batch_size`) to bound the number of compilations; larger inputs are split in chunks.

    Example::

        decoder = PrefixDecoder(gpt2)
        out = decoder(prefix, Greedy(), max_length=20, stop_token_id=13)
    """

    def __init__(self, gpt2, max_batch_size=32):
        self.gpt2 = gpt2
        self.max_batch_size = int(max_batch_size)
        self._compiled = {}

    def __call__(self, prefix, sampler, max_length=67, stop_token_id=None, seed=0, jit_compile=True):
        prefix = np.asarray(prefix, np.float32)
        if prefix.ndim != 3 or prefix.shape[-1] != self.gpt2.n_embd:
            raise ValueError(f"prefix must be (B, K, {self.gpt2.n_embd}), got {prefix.shape}")
        max_length = check_integer("max_length", max_length, minimum=1)
        seed = check_seed(seed)
        if not np.all(np.isfinite(prefix)):
            rows = np.flatnonzero(~np.all(np.isfinite(prefix), axis=(1, 2))).tolist()
            raise ValueError(f"the prefix holds NaN or infinite values in rows {rows} (of {len(prefix)}): their "
                             "captions would be nonsense")
        k = prefix.shape[1]
        if k + max_length - 1 > self.gpt2.n_positions:
            raise ValueError(f"prefix length {k} + max_length {max_length} - 1 exceeds GPT-2's "
                             f"n_positions={self.gpt2.n_positions}")
        stop = -1 if stop_token_id is None else check_integer("stop_token_id", stop_token_id, minimum=0)
        seed_bits = np.array(seed, np.uint32).view(np.int32)  # the same 32 bits, as the int32 the loop takes
        tokens, scores, steps = [], [], 0
        for start in range(0, len(prefix), self.max_batch_size):
            chunk = prefix[start : start + self.max_batch_size]
            size = min(power_of_two_at_least(len(chunk)), self.max_batch_size) if jit_compile else len(chunk)
            valid = np.arange(size) < len(chunk)
            padded = pad_batch(chunk, size)
            fn = self._function(size, k, max_length, sampler, jit_compile)
            out_tokens, lengths, sums, n_steps = (
                t.numpy() for t in fn(tf.constant(padded), tf.constant(valid), tf.constant(stop, tf.int32),
                                      tf.constant(seed_bits, tf.int32))
            )
            w = sampler.num_sequences
            out_tokens = out_tokens.reshape(size, w, max_length)[: len(chunk)]
            lengths = lengths.reshape(size, w)[: len(chunk)].astype(np.int64)
            average = sums.reshape(size, w)[: len(chunk)] / np.maximum(lengths, 1)
            order = np.argsort(-average, axis=1, kind="stable")
            for i in range(len(chunk)):
                tokens.append([out_tokens[i, j, : lengths[i, j]].tolist() for j in order[i]])
                scores.append(average[i, order[i]])
            steps = max(steps, int(n_steps))
        return DecodeOutput(tokens=tokens, scores=np.asarray(scores, np.float32).reshape(len(prefix), -1),
                            steps=steps)

    def _function(self, batch_size, prefix_length, max_length, sampler, jit_compile):
        if not jit_compile:
            return lambda *args: self._loop(*args, sampler=sampler, max_length=max_length)
        key = (batch_size, prefix_length, max_length, sampler.key())
        if key not in self._compiled:
            self._compiled[key] = tf.function(_Loop(self, sampler, max_length), jit_compile=True)
        return self._compiled[key]

    def _loop(self, prefix, valid, stop_id, seed, sampler, max_length):
        """prefix (B, K, C), valid (B,) -> tokens (N, T), lengths (N,), sums (N,), steps run."""
        gpt2 = self.gpt2
        w = sampler.num_sequences
        batch, k = prefix.shape[0], prefix.shape[1]
        n = batch * w
        cache = gpt2.init_cache(batch, k + max_length - 1)
        logits, cache = gpt2.call_with_cache(prefix, cache, 0)  # (B, V): prefill, head on the last only
        if w > 1:  # every row of an image starts from the same prefix cache
            cache = gpt2.reorder_cache(cache, tf.repeat(tf.range(batch), w))
        state = sampler.initial_state(tf.repeat(valid, w) if w > 1 else valid)
        tokens, state = sampler.first(logits, state, stop_id, seed)  # (N,)
        state["finished"] = tf.logical_or(state["finished"], tf.logical_not(tf.repeat(valid, w)))
        columns = tf.range(max_length)[None]  # (1, T)
        history = tf.where(columns == 0, tokens[:, None], tf.zeros((n, max_length), tf.int32))  # (N, T)

        def cond(step, tokens, history, cache, state):
            return tf.logical_and(step < max_length, tf.logical_not(tf.reduce_all(state["finished"])))

        def body(step, tokens, history, cache, state):
            embedded = gpt2.embed_tokens(tokens[:, None])  # (N, 1, C)
            logits, cache = gpt2.call_with_cache(embedded, cache, k + step - 1)  # (N, V)
            tokens, state, parents = sampler.next(logits, state, stop_id, seed, step)
            if parents is not None:
                cache = gpt2.reorder_cache(cache, parents)
                history = tf.gather(history, parents)
            history = tf.where(columns == step, tokens[:, None], history)
            return step + 1, tokens, history, cache, state

        step, _, history, _, state = tf.while_loop(
            cond, body, (tf.constant(1, tf.int32), tokens, history, cache, state),
            maximum_iterations=max_length - 1)
        return history, state["lengths"], state["scores"], step


class _Loop:
    """`PrefixDecoder._loop` bound to a sampler and a max length: one object per compiled function (a
    callable without ``__code__``, so TensorFlow does not count the traces of different shapes as retracing
    of one function)."""

    def __init__(self, decoder, sampler, max_length):
        self.decoder, self.sampler, self.max_length = decoder, sampler, max_length

    def __call__(self, prefix, valid, stop_id, seed):
        return self.decoder._loop(prefix, valid, stop_id, seed, sampler=self.sampler, max_length=self.max_length)
