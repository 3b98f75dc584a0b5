"""Decoding methods of `PrefixDecoder` and their registry: one name per method, one place to add one.

A sampler sees the logits (N, V) of the N = B * W rows (W = `Sampler.num_sequences` rows per image) inside
the compiled decoding loop and chooses the next tokens:

- `Greedy` (``"greedy"``): argmax. Equals the official ClipCap ``generate2`` (its top-p 0.8 filter never
  removes the most likely token, so it is greedy).
- `Beam` (``"beam"``): the official ClipCap ``generate_beam``: candidates ranked by average log-prob,
  finished beams frozen with their sum and length, competing by their average in one slot.
- `Sample` (``"sample"``): temperature / top-k / top-p sampling, seeded; ``num_captions`` > 1 draws several
  captions per image.
- `Magic` (``"magic"``): MAGIC (Su et al. 2022), CLIP-guided: top-k tokens scored by the language model, a
  degeneration penalty and CLIP's image-text similarity. It needs CLIP's text tower and Python between steps
  (GPT-2 text -> CLIP tokens), so it runs in `custom_architectures.guided_decoding`, not in the compiled loop
  (``guided = True``).

`SAMPLERS` maps each method's name to its class (keras-hub's ``samplers/serialization.py`` idea), and each
class declares its own options (``options``: `decoding_options.Option`, name, type, default, bounds, help,
web-demo control); ``generate``, ``predict``, Beam, ``evaluate``, the command line's flags, the web demo's
controls and the serving export read the registry and the declarations, so that adding a method is a class
and a `SAMPLERS` entry (`custom_architectures.decoding.decoding` checks a whole request once).

TensorFlow is imported inside the methods that run in the compiled loop, so that the command line can read
the registry without loading it.

Example::

    sampler = get_sampler("beam", beam_size=5, num_captions=3)     # Beam(beam_size=5)
    sorted(SAMPLERS)                                               # ['beam', 'greedy', 'magic', 'sample']
"""

import hashlib

import numpy as np

from custom_architectures.decoding_options import (  # noqa: F401 (the checks: importable from here too)
    MAX_BEAM_SIZE,
    MIN_TEMPERATURE,
    NUM_CAPTIONS,
    SEED_LIMIT,
    TEMPERATURE,
    Control,
    Option,
    check_integer,
    check_real,
    check_seed,
    check_temperature,
)

NEG_INF = float("-inf")
#: `two_stage_top_k` is used for k up to this (beam widths); larger k take ``tf.math.top_k`` itself
TWO_STAGE_MAX_K = 16


