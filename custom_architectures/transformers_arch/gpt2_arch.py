"""GPT-2 (Radford et al., 2019) in Keras 3, weight-compatible with Hugging Face's ``GPT2LMHeadModel``.

What it adds over a plain transformer, for ClipCap:

- inputs as token ids, as embeddings (a ClipCap prefix), or both concatenated (prefix then tokens), with
  learned positions starting at 0 at the first prefix position (as PyTorch with ``inputs_embeds``);
- a right-padding mask for batches of different lengths;
- a preallocated key/value cache (`KVCache`: `init_cache` or `prefill`, `call_with_cache`, `reorder_cache`)
  with static shapes, written in place at a possibly symbolic ``cache_index``, so one
  ``tf.function(jit_compile=True)`` step (or one compiled ``tf.while_loop``) serves every decoding position;
  `prefill` stores a prefix's keys/values once for the W rows (beams) decoding from it, and beam search's
  `reorder_cache` moves (B, W, L) ints, never keys (no cache-sized copy in a step).

The LM head is tied to ``wte`` (``logits = hidden @ wte^T``), as in GPT-2. Layer names mirror the
checkpoint (``wte``, ``wpe``, ``h_{i}`` with ``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``, then ``ln_f``); `utils.convert.hf_gpt2` loads HF and ClipCap checkpoints.

Example::

    gpt2 = GPT2(vocab_size=50257, n_layer=12)                       # weights exist already
    logits = gpt2(token_ids=ids)                                    # (B, T, V)
    cache = gpt2.init_cache(batch_size=4, max_length=77)
    logits, cache = gpt2.call_with_cache(prefix, cache, 0)          # prefix (4, 10, 768) -> (4, V)
    next_ids = keras.ops.argmax(logits, -1)[:, None]
    logits, cache = gpt2.call_with_cache(gpt2.embed_tokens(next_ids), cache, 10)

    logits, cache = gpt2.prefill(prefix, max_length=30, rows=5)    # 5 rows (beams) per prefix: 20 rows
    logits, cache = gpt2.call_with_cache(gpt2.embed_tokens(ids), cache, 10)   # ids (20, 1)
    cache = gpt2.reorder_cache(cache, parents)                      # parents (20,): rows of the same prefix
"""

import logging
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from custom_architectures.samplers import two_stage_top_k
from custom_layers.attention import causal_bias, mask_bias
from custom_layers.gpt2_block import GPT2Block, cached_block_step, cached_column_step
from custom_layers.inference_ops import layer_norm
from custom_layers.linear import IN_OUT, OUT_IN, Linear, check_kernel_layout
from custom_layers.packed_weights import packed_linear, weights_frozen
from custom_layers.quantized import Int8Embedding, check_quantization

#: how many of each row's largest logits a bfloat16 head recomputes in float32 (`refine_top_logits`): beam
#: widths and top-k up to this rank at float32 precision (`two_stage_top_k` serves k up to 16)
REFINED_LOGITS = 16


def refine_top_logits(logits, hidden, wte, count=REFINED_LOGITS):
    """(N, V) float32 ``logits`` from a bfloat16 matmul (rounded to bfloat16) with their ``count`` largest
    of each row recomputed in float32: the dot products of ``hidden`` (N, C) with those rows of ``wte``
    (V, C), upcast. The others are kept: they move the log-softmax's normaliser by a fraction of the top
    values' rounding at most. Ties in the rounded logits are common at large |logits| (a step of 0.5 at
    64-128); recomputed, the picked tokens are ranked as float32 ranks them from the same hidden state.

    Example::

        logits = refine_top_logits(tf.cast(hidden_bf16 @ wte_bf16.T, "float32"), hidden_f32, wte_bf16)
    """
    count = min(count, logits.shape[-1])
    _, tokens = two_stage_top_k(logits, count)  # (N, M)
    rows = tf.cast(tf.gather(wte, tokens), "float32")  # (N, M, C)
    exact = tf.einsum("nc,nmc->nm", tf.cast(hidden, "float32"), rows)  # (N, M)
    row_ids = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
    return tf.tensor_scatter_nd_update(logits, tf.stack([row_ids, tokens], axis=-1), exact)


