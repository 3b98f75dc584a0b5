"""Batched, KV-cached, XLA-compiled decoding of GPT-2 from a prefix of embeddings (ClipCap).

One loop serves every decoding method: the K prefix positions of a batch of B images are prefilled into a
preallocated cache with one `GPT2.prefill` call (stored once per image, shared by its beams), then one
token per step is fed in a ``tf.while_loop`` that exits early once every sequence is finished. The whole
loop is one ``tf.function(jit_compile=True)`` with static shapes, compiled once per (batch size, prefix
length, max_length, sampler) and cached on the `PrefixDecoder` instance.

What differs between methods lives in the samplers of `custom_architectures.samplers` (`Greedy`, `Beam`,
`Sample`, registered by name in `SAMPLERS`, built by `get_sampler`); they are importable from here too.

Max length counts generated tokens; the stop token is kept in the output and its id comes from the
tokenizer (``stop_token_id=None`` never stops).

Example::

    decoder = PrefixDecoder(gpt2)
    out = decoder(prefix, Beam(beam_size=5), max_length=67, stop_token_id=tokenizer.encode(".")[0])
    out.tokens[0][0]          # best token ids of image 0 (stop token included)
"""

import contextlib
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from custom_architectures.batching import pad_batch, power_of_two_at_least
from custom_architectures.compile_policy import CompilePolicy
from custom_architectures.samplers import (
    SAMPLERS,
    Beam,
    Greedy,
    Sample,
    Sampler,
    check_integer,
    check_seed,
    draw_key,
    get_sampler,
)
from custom_layers import packed_weights