def _top_k_chunk(vocab, k):
    """The chunk length of `two_stage_top_k`'s first stage for rows of ``vocab`` values, or None (one
    stage). A divisor of ``vocab`` needs no padding (GPT-2's 50257 = 29 x 1733); otherwise 256 with the last
    chunk padded. At least 4k chunks, so that the second stage reads a small part of each row."""
    if k > TWO_STAGE_MAX_K:
        return None
    divisors = [c for c in range(64, 4097) if vocab % c == 0 and vocab // c >= 4 * k]
    if divisors:
        return max(divisors)
    return 256 if -(-vocab // 256) >= 4 * k else None


def two_stage_top_k(values, k):
    """``tf.math.top_k(values, k)`` over the last axis of (N, V) ``values``, in two stages: the same values and
    the same indices (ties to the lowest index, as ``tf.math.top_k``), 2-3x faster for a beam's k over GPT-2's
    vocabulary (measured: (80, 50257), k = 5, 2 cores: 7.3 -> 2.2 ms in a graph, 6.4 -> 2.9 ms under XLA).

    Stage 1 takes each chunk's maximum and keeps the k chunks with the largest ones; stage 2 is ``top_k``
    over those chunks' values. Exact: each of the k best values is the best of its chunk or lies behind one,
    so its chunk ranks among the k best (ties: a lower chunk holds the lower index, and the kept chunks are
    read in index order). ``values`` float, V static; a k with no useful split runs ``tf.math.top_k``.

    Example::

        scores, tokens = two_stage_top_k(log_probs, 5)   # (N, 5) each, as tf.math.top_k(log_probs, 5)
    """
    import tensorflow as tf  # here, not at the top: the CLI imports the registry

    vocab = values.shape[-1]
    chunk = None if vocab is None else _top_k_chunk(vocab, k)
    if chunk is None:
        return tf.math.top_k(values, k)
    chunks = -(-vocab // chunk)
    if chunks * chunk != vocab:
        values = tf.pad(values, [[0, 0], [0, chunks * chunk - vocab]], constant_values=NEG_INF)
    blocks = tf.reshape(values, (-1, chunks, chunk))  # (N, M, C)
    _, kept = tf.math.top_k(tf.reduce_max(blocks, axis=-1), k)  # (N, k): the chunks with the k best maxima
    kept = tf.sort(kept, axis=-1)  # index order, so that stage 2 breaks ties as tf.math.top_k does
    best, position = tf.math.top_k(tf.reshape(tf.gather(blocks, kept, batch_dims=1), (-1, k * chunk)), k)
    return best, tf.gather(kept, position // chunk, batch_dims=1) * chunk + position % chunk  # (N, k) each


def check_beam_size(beam_size):
    """``beam_size`` as an int in [1, `MAX_BEAM_SIZE`]; else ValueError (0 said in words: it is a common slip;
    the maximum bounds one call's allocation, `decoding_options.MAX_BEAM_SIZE`). The model's vocabulary bounds
    it too, which only the model knows (``ClipCap.check_generate_args``)."""
    beam_size = check_integer("beam_size", beam_size)
    if beam_size == 0:
        raise ValueError("beam_size=0: beam search needs at least one beam; use beam_size >= 1 (beam_size=1 is "
                         "greedy decoding)")
    if beam_size < 0:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if beam_size > MAX_BEAM_SIZE:
        raise ValueError(f"beam_size must be in [1, {MAX_BEAM_SIZE}], got {beam_size} (each beam decodes with its "
                         "own cache: the bound keeps one call's memory in reach)")
    return beam_size


def check_top_p(top_p):
    """``top_p`` as a float in (0, 1]; else ValueError."""
    if not 0.0 < check_real("top_p", top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    return float(top_p)


BEAM_SIZE = Option("beam_size", int, 5, f"beams for --method beam, at most {MAX_BEAM_SIZE} and the model's "
                   "vocabulary", minimum=1, maximum=MAX_BEAM_SIZE, check=check_beam_size, ignorable=True,
                   control=Control(1, 10, 1, label="beam size"))
TOP_K = Option("top_k", int, None, "sample among the k most likely tokens only", minimum=1, default_text="no limit")
TOP_P = Option("top_p", float, None, "nucleus sampling: sample among the most likely tokens whose probability "
               "reaches p", check=check_top_p, default_text="1.0, no limit",
               control=Control(0.05, 1.0, 0.05, value=0.9, label="top-p"))


# ------------------------------------------------------------------------------------------------- samplers


def _mix32(x):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    import tensorflow as tf  # here, not at the top: the CLI imports the registry
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x85EBCA6B, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 13))
    x = x * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def counter_uniform(shape, seed, step, rows=None):
    """Uniform floats in (0, 1) of a 2-D `shape` (N, V), a pure function of (seed, step, row id, column).

    ``rows`` (N,) int64: each row's id, what its draws are keyed by (`draw_key`: an image's index in the
    caller's input and the caption's number), so that an image draws the same numbers wherever it sits in a
    batch; None: the row's position. The element's counter is ``row * V + column`` in 64 bits, folded to 32
    (its high half hashed in, a no-op below 2^32: the draws of positions are those of earlier versions).
    A counter-based hash written with integer ops, so that eager and XLA-compiled decoding draw exactly the
    same numbers (TensorFlow's stateless RNG kernels and XLA's do not agree bit for bit).
    """
    import tensorflow as tf  # here, not at the top: the CLI imports the registry
    xor = tf.bitwise.bitwise_xor
    rows = tf.range(shape[0]) if rows is None else rows
    counter = (tf.cast(rows, tf.uint64)[:, None] * tf.cast(shape[1], tf.uint64)
               + tf.cast(tf.range(shape[1]), tf.uint64)[None])  # (N, V)
    low = tf.cast(tf.bitwise.bitwise_and(counter, tf.constant(0xFFFFFFFF, tf.uint64)), tf.uint32)
    index = xor(low, _mix32(tf.cast(tf.bitwise.right_shift(counter, tf.constant(32, tf.uint64)), tf.uint32)))
    key = _mix32(xor(_mix32(tf.cast(seed, tf.uint32)), tf.cast(step, tf.uint32)))
    bits = _mix32(_mix32(xor(index, key)) + key)
    # top 24 bits -> (0, 1), never exactly 0 or 1
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * (1.0 / (1 << 24))


def draw_id(name):
    """An image's id for its random draws (`draw_key`) from its name (an absolute path, a URL): the same name
    draws the same numbers in any batch, run or process (what ``predict``, ``caption`` and ``batch`` pass, so
    that a sampled caption stored under an image's path and the seed is what that path and seed give).
    An integer in [0, 2**31); two names share their draws with a probability of 2**-31."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def draw_key(seed, rows, num_sequences):
    """What the loop hands a sampler as ``seed``: (seed (), the (N,) ids of its rows' draws), the row of image
    ``rows[b]``'s ``w``-th sequence being ``rows[b] * num_sequences + w`` (int64). ``rows`` (B,) int32: each
    image's id (`PrefixDecoder`'s ``image_ids``: its position, or `draw_id` of its name)."""
    import tensorflow as tf  # here, not at the top: the CLI imports the registry
    ids = tf.cast(rows, tf.int64)[:, None] * num_sequences + tf.range(num_sequences, dtype=tf.int64)[None]  # (B, W)
    return seed, tf.reshape(ids, (-1,))


class Sampler:
    """Chooses next tokens from logits, inside the compiled loop.

    Class attributes: ``options`` (the method's own `Option` declarations: its constructor's keyword
    arguments besides ``num_captions``, which every method takes and refuses if it cannot give that many;
    the constructor validates them with their declarations), ``summary`` (a few words for ``--help``),
    ``deterministic`` (the same inputs always give the same captions: what an evaluation may use),
    ``servable`` (it can be baked into the serving SavedModel: its loop compiles and its captions depend
    on the image alone), ``single_caption`` and ``num_sequences`` (rows per image; an instance may set its own).

    The loop calls ``first`` once on the prefill logits (B, V) (one row per image) and ``next`` on the
    logits (N, V) of every later step, N = B * `num_sequences`. Both get and return a ``state`` dict of
    tensors with at least ``finished`` (N,) bool, ``lengths`` (N,) float32 (generated tokens counted),
    ``scores`` (N,) float32 (sum of log-probs); ``seed`` is `draw_key`'s pair (the seed and the rows' draw
    ids); ``next`` may return ``parents`` (N,) int32, the rows each
    new row continues (beam search; always a row of the same image: the decoder gathers only the cache
    slots after the shared prefix), or None when rows never swap.
    """

    options = ()
    summary = ""
    num_sequences = 1
    deterministic = True
    servable = True
    single_caption = False  # True: one caption per image (num_captions must be 1)
    guided = False  # True: runs in `guided_decoding.GuidedDecoder` (needs a CLIP text scorer), not the loop

    def key(self):
        """Hashable description of everything that changes the compiled graph."""
        return (type(self).__name__,) + tuple(sorted(vars(self).items()))

    def initial_state(self, valid):
        """``valid`` (N,) bool: False for padding rows, which start finished."""
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
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
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
        logits = tf.repeat(logits, self.num_sequences, axis=0) if self.num_sequences > 1 else logits
        tokens, state, _ = self.next(logits, state, stop_id, seed, tf.constant(0, tf.int32))
        return tokens, state

    def next(self, logits, state, stop_id, seed, step):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
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
    ``num_captions`` must be 1 (there is one most likely caption).
    """

    summary = "= the official generate2"
    single_caption = True

    def __init__(self, num_captions=None):
        check_single_caption("greedy decoding", num_captions)

    def choose(self, logits, seed, step):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
        return tf.argmax(logits, axis=-1, output_type=tf.int32)


class Sample(_IndependentRows):
    """Random sampling from softmax(logits / temperature), optionally restricted to the top-k tokens and/or
    the smallest set of most likely tokens whose probability reaches top_p (the first token is always
    kept). ``num_captions`` rows per image draw independently; the draws are a pure function of the seed,
    the step, the image's id (its index in the caller's input: `draw_key`) and the caption's number, so a
    given seed gives an image the same captions whatever else is in its batch, compiled or eager.

    Example: ``Sample(temperature=0.7, top_p=0.9, num_captions=3)``
    """

    options = (TEMPERATURE, TOP_K, TOP_P)
    summary = "random draws: --temperature, --top-k, --top-p, --seed"
    deterministic = False
    servable = False  # a SavedModel has no seed input: every request would get the same draws
    #: the version of what the draws are keyed by (2: the image's id, `draw_key`; 1: its row in the batch), in
    #: the settings results are stored under (`prediction.generation_settings`): another version's are not these
    draws = 2

    def __init__(self, temperature=None, top_k=None, top_p=None, num_captions=None):
        self.temperature = TEMPERATURE.validate(temperature)
        self.top_k = TOP_K.validate(top_k)
        top_p = TOP_P.validate(top_p)
        self.top_p = None if top_p is None or top_p >= 1.0 else top_p
        self.num_sequences = NUM_CAPTIONS.validate(num_captions)

    def choose(self, logits, seed, step):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
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
        seed, rows = seed if isinstance(seed, tuple) else (seed, None)
        uniform = counter_uniform(tf.shape(logits), seed, step, rows)  # (N, V) in (0, 1)
        gumbel = -tf.math.log(-tf.math.log(uniform))  # Gumbel-max: argmax(logits + g) ~ softmax(logits)
        return tf.argmax(logits + gumbel, axis=-1, output_type=tf.int32)


class Beam(Sampler):
    """The official ClipCap beam search (``generate_beam``), batched over images.

    Per step: log-probs = log softmax(logits / temperature). Step 0 takes the top `beam_size` tokens of
    each image's single prefix. Later, candidates over beams x vocabulary are ranked by (running sum of
    log-probs) / (generated tokens); a beam that emitted the stop token is frozen: it keeps its sum and
    length and competes with its average in one slot. Stops when all beams are frozen or at max length;
    final order by average log-prob. ``num_captions`` (the best beams returned, <= ``beam_size``) is checked
    here and not kept: it does not change the search.
    """

    options = (BEAM_SIZE, TEMPERATURE)
    summary = "= generate_beam"

    def __init__(self, beam_size=None, temperature=None, num_captions=None):
        num_captions = NUM_CAPTIONS.validate(num_captions)
        self.num_sequences = BEAM_SIZE.validate(beam_size)
        self.temperature = TEMPERATURE.validate(temperature)
        if num_captions > self.num_sequences:
            raise ValueError(f"num_captions={num_captions} exceeds beam_size={self.num_sequences}")

    def _log_probs(self, logits):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
        logits = logits / self.temperature if self.temperature != 1.0 else logits
        return tf.nn.log_softmax(logits, axis=-1)

    def first(self, logits, state, stop_id, seed):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
        w = self.num_sequences
        scores, tokens = two_stage_top_k(self._log_probs(logits), w)  # (B, W) each
        tokens = tf.reshape(tokens, (-1,))  # (N,)
        state = {
            "finished": tf.logical_or(state["finished"], tf.equal(tokens, stop_id)),
            "lengths": tf.ones_like(state["lengths"]),
            "scores": tf.reshape(scores, (-1,)),
        }
        return tokens, state

    def next(self, logits, state, stop_id, seed, step):
        import tensorflow as tf  # here, not at the top: the CLI imports the registry
        w = self.num_sequences
        logp = self._log_probs(logits)  # (N, V)
        n = tf.shape(logp)[0]
        stopped = state["finished"]
        lengths = state["lengths"] + tf.cast(tf.logical_not(stopped), tf.float32)  # (N,)
        # Exact two-stage top-k: the best W of a row are the only candidates it can contribute. A frozen row
        # offers only token 0 with log-prob 0: its top W are (0, -inf, ...) at tokens (0, 1, ...), set after
        # the top-k (on (N, W), not on (N, V)).
        row_top, row_tokens = two_stage_top_k(logp, w)  # (N, W)
        rank = tf.range(w)[None]  # (1, W)
        row_top = tf.where(stopped[:, None], tf.where(rank == 0, 0.0, NEG_INF), row_top)
        row_tokens = tf.where(stopped[:, None], rank, row_tokens)
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


#: MAGIC's candidates per step at most: each step runs GPT-2 and CLIP's text tower on every candidate of every
#: image, so ``magic_k`` multiplies a call's memory as beams do; ten times the papers' 45 is far beyond any use
MAX_MAGIC_K = 512
#: MAGIC's options; the defaults are ``k``, ``alpha``, ``beta`` of yxuansu/MAGIC's
#: ``image_captioning/sh_folder/mscoco_magic.sh`` for image captioning (its Flickr30k script uses k = 25).
MAGIC_OPTIONS = (
    Option("magic_k", int, 45, "--method magic: candidate tokens per step, the most likely ones", minimum=1,
           maximum=MAX_MAGIC_K),
    Option("magic_alpha", float, 0.1, "--method magic: weight of the degeneration penalty, in [0, 1]", minimum=0,
           maximum=1),
    Option("magic_beta", float, 2.0, "--method magic: weight of CLIP's image-text score, >= 0", minimum=0),
)
MAGIC_DEFAULTS = {option.name: option.default for option in MAGIC_OPTIONS}
#: The generated tokens MAGIC's CLIP scorer reads: the last 60 (``clip_text_max_len`` of its inference script).
MAGIC_TEXT_TOKENS = 60


class Magic(Sampler):
    """MAGIC search (Su et al. 2022, "Language Models Can See"; github yxuansu/MAGIC), one caption per image.

    At each step, among the ``magic_k`` tokens of highest logit, choose the argmax of::

        (1 - alpha) * p_LM(v) - alpha * max_j cos(h_v, h_j) + beta * softmax_k(CLIP logits(image, text + v))

    p_LM: softmax probability (temperature 1); h_v: GPT-2's final hidden state (after ``ln_f``) with v fed,
    h_j: those of every earlier position (the prefix included, as MAGIC's prompt); CLIP logits:
    exp(logit_scale) * cos(image, text), the text being the decoded last `MAGIC_TEXT_TOKENS` generated tokens
    plus v, softmax over the k candidates of each image. All as MAGIC's ``PlugAndPlayContrastiveDecodingOneStepFast``
    and ``CLIP.compute_image_text_similarity_via_embeddings``. ``None`` options take `MAGIC_DEFAULTS`.

    Example: ``Magic(magic_k=45, magic_alpha=0.1, magic_beta=2.0)``
    """

    options = MAGIC_OPTIONS
    summary = "MAGIC search, guided by CLIP's text tower: slower, see --magic-k"
    guided = True
    servable = False  # Python between steps: no compiled loop to export
    single_caption = True

    def __init__(self, magic_k=None, magic_alpha=None, magic_beta=None, num_captions=None):
        check_single_caption("MAGIC search", num_captions)
        k_option, alpha_option, beta_option = MAGIC_OPTIONS
        self.k = k_option.validate(magic_k)
        self.alpha = alpha_option.validate(magic_alpha)
        self.beta = beta_option.validate(magic_beta)

    def rank(self, probs, penalty, clip_logits):
        """Each row's chosen candidate: (R, k) LM probabilities, max cosine to the context, CLIP logits ->
        (R,) int indices in [0, k) (ties: the first, i.e. the most likely token, as ``torch.max``)."""
        clip_logits = np.asarray(clip_logits, np.float64)
        shifted = np.exp(clip_logits - clip_logits.max(axis=1, keepdims=True))
        clip_probs = shifted / shifted.sum(axis=1, keepdims=True)
        scores = (1.0 - self.alpha) * np.asarray(probs, np.float64) - self.alpha * np.asarray(penalty, np.float64)
        return np.argmax(scores + self.beta * clip_probs, axis=1)

    def first(self, *args, **kwargs):
        raise TypeError("MAGIC search runs in guided_decoding.GuidedDecoder (it needs CLIP's text tower between "
                        "steps), not in PrefixDecoder's compiled loop")

    next = first


# ------------------------------------------------------------------------------------------------- registry

#: Every decoding method by name, in the order they are listed to users.
SAMPLERS = {"greedy": Greedy, "beam": Beam, "sample": Sample, "magic": Magic}



def check_single_caption(what, num_captions):
    """ValueError unless ``num_captions`` is 1 (None: the default, 1), naming the methods that give several."""
    if NUM_CAPTIONS.validate(num_captions) != 1:
        others = _or(name for name, cls in SAMPLERS.items() if not cls.single_caption)
        raise ValueError(f"{what} gives one caption per image: use method={others} for num_captions > 1")


def _or(names):
    """'a' / 'a' or 'b' / 'a', 'b' or 'c'."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def sampler_class(name):
    """The sampler class registered as ``name``; ValueError naming the methods for any other name."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def methods_options(methods=None):
    """``{name: Option}`` of the options of ``methods`` (names; None: every registered method), each once, in
    the order the command line lists them: the methods' own in registry order (`NUM_CAPTIONS` not included:
    it is the decoder's, `decoding_options.DECODER_OPTIONS`). Two methods sharing an option share its
    declaration (the same `Option`); two different declarations of one name are an error."""
    found = {}
    for method in SAMPLERS if methods is None else methods:
        for option in sampler_class(method).options:
            if found.setdefault(option.name, option) is not option:
                raise ValueError(f"two declarations of the decoding option {option.name!r}: methods sharing an "
                                 "option must share its Option")
    return found


def sampler_options(name):
    """``{option: default}`` of the options method ``name``'s constructor takes: its own and ``num_captions``."""
    return {**{o.name: o.default for o in sampler_class(name).options}, NUM_CAPTIONS.name: NUM_CAPTIONS.default}


def deterministic_methods():
    """The names of the methods that always give the same captions for the same inputs."""
    return tuple(name for name, cls in SAMPLERS.items() if cls.deterministic)


def servable_methods():
    """The names of the methods a serving SavedModel can decode with (``Sampler.servable``)."""
    return tuple(name for name, cls in SAMPLERS.items() if cls.servable)


def several_caption_methods():
    """The names of the methods that give several candidates per image (what re-ranking chooses among)."""
    return tuple(name for name, cls in SAMPLERS.items() if not cls.single_caption)


def get_sampler(name, **options):
    """The sampler of method ``name`` built from its options (``generate``'s keyword arguments).

    Options the method takes go to its constructor, which validates them with their declarations; an option
    of another method is checked and ignored when declared ``ignorable`` (a wrong value is an error whatever
    the method), refused when given otherwise. Raises ValueError (TypeError for an option no method knows).

    Example::

        get_sampler("sample", temperature=0.7, top_p=0.9, num_captions=3, beam_size=5)   # beam_size ignored
    """
    cls = sampler_class(name)
    declared = methods_options()
    taken = {option.name for option in cls.options} | {NUM_CAPTIONS.name}
    unknown = sorted(set(options) - set(declared) - taken)
    if unknown:
        raise TypeError(f"unknown decoding option(s) {unknown}: the methods take {sorted(set(declared) | taken)}")
    exclusive = [key for key in sorted(set(declared) - taken) if not declared[key].ignorable]
    given = {key for key in exclusive if options.get(key) is not None}
    if given:  # named with the other options of the methods that take them
        takers = [method for method in SAMPLERS if given & {o.name for o in SAMPLERS[method].options}]
        theirs = [key for key in exclusive if any(key in {o.name for o in SAMPLERS[m].options} for m in takers)]
        raise ValueError(f"{' / '.join(theirs)} apply to method={_or(takers)}, not {name!r}")
    for key, value in options.items():
        if key not in taken:  # ignorable here: checked, then ignored
            declared[key].validate(value)
    return cls(**{key: value for key, value in options.items() if key in taken})