@keras.saving.register_keras_serializable(package="image_captioning")
class GPT2(keras.Model):
    """GPT-2 language model with a tied LM head and a static-shape KV cache.

    Args:
        vocab_size: number of tokens V (GPT-2: 50257).
        n_positions: number of learned positions (GPT-2: 1024); bounds prefix + tokens.
        n_embd: width C. n_layer: number of blocks. n_head: heads per block (head_dim = C // n_head).
        layer_norm_epsilon: epsilon of every LayerNorm.
        embd_pdrop, attn_pdrop, resid_pdrop: dropout rates (applied only with ``training=True``).
        initializer_range: stddev of the normal initialisers (GPT-2: 0.02).
        quantization: None (float weights) or "int8": the blocks' projections and the tied ``wte`` / LM head
            int8 per output channel (`custom_layers.quantized`; built by
            `custom_architectures.quantization.quantize_gpt2`), for inference only.
        weights_layout: the layout of the blocks' float projection kernels in the weights file this model
            will read: ``"out_in"`` (`custom_layers.linear.OUT_IN`, the default: the layout they have in memory
            and in every file saved since it exists, whose GPT-2 config records it) or ``"in_out"`` (files
            saved before, when the projections were ``keras.layers.Dense``: transposed as Keras reads them).
            `from_config` takes a config without the entry for such a file's; `get_config` always writes
            ``"out_in"`` (a save writes the memory's layout). See `custom_layers.linear`.

    Weights are created in the constructor, so a converter can assign them right away.
    """

    def __init__(self, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
                 initializer_range=0.02, quantization=None, weights_layout=OUT_IN, **kwargs):
        kwargs.setdefault("name", "gpt2")
        super().__init__(**kwargs)
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.layer_norm_epsilon = layer_norm_epsilon
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.initializer_range = initializer_range
        self.quantization = check_quantization(quantization)

        init = keras.initializers.RandomNormal(stddev=initializer_range)
        if quantization == "int8":  # int8 rows, one scale per token: embedding and LM head (inference only)
            self.wte = Int8Embedding(vocab_size, n_embd, name="wte")
        else:
            self.wte = keras.layers.Embedding(vocab_size, n_embd, embeddings_initializer=init, name="wte")
        self.wpe = keras.layers.Embedding(n_positions, n_embd, embeddings_initializer=init, name="wpe")
        self.drop = keras.layers.Dropout(embd_pdrop, name="drop")
        self.h = [
            GPT2Block(n_embd, n_head, layer_norm_epsilon=layer_norm_epsilon, attn_pdrop=attn_pdrop,
                      resid_pdrop=resid_pdrop, initializer_range=initializer_range, quantization=quantization,
                      name=f"h_{i}")
            for i in range(n_layer)
        ]
        self.ln_f = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="ln_f")
        for layer in self.float_projections():
            layer.stored_layout = check_kernel_layout(weights_layout)
        if weights_layout == IN_OUT and self.float_projections():
            logging.getLogger(__name__).info(
                "%s: a GPT-2 saved before its projections were stored (out, in): its kernels are transposed as "
                "they are read (save the model again to store them so: it then loads mapped, faster)", self.name)

        self.wte.build((None, None))
        self.wpe.build((None, None))
        for block in self.h:
            block.build((None, None, n_embd))
        self.ln_f.build((None, None, n_embd))
        self.built = True

    def float_projections(self):
        """The blocks' float projections (`custom_layers.linear.Linear`, kernel (out, in)), block by block:
        ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; none in an int8 model."""
        layers = [layer for block in self.h for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                           block.mlp.c_proj)]
        return [layer for layer in layers if isinstance(layer, Linear)]

    # ------------------------------------------------------------------ embeddings and head
    def embed_tokens(self, token_ids):
        """(B, T) int token ids -> (B, T, C) token embeddings (``wte`` only, no positions)."""
        if isinstance(self.wte, Int8Embedding):
            return self.wte.lookup(token_ids, self.compute_dtype)
        return ops.take(self.wte.embeddings, ops.cast(token_ids, "int32"), axis=0)

    def lm_logits(self, hidden, packed=False):
        """(..., C) final hidden states (after ``ln_f``) -> (..., V) float32 logits with the tied head.

        A bfloat16 model's head runs in bfloat16 and TensorFlow's CPU matmul rounds its output to bfloat16 (8
        significant bits: a step of 0.5 at |logits| of 64-128, where a trained GPT-2's are): the
        `REFINED_LOGITS` largest of each row are then recomputed in float32 from ``hidden`` (float32 when the
        caller has it) and the bfloat16 rows of wte (`refine_top_logits`), so that the tokens a sampler picks
        are ranked at float32 precision; the others (hence the log-softmax's normaliser, mostly) keep the
        rounded values. ``packed``: the head keeps wte packed (`custom_layers.packed_weights`; see
        `call_with_cache`)."""
        shape = ops.shape(hidden)
        flat = ops.reshape(hidden, (-1, self.n_embd))  # (N, C)
        if isinstance(self.wte, Int8Embedding):
            return ops.reshape(self.wte.logits(flat), (*shape[:-1], self.vocab_size))
        compute = self.compute_dtype
        x = ops.cast(flat, compute)
        wte = ops.cast(self.wte.embeddings, compute)  # (V, C)
        if packed:  # the fused kernel takes a bias: zeros
            logits = packed_linear(x, wte, tf.zeros((self.vocab_size,), compute))  # (N, V)
        else:
            logits = tf.matmul(x, wte, transpose_b=True)  # (N, V): no (C, V) transpose of wte is materialised
        logits = ops.cast(logits, "float32")
        if compute != "float32":
            logits = refine_top_logits(logits, flat, wte)
        return ops.reshape(logits, (*shape[:-1], self.vocab_size))

    def _input_embeddings(self, token_ids, inputs_embeds):
        if token_ids is None and inputs_embeds is None:
            raise ValueError("GPT2 needs token_ids, inputs_embeds, or both")
        parts = []
        if inputs_embeds is not None:
            inputs_embeds = ops.convert_to_tensor(inputs_embeds, self.compute_dtype)
            if inputs_embeds.shape.rank != 3 or inputs_embeds.shape[-1] != self.n_embd:
                raise ValueError(f"inputs_embeds must be (B, P, {self.n_embd}), got {inputs_embeds.shape}")
            parts.append(inputs_embeds)
        if token_ids is not None:
            token_ids = ops.convert_to_tensor(token_ids)
            if token_ids.shape.rank != 2:
                raise ValueError(f"token_ids must be (B, T), got shape {token_ids.shape}")
            parts.append(self.embed_tokens(token_ids))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)  # (B, P+T, C)

    # ------------------------------------------------------------------ full pass
    def call(self, token_ids=None, inputs_embeds=None, padding_mask=None, training=False):
        """Logits (B, P+T, V) for ``[inputs_embeds, wte(token_ids)]`` at positions 0..P+T-1.

        ``padding_mask`` (B, P+T): 1 = real, 0 = pad (right padding); pads are never attended to. Logits at
        pad positions are meaningless.
        """
        x = self._input_embeddings(token_ids, inputs_embeds)  # (B, S, C)
        length = ops.shape(x)[1]
        if isinstance(length, int) and length > self.n_positions:
            raise ValueError(f"sequence of {length} positions exceeds n_positions={self.n_positions}")
        x = x + self.wpe.embeddings[None, :length]
        x = self.drop(x, training=training)

        positions = ops.arange(length)
        bias = causal_bias(positions, positions, key_mask=padding_mask)  # (1 or B, 1, S, S)

        for block in self.h:
            x = block(x, attention_bias=bias, training=training)
        if self.compute_dtype != "float32":  # as the cached path: ln_f's output kept in float32 for the head
            return self.lm_logits(layer_norm(ops.cast(x, "float32"), self.ln_f.gamma.value, self.ln_f.beta.value,
                                             self.layer_norm_epsilon))
        return self.lm_logits(self.ln_f(x))

    # ------------------------------------------------------------------ cached decoding
    def init_cache(self, batch_size, max_length):
        """A zero cache for `batch_size` sequences of up to `max_length` positions, one row each, no context.

        A `KVCache` (opaque to callers; fixed shapes, so it can be a ``tf.while_loop`` loop variable): every
        position is written by `call_with_cache` from 0 on. `prefill` gives the cache of rows sharing a prefix.
        """
        if max_length > self.n_positions:
            raise ValueError(f"max_length={max_length} exceeds n_positions={self.n_positions}")
        return self._empty_cache(batch_size, 0, 1, max_length)

    def _empty_cache(self, batch_size, context_length, rows, slots, fresh=False):
        """A `KVCache` of zeros: context (B, H, K, D), slots (B, H, L * W, D), sources (B, W, L). ``fresh``: each
        tensor a new buffer of every run, even in a graph (``Empty``, which TensorFlow never folds into a
        constant), for writes in place (`custom_layers.gpt2_block.write_slots`)."""
        def zeros(length):
            shape = (batch_size, self.n_head, length, self.head_dim)
            if fresh:
                return tf.raw_ops.Empty(shape=tf.stack(shape), dtype=self.compute_dtype, init=True)
            return ops.zeros(shape, self.compute_dtype)
        layers = tuple((zeros(context_length), zeros(context_length), zeros(slots * rows), zeros(slots * rows))
                       for _ in range(self.n_layer))
        return KVCache(layers, ops.zeros((batch_size, rows, slots), "int32"))

    def prefill(self, inputs_embeds, max_length, rows=1, block_fn=None, return_hidden=False, run=None,
                inplace=False, merged=False):
        """Run a prefix (B, K, C) once and return a cache of ``rows`` rows per prefix, ready to decode.

        The prefix's keys/values become the cache's context, stored once per prefix and attended by all its
        rows (B * rows of them: the beams of beam search, MAGIC's candidates; row i * rows + j is row j of
        prefix i); each row has its own ``max_length - K`` slots for the positions that follow.

        ``run``: None, or a scalar bool tensor; False skips the computation (zero logits and cache of the same
        shapes, through a ``tf.cond``): a background build compiles the program on padding rows without
        computing (`custom_architectures.compile_policy`).

        ``inplace``: the cache's buffers are made fresh (`_empty_cache`), and this call and the caller's
        `call_with_cache(..., inplace=True)` write into them instead of copying the cache at each write (a
        plain graph's or eager loop's: never under XLA). Then a cache is used once: each call's returned cache
        is the same buffers as the one passed in, so an old cache must not be read again (a decoding loop
        passes it on; branching from one needs the default).

        ``merged`` (one row per prefix): the prefix's keys/values stay where they were written, in the row's
        first K slots of a cache with no context and ``max_length`` slots, so that a step's attention reads
        one segment (one batched matmul for the keys, one for the values) instead of context and slots apart
        (a bfloat16 greedy step of GPT-2 124M at 16 rows outside XLA: 12 layers' attention 4.3 -> 3.0 ms).
        Positions, masks and results are the same.

        Returns:
            (logits (B, V) at the last prefix position, cache), or (logits, hidden (B, K, C), cache) with
            ``return_hidden`` (the final hidden states, after ``ln_f``).
        """
        x = ops.convert_to_tensor(inputs_embeds, self.compute_dtype)
        batch, length = x.shape[0], x.shape[1]
        if length is None or not length <= max_length <= self.n_positions:
            raise ValueError(f"max_length={max_length} must hold the prefix's {length} positions and be at most "
                             f"n_positions={self.n_positions}")
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        rows = int(rows)
        if merged and rows != 1:
            raise ValueError(f"merged=True keeps the prefix in the slots of its one row; got rows={rows}")
        batch = ops.shape(x)[0] if batch is None else batch
        if run is not None:
            def skipped():
                hidden = (ops.zeros((batch, length, self.n_embd), self.compute_dtype),) if return_hidden else ()
                cache = (self._empty_cache(batch, 0, 1, max_length, fresh=inplace) if merged else
                         self._empty_cache(batch, length, rows, max_length - length, fresh=inplace))
                return (ops.zeros((batch, self.vocab_size), "float32"), *hidden, cache)

            return tf.cond(run, lambda: self.prefill(x, max_length, rows, block_fn, return_hidden, inplace=inplace,
                                                     merged=merged), skipped)
        slots = max_length if merged else length  # merged: the prefix's slots are the row's first K
        *outputs, cache = self.call_with_cache(x, self._empty_cache(batch, 0, 1, slots, fresh=inplace), 0,
                                               block_fn=block_fn, return_hidden=return_hidden, inplace=inplace)
        if merged:
            return (*outputs, cache)
        empty = self._empty_cache(batch, 0, rows, max_length - length, fresh=inplace)
        layers = tuple((keys, values, *slots)  # the prefix's keys/values (B, H, K * 1, D) as the context
                       for (_, _, keys, values), (_, _, *slots) in zip(cache.layers, empty.layers, strict=True))
        return (*outputs, KVCache(layers, empty.sources))

    def call_with_cache(self, inputs_embeds, cache, cache_index, all_logits=False, block_fn=None,
                        return_hidden=False, inplace=False, columns=False, packed=False):
        """Run a chunk through the model, reading and writing the KV cache (inference, no dropout).

        Args:
            inputs_embeds: (N, T, C) embedded inputs (a prefix, or ``embed_tokens(ids)``) of the cache's N rows;
                T static.
            cache: from `init_cache` or `prefill` (or a previous call); its positions bound ``cache_index + T``.
            cache_index: int32 scalar, the position of the first of the T inputs, K or later (the context's K
                positions are `prefill`'s); may be symbolic. The caller keeps it in range (XLA clamps
                out-of-range writes silently).
            all_logits: return logits for all T positions instead of the last one only.
            block_fn: the function run for each block (default `cached_block_step`, inlined where this is
                traced); `block_step_function` gives a traced one that serves all blocks when called eagerly.
            return_hidden: also return the final hidden states (N, T, C) (after ``ln_f``).
            inplace: write into the cache's own buffers (a cache from `prefill(..., inplace=True)`, used once:
                see there); ``block_fn`` must then be ``block_step_function(inplace=True)``.
            columns: one token per row (T = 1), the blocks run on the activations as columns (C, N)
                (`custom_layers.gpt2_block.cached_column_step`: faster under XLA at a few rows); float
                kernels, not in place; ``block_fn`` must then be ``block_step_function(columns=True)``.
            packed: the projections and the head keep their kernels packed in oneDNN's layout
                (`custom_layers.packed_weights`): for a graph being traced (a plain one, not XLA) from a model
                whose weights are frozen (a bfloat16 twin's), with the blocks inlined (``block_fn`` None).

        Returns:
            (logits, cache): logits (N, V), or (N, T, V) if ``all_logits``; the updated cache.
            (logits, hidden, cache) with ``return_hidden``.
        """
        x = ops.convert_to_tensor(inputs_embeds, self.compute_dtype)  # (N, T, C)
        length = x.shape[1]
        if length is None:
            raise ValueError("call_with_cache needs a static chunk length T")
        context_length, rows, slots = cache.context_length, cache.rows, cache.slots
        cache_index = ops.cast(cache_index, "int32")
        start = tf.get_static_value(cache_index)  # known in eager mode / for constants: check the bounds
        if start is not None:
            start = int(start)
            if start < context_length or start + length > context_length + slots:
                raise ValueError(f"positions [{start}, {start + length}) do not fit a cache of positions "
                                 f"[{context_length}, {context_length + slots})")

        query_positions = cache_index + ops.arange(length, dtype="int32")  # (T,)
        x = x + ops.take(self.wpe.embeddings, query_positions, axis=0)[None]  # (1, T, C)
        slot = cache_index - context_length
        written = ops.logical_and(ops.arange(slots) >= slot, ops.arange(slots) < slot + length)  # (L,)
        sources = ops.where(written[None, None], ops.arange(rows, dtype="int32")[None, :, None], cache.sources)
        bias = _cache_bias(query_positions, context_length, sources)  # (B, 1, W*T, K + L*W)

        layers = []
        if packed and (block_fn is not None or columns or not weights_frozen(self)):
            raise ValueError("packed=True needs the blocks inlined (no block_fn), the row form, and a model whose "
                             "weights are frozen (custom_layers.packed_weights.freeze_weights)")
        if columns:
            if length != 1 or inplace or self.quantization is not None:
                raise ValueError("columns=True takes one token per row, float kernels, and not inplace")
            x = tf.transpose(x[:, 0])  # (C, N)
        for block, layer_cache in zip(self.h, cache.layers, strict=True):
            if block_fn is not None:
                x, layer_cache = block_fn(x, layer_cache, slot, bias, block.inference_weights())
            elif columns:
                x, layer_cache = cached_column_step(x, layer_cache, slot, bias, block.inference_weights(),
                                                    self.n_head, self.layer_norm_epsilon)
            else:
                x, layer_cache = block.call_with_cache(x, layer_cache, slot, bias, inplace=inplace, packed=packed)
            layers.append(layer_cache)
        if columns:
            x = tf.transpose(x)[:, None]  # (N, 1, C)
        cache = KVCache(tuple(layers), sources)
        # ln_f in float32 (`layer_norm`): the head casts to the compute dtype itself and refines in float32
        if return_hidden:
            hidden = layer_norm(ops.cast(x, "float32"), self.ln_f.gamma.value, self.ln_f.beta.value,
                                self.layer_norm_epsilon)  # (N, T, C)
            logits = self.lm_logits(hidden if all_logits else hidden[:, -1], packed=packed)
            return logits, ops.cast(hidden, self.compute_dtype), cache
        if not all_logits:
            x = x[:, -1]  # (N, C): the head only where it is needed
        x = layer_norm(ops.cast(x, "float32"), self.ln_f.gamma.value, self.ln_f.beta.value, self.layer_norm_epsilon)
        return self.lm_logits(x, packed=packed), cache

    def block_step_function(self, inplace=False, columns=False):
        """`cached_block_step` as a traced function (graph mode, no XLA) for ``call_with_cache(...,
        block_fn=...)``: traced once per chunk shape (~60 ops, ~0.2 s), its concrete function serves every
        block and every position. Called eagerly, a decoding step runs one graph call per block instead of ~60
        Python-dispatched ops, with nothing compiled; traced into a loop (the decoder's compiled one), each
        block is a call of that one function, which XLA inlines, so the loop's trace does not repeat the
        block's Python per block. (The default, ``block_fn=None``, inlines the blocks one by one.)
        ``inplace``: the block writes into the cache's buffers (`call_with_cache`'s ``inplace``; not for XLA).
        ``columns``: the column form (`call_with_cache`'s ``columns``: x (C, N), for XLA)."""
        n_head, epsilon = self.n_head, self.layer_norm_epsilon

        def step(x, layer_cache, slot, attention_bias, weights):
            if columns:
                return cached_column_step(x, layer_cache, slot, attention_bias, weights, n_head, epsilon)
            return cached_block_step(x, layer_cache, slot, attention_bias, weights, n_head, epsilon, inplace=inplace)

        traced = tf.function(step, autograph=False)
        concrete = {}

        def block_fn(x, layer_cache, slot, attention_bias, weights):
            slot = tf.cast(slot, tf.int32)  # a tensor: a Python int would be a trace per position
            key = (tuple(x.shape), tuple(tuple(c.shape) for c in layer_cache), tuple(attention_bias.shape), x.dtype)
            if key not in concrete:
                concrete[key] = traced.get_concrete_function(x, layer_cache, slot, attention_bias, weights)
            return concrete[key](x, layer_cache, slot, attention_bias, weights)

        return block_fn

    def reorder_cache(self, cache, parents):
        """The cache after beam search's reorder: row n continues row ``parents[n]`` (N,) int.

        Each parent is a row of the same prefix (``parents[n] // W == n // W``, W = ``cache.rows``): nothing is
        copied, only which rows' slots each row reads (`KVCache.sources`, (B, W, L) ints) follows its parent.
        Checked when ``parents`` is known (eager mode)."""
        rows = cache.rows
        parents = ops.cast(parents, "int32")
        known = tf.get_static_value(parents)
        if known is not None and np.any(known // rows != np.arange(len(known)) // rows):
            raise ValueError(f"reorder_cache: every parent must be a row of the same prefix ({rows} rows each), "
                             f"got {known.tolist()}")
        local = ops.reshape(parents, (-1, rows)) % rows  # (B, W): the parent's row within its prefix
        return KVCache(cache.layers, tf.gather(cache.sources, local, batch_dims=1))

    # ------------------------------------------------------------------ serialisation
    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
            n_layer=self.n_layer, n_head=self.n_head, layer_norm_epsilon=self.layer_norm_epsilon,
            embd_pdrop=self.embd_pdrop, attn_pdrop=self.attn_pdrop, resid_pdrop=self.resid_pdrop,
            initializer_range=self.initializer_range,
        )
        if self.quantization is not None:  # absent for float weights: float configs (and identities) unchanged
            config.update(quantization=self.quantization)
        config.update(weights_layout=OUT_IN)  # what a save writes, whatever file the model was read from
        return config

    @classmethod
    def from_config(cls, config):
        """A config without ``weights_layout`` was saved before GPT-2's projections were `Linear` (kernel
        (out, in)): its weights file stores them (in, out) (``"in_out"``), transposed as they are read."""
        return cls(**{"weights_layout": IN_OUT, **config})