# the decoder and the samplers it runs: the decoding API in one import
__all__ = ["SAMPLERS", "Beam", "DecodeOutput", "Greedy", "PrefixDecoder", "Sample", "Sampler", "get_sampler"]

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
    ``jit_compile``: True (XLA), False (never: the loop runs eagerly over one traced block function,
    `GPT2.block_step_function`, no compilation and no padding) or "auto" (`CompilePolicy.tier`: uncompiled
    until the key recurs and its loop, compiled in a background thread meanwhile, is ready; no call waits
    for the compiler).

    Example::

        decoder = PrefixDecoder(gpt2)
        out = decoder(prefix, Greedy(), max_length=20, stop_token_id=13)
    """

    def __init__(self, gpt2, max_batch_size=32, xla=True):
        self.gpt2 = gpt2
        self.xla = bool(xla)  # the compiled form: XLA, or False: a plain graph (a bfloat16 model's, on CPU)
        self.max_batch_size = int(max_batch_size)
        self._compiled = {}
        self._block_fns = {}  # the traced block of both forms, by (``inplace``, ``columns``) (`block_function`)
        self._auto = CompilePolicy("auto")  # which keys recur, for jit_compile="auto"

    def __call__(self, prefix, sampler, max_length=67, stop_token_id=None, seed=0, jit_compile=True,
                 image_ids=None):
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
        # what each image's random draws are keyed by (`samplers.draw_key`): its index in the caller's input
        ids = np.arange(len(prefix)) if image_ids is None else np.asarray(image_ids)
        limit = 2**31  # the loop takes them as int32
        if ids.shape != (len(prefix),) or ids.dtype.kind not in "iu" or (len(ids) and not 0 <= ids.min() <= ids.max() < limit):
            raise ValueError(f"image_ids must be {len(prefix)} integers in [0, {limit}), got {image_ids!r}"[:300])
        tokens, scores, steps = [], [], 0
        for start in range(0, len(prefix), self.max_batch_size):
            chunk = prefix[start : start + self.max_batch_size]
            key = self._key(len(chunk), k, max_length, sampler)
            with self._mode(key, sampler, jit_compile) as compiled:
                size = key[0] if compiled else len(chunk)
                valid = np.arange(size) < len(chunk)
                padded = pad_batch(chunk, size)
                rows = pad_batch(ids[start : start + len(chunk)].astype(np.int32), size)  # padding: never drawn
                fn = self._function(key, sampler, compiled)
                out_tokens, lengths, sums, n_steps = (
                    t.numpy() for t in fn(tf.constant(padded), tf.constant(valid), tf.constant(stop, tf.int32),
                                          tf.constant(seed_bits, tf.int32), tf.constant(rows))
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

    def _key(self, batch_size, prefix_length, max_length, sampler):
        """The compiled loop's key: (padded batch, K, max_length, sampler key)."""
        return (min(power_of_two_at_least(batch_size), self.max_batch_size), prefix_length, max_length,
                sampler.key())

    def _mode(self, key, sampler, jit_compile):
        """A context yielding whether this call of ``key`` runs compiled: ``jit_compile`` when a bool, else the
        tiered "auto" (`CompilePolicy.tier`: uncompiled until the loop, built in the background once the key has
        recurred, from idle time or its 4th call on, is ready)."""
        if isinstance(jit_compile, bool):
            return contextlib.nullcontext(jit_compile)
        device = tf.zeros(()).device  # the caller's device scope (thread-local), for the build's thread
        return self._auto.tier(key, lambda: self._build(key, sampler, device))

    def _build(self, key, sampler, device):
        """Compile the loop of ``key`` on ``device`` (a background build): one call on a batch of padding rows,
        every row finished from the start, so that only the prefill runs besides XLA's compilation."""
        size, k = key[0], key[1]
        fn = self._function(key, sampler, True)
        with tf.device(device):
            fn(tf.zeros((size, k, self.gpt2.n_embd)), tf.zeros((size,), tf.bool), tf.constant(-1, tf.int32),
               tf.constant(0, tf.int32), tf.zeros((size,), tf.int32))

    def ready(self, batch_size, prefix_length, max_length, sampler):
        """Whether "auto"'s compiled loop for this shape is built (a background build has finished)."""
        return self._auto.ready(self._key(batch_size, prefix_length, max_length, sampler))

    def wait_for_builds(self, timeout=None):
        """Wait for the loops being compiled in the background (`CompilePolicy.wait`); True when all are done."""
        return self._auto.wait(timeout)

    def will_compile(self, batch_size, prefix_length, max_length, sampler, jit_compile=True):
        """Whether a call on ``batch_size`` rows would compile a new loop in the foreground (for status lines
        said before it): under "auto" never, since a recurring shape is compiled in the background."""
        key = self._key(batch_size, prefix_length, max_length, sampler)
        if key in self._compiled:
            return False
        return jit_compile if isinstance(jit_compile, bool) else False

    def _function(self, key, sampler, compiled):
        max_length = key[2]
        if not compiled:
            return lambda *args: self.decode_loop(*args, sampler=sampler, max_length=max_length,
                                                  block_fn=self.block_function(inplace=True), inplace=True)
        if key not in self._compiled:  # setdefault: a background build may create it at the same time
            # autograph off: the loop is written with tf.while_loop / tf.cond, and converting it took a second
            self._compiled.setdefault(key, tf.function(_Loop(self, sampler, max_length), jit_compile=self.xla,
                                                       autograph=False))
        return self._compiled[key]

    def packs_weights(self):
        """Whether the compiled plain-graph loop (``xla=False``: a bfloat16 model's) keeps its steps' weights
        packed in oneDNN's layout (`custom_layers.packed_weights`): where oneDNN runs on the model's dtype
        (`packed_weights.available`: not bfloat16 on an AVX2-only CPU) and the model's weights are frozen (a
        bfloat16 twin's: `models.precision`). GPT-2 124M in bfloat16, ViT-B/32's K = 10, 16 images, 20 tokens:
        greedy 0.81 -> 0.61 s, beam 5 1.87 -> 1.50 s (Xeon with AMX).
        Each compiled shape then holds its own packed copy (~250 MB for GPT-2 124M in bfloat16)."""
        return packed_weights.available(self.gpt2.compute_dtype) and packed_weights.weights_frozen(self.gpt2)

    def block_function(self, inplace=False, columns=False):
        """The block both forms run (`GPT2.block_step_function`, made once per decoder and form): called
        eagerly by the uncompiled loop, one graph call per block; traced into the compiled loop as a call of
        that one function per block, which XLA inlines. Tracing a loop that inlined the 2 x 12 blocks in Python
        took 1.6-1.9 s of the GIL (3.4 s for a process's first), and an uncompiled call running beside that
        background trace waits for the GIL at each of its Python steps; with one traced block the trace takes
        ~0.5 s. ``inplace``: the form that writes the cache in place (the uncompiled and plain-graph loops').
        ``columns``: the XLA loop's step at a few rows (`GPT2.call_with_cache`'s ``columns``)."""
        key = (inplace, columns)
        if key not in self._block_fns:  # setdefault: two threads may make it at once; one is kept
            self._block_fns.setdefault(key, self.gpt2.block_step_function(inplace=inplace, columns=columns))
        return self._block_fns[key]

    def decode_loop(self, prefix, valid, stop_id, seed, rows=None, *, sampler, max_length, block_fn=None,
                    inplace=False, columns=False, column_block_fn=None, packed=False):
        """The decoding loop itself, traceable (one ``tf.while_loop`` over a static KV cache): prefix (B, K, C),
        valid (B,) -> tokens (N, T), lengths (N,), sums (N,), steps run. ``rows`` (B,) int32: each image's id
        for the random draws (`samplers.draw_key`; None: its position). `__call__` compiles it per shape, or
        runs it eagerly with ``block_fn`` (`GPT2.block_step_function`); the serving SavedModel
        (`models.image_captioning.serving`) traces it into its own graph.
        ``inplace`` (not under XLA): the loop's cache is made fresh and written in place (`GPT2.prefill`); a
        plain graph or eager loop otherwise copies the whole cache at every write (XLA writes in place
        anyway). ``block_fn`` must then be ``block_function(inplace=True)``. ``columns`` (XLA, see
        `column_rows`): the steps run the blocks in column form, with ``column_block_fn``
        (``block_function(columns=True)``) or inlined (None). ``packed`` (a plain graph of a frozen model, see
        `packs_weights`): the steps inline their blocks, whose matmuls and head keep the weights packed
        (`GPT2.call_with_cache`'s ``packed``); the prefill still runs ``block_fn``."""
        gpt2 = self.gpt2
        w = sampler.num_sequences
        batch, k = prefix.shape[0], prefix.shape[1]
        n = batch * w
        # (B, V): the prefill's last head; the W rows of an image share its prefix keys/values in the cache (one
        # row: they are its first slots); skipped when every row is padding (a background build compiles the loop
        # without computing)
        logits, cache = gpt2.prefill(prefix, k + max_length - 1, rows=w, block_fn=block_fn, run=tf.reduce_any(valid),
                                     inplace=inplace, merged=w == 1)  # one row: one attention segment
        state = sampler.initial_state(tf.repeat(valid, w) if w > 1 else valid)
        seed = draw_key(seed, tf.range(batch) if rows is None else rows, w)
        tokens, state = sampler.first(logits, state, stop_id, seed)  # (N,)
        state["finished"] = tf.logical_or(state["finished"], tf.logical_not(tf.repeat(valid, w)))
        positions = tf.range(max_length)[None]  # (1, T)
        history = tf.where(positions == 0, tokens[:, None], tf.zeros((n, max_length), tf.int32))  # (N, T)

        def cond(step, tokens, history, cache, state):
            return tf.logical_and(step < max_length, tf.logical_not(tf.reduce_all(state["finished"])))

        def body(step, tokens, history, cache, state):
            embedded = gpt2.embed_tokens(tokens[:, None])  # (N, 1, C)
            if columns:
                logits, cache = gpt2.call_with_cache(embedded, cache, k + step - 1, block_fn=column_block_fn,
                                                     columns=True)  # (N, V)
            else:
                logits, cache = gpt2.call_with_cache(embedded, cache, k + step - 1,
                                                     block_fn=None if packed else block_fn, inplace=inplace,
                                                     packed=packed)
            tokens, state, parents = sampler.next(logits, state, stop_id, seed, step)
            if parents is not None:  # rows of the same image: only which slots each row reads moves
                cache = gpt2.reorder_cache(cache, parents)
                history = tf.gather(history, parents)
            history = tf.where(positions == step, tokens[:, None], history)
            return step + 1, tokens, history, cache, state

        if max_length == 1:  # the prefill's token is all: no loop (its body would write a cache of no slots)
            return history, state["lengths"], state["scores"], tf.constant(1, tf.int32)
        step, _, history, _, state = tf.while_loop(
            cond, body, (tf.constant(1, tf.int32), tokens, history, cache, state),
            maximum_iterations=max_length - 1)
        return history, state["lengths"], state["scores"], step