class KVCache(NamedTuple):
    """The key/value cache of `GPT2.call_with_cache`: N = B * W rows, W rows sharing each of B contexts.

    ``layers``: per block (context_keys, context_values, keys, values): the context (B, H, K, D), positions
    [0, K), stored once for its W rows (a prefix, written by `GPT2.prefill`; K = 0 from `GPT2.init_cache`),
    and the slots (B, H, L * W, D), positions [K, K + L) of the W rows (slot-major: slot l of row w at
    l * W + w), written in place.
    ``sources``: (B, W, L) int32, the row (of the W) whose slot l row w reads at position K + l: itself for
    what it wrote, its ancestors' after `GPT2.reorder_cache` (beam search moves these ints, never the keys).
    A NamedTuple of tensors: a ``tf.while_loop`` variable and a ``tf.function`` argument as it is."""

    layers: tuple
    sources: tf.Tensor

    @property
    def context_length(self):
        return self.layers[0][0].shape[2]

    @property
    def rows(self):
        return self.sources.shape[1]

    @property
    def slots(self):
        return self.sources.shape[2]


def _cache_bias(query_positions, context_length, sources):
    """The additive bias (B, 1, W*T, K + L*W) of `cached_block_step`'s attention for T queries per row at
    ``query_positions`` (T,), queries row-major ((w, t) at w * T + t), keys as the cache holds them: the
    context's positions up to each query, and of the group's slots (slot-major: (l, w') at l * W + w') those
    up to each query that row w reads (``sources[b, w, l] == w'``)."""
    batch, rows, slots = ops.shape(sources)[0], sources.shape[1], sources.shape[2]
    length = query_positions.shape[0]
    context = causal_bias(query_positions, ops.arange(context_length, dtype="int32"))[0, 0]  # (T, K)
    context = ops.broadcast_to(ops.tile(context, (rows, 1))[None, None], (batch, 1, rows * length, context_length))
    visible = ops.arange(slots, dtype="int32")[None] + context_length <= query_positions[:, None]  # (T, L)
    owner = sources[:, :, None, :, None] == ops.arange(rows, dtype="int32")  # (B, W, 1, L, W')
    allowed = ops.logical_and(owner, visible[None, None, :, :, None])  # (B, W, T, L, W')
    own = mask_bias(ops.reshape(allowed, (batch, 1, rows * length, slots * rows)))
    return ops.concatenate([context, own], axis=-1)