class _Loop:
    """`PrefixDecoder.decode_loop` bound to a sampler and a max length: one object per compiled function (a
    callable without ``__code__``, so TensorFlow does not count the traces of different shapes as retracing
    of one function)."""

    def __init__(self, decoder, sampler, max_length):
        self.decoder, self.sampler, self.max_length = decoder, sampler, max_length

    def __call__(self, prefix, valid, stop_id, seed, rows):
        decoder = self.decoder
        inplace = not decoder.xla  # a plain graph's loop (a bfloat16 model's) writes its cache in place
        columns = decoder.xla and column_rows(prefix.shape[0] * self.sampler.num_sequences, decoder.gpt2)
        return decoder.decode_loop(prefix, valid, stop_id, seed, rows, sampler=self.sampler, max_length=self.max_length,
                                   block_fn=decoder.block_function(inplace), inplace=inplace, columns=columns,
                                   column_block_fn=decoder.block_function(columns=True) if columns else None,
                                   packed=not decoder.xla and decoder.packs_weights())


#: the most rows at which the XLA loop's steps run in column form (`GPT2.call_with_cache`'s ``columns``)
COLUMN_ROWS = 32


def column_rows(rows, gpt2):
    """Whether an XLA decoding loop of ``rows`` rows runs its steps in column form: from 2 to `COLUMN_ROWS`
    rows, float kernels. GPT-2 124M's 48 block matmuls of a step, chained, under XLA (2 cores): 28.4 / 21.7
    ms at 8 rows, 32.9 / 27.8 at 16, 36.3 / 31.2 at 32 (row form / column form); the same at 1 row, and
    57.4 / 81.5 ms at 80 rows (`custom_layers.gpt2_block.cached_column_step`)."""
    return 2 <= rows <= COLUMN_ROWS and gpt2.quantization is None
