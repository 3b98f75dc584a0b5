"""MAGIC search (CLIP-guided decoding, `samplers.Magic`) over GPT-2's KV cache: a Python loop of traced steps.

Why not inside `PrefixDecoder`'s ``tf.while_loop``: every step scores each image's k partial captions with
CLIP's text tower, and GPT-2 token ids become CLIP tokens only through text (GPT-2 detokenize, CLIP's
lower-casing BPE): string work that no TensorFlow / XLA op does. So one step is:

1. ``propose`` (one traced function): the top-k tokens of each image's logits, fed as B*k rows through one
   cached GPT-2 step (all k rows of an image hold the same cache, as contrastive search does), giving each
   candidate's logits and final hidden state, and the degeneration penalty (max cosine to the context);
2. ``guide`` (the caller's Python: `ClipCap`): CLIP logits of the image and each partial caption, all
   active images x k candidates in one text-tower batch;
3. `Magic.rank` (numpy) picks a candidate per image; ``follow`` (traced) copies the chosen row's cache over
   the image's k rows and appends its hidden state to the context.

Example::

    decoder = GuidedDecoder(gpt2)
    out = decoder(prefix, Magic(), guide, max_length=20, stop_token_id=13)   # a DecodeOutput, one caption each
"""

import numpy as np
import tensorflow as tf

from custom_architectures.generation_utils import DecodeOutput
from custom_architectures.samplers import MAGIC_TEXT_TOKENS, check_integer


class GuidedDecoder:
    """Decodes GPT-2 continuations of prefixes (B, K, C) with a guided sampler (`Magic`).

    ``guide(rows, token_lists) -> (M,)``: for M partial captions (generated token ids, candidate last) of the
    images ``rows`` (M,) (indices into the prefix batch), their CLIP logits exp(logit_scale) * cos(image, text).
    The traced step functions live on this instance, one set per ``jit_compile`` (True: XLA; otherwise graph
    mode, traced once per batch size). Batches of more than `max_batch_size` images run in chunks.
    """

    def __init__(self, gpt2, max_batch_size=32):
        self.gpt2 = gpt2
        self.max_batch_size = int(max_batch_size)
        self._functions = {}

    def __call__(self, prefix, sampler, guide, max_length=67, stop_token_id=None, jit_compile=False):
        prefix = np.asarray(prefix, np.float32)
        if prefix.ndim != 3 or prefix.shape[-1] != self.gpt2.n_embd:
            raise ValueError(f"prefix must be (B, K, {self.gpt2.n_embd}), got {prefix.shape}")
        if not np.all(np.isfinite(prefix)):
            rows = np.flatnonzero(~np.all(np.isfinite(prefix), axis=(1, 2))).tolist()
            raise ValueError(f"the prefix holds NaN or infinite values in rows {rows} (of {len(prefix)}): their "
                             "captions would be nonsense")
        max_length = check_integer("max_length", max_length, minimum=1)
        if prefix.shape[1] + max_length > self.gpt2.n_positions:  # every step feeds its candidates, the last too
            raise ValueError(f"prefix length {prefix.shape[1]} + max_length {max_length} exceeds GPT-2's "
                             f"n_positions={self.gpt2.n_positions} (MAGIC feeds the last step's candidates too)")
        stop = None if stop_token_id is None else check_integer("stop_token_id", stop_token_id, minimum=0)
        functions = self._step_functions(jit_compile is True)
        tokens, scores, steps = [], [], 0
        for start in range(0, len(prefix), self.max_batch_size):
            chunk = prefix[start : start + self.max_batch_size]
            chunk_tokens, chunk_scores, chunk_steps = self._decode(chunk, start, sampler, guide, max_length, stop,
                                                                   functions)
            tokens += [[t] for t in chunk_tokens]
            scores += list(chunk_scores)
            steps = max(steps, chunk_steps)
        return DecodeOutput(tokens=tokens, scores=np.asarray(scores, np.float32).reshape(len(prefix), 1),
                            steps=steps)

    def _decode(self, prefix, offset, sampler, guide, max_length, stop, functions):
        """One chunk: (token lists, average log-probs, steps run)."""
        prefill, propose, follow = functions
        batch, k = len(prefix), min(sampler.k, self.gpt2.vocab_size)
        logits, context, cache = prefill(tf.constant(prefix), prefix.shape[1] + max_length, k)
        generated = [[] for _ in range(batch)]
        finished = np.zeros(batch, bool)
        sums = np.zeros(batch, np.float64)
        steps = 0
        for step in range(max_length):
            position = tf.constant(prefix.shape[1] + step, tf.int32)
            ids, probs, penalty, candidate_logits, hidden, cache = propose(logits, cache, context, position, k)
            ids, probs, penalty = ids.numpy(), probs.numpy(), penalty.numpy()
            active = np.flatnonzero(~finished)
            partial = [(generated[i] + [int(token)])[-MAGIC_TEXT_TOKENS:] for i in active for token in ids[i]]
            clip_logits = np.zeros((batch, k), np.float64)
            clip_logits[active] = np.asarray(guide(offset + np.repeat(active, k), partial), np.float64).reshape(-1, k)
            choice = sampler.rank(probs, penalty, clip_logits)  # (B,)
            for i in active:
                token = int(ids[i, choice[i]])
                generated[i].append(token)
                sums[i] += np.log(probs[i, choice[i]])
                finished[i] = token == stop
            steps = step + 1
            if finished.all() or steps == max_length:
                break
            parents = tf.constant(np.arange(batch) * k + choice, tf.int32)
            logits, context, cache = follow(cache, context, candidate_logits, hidden, parents, position, k)
        average = sums / np.maximum([len(g) for g in generated], 1)
        return generated, average, steps

    def _step_functions(self, jit_compile):
        """(prefill, propose, follow), traced (XLA-compiled when ``jit_compile``), kept on this instance.
        Outside XLA the cache is written in place (`GPT2.prefill`'s ``inplace``: `_decode` passes each cache on
        and never reads an old one), where a copying write moved the whole cache of B * k rows at every step and
        block (k = 45: 44 MB a write in float32 for 16 images and 20 tokens)."""
        if jit_compile not in self._functions:
            gpt2 = self.gpt2
            inplace = not jit_compile

            def prefill(prefix, total_length, k):
                """Prefix (B, K, C) -> last logits (B, V), context (B, total, C) holding the K prefix hidden
                states, and the cache of B*k rows (each image's k rows share its prefix)."""
                length = prefix.shape[1]
                logits, hidden, cache = gpt2.prefill(prefix, total_length, rows=k, return_hidden=True, inplace=inplace)
                context = tf.pad(tf.cast(hidden, tf.float32), [[0, 0], [0, total_length - length], [0, 0]])
                return tf.cast(logits, tf.float32), context, cache

            def propose(logits, cache, context, position, k):
                """The k candidates of each image: ids (B, k), p_LM (B, k), penalty (B, k) = max cosine of each
                candidate's hidden state to the context's positions < ``position``; their logits (B*k, V),
                hidden states (B*k, C) and the cache with them written at ``position``."""
                batch, width = logits.shape[0], context.shape[-1]
                probs = tf.nn.softmax(logits, axis=-1)
                ids = tf.math.top_k(logits, k).indices  # (B, k), by logit, as torch.topk
                top_probs = tf.gather(probs, ids, batch_dims=1)
                embedded = gpt2.embed_tokens(tf.reshape(ids, (-1, 1)))  # (B*k, 1, C)
                candidate_logits, hidden, cache = gpt2.call_with_cache(embedded, cache, position, return_hidden=True,
                                                                       inplace=inplace)
                hidden = tf.cast(hidden[:, 0], tf.float32)  # (B*k, C)
                valid = tf.range(context.shape[1]) < position  # (L,)
                norms = tf.where(valid[None, :, None], tf.norm(context, axis=-1, keepdims=True), 1.0)
                unit_context = context / norms  # (B, L, C)
                unit_hidden = tf.reshape(hidden / tf.norm(hidden, axis=-1, keepdims=True), (batch, k, width))
                cosine = tf.einsum("bkc,blc->bkl", unit_hidden, unit_context)
                penalty = tf.reduce_max(tf.where(valid[None, None], cosine, float("-inf")), axis=-1)
                return ids, top_probs, penalty, tf.cast(candidate_logits, tf.float32), hidden, cache

            def follow(cache, context, candidate_logits, hidden, parents, position, k):
                """The chosen rows ``parents`` (B,) (of B*k): their cache copied over each image's k rows, their
                hidden state appended to the context at ``position``, their logits the next step's."""
                cache = gpt2.reorder_cache(cache, tf.repeat(parents, k))
                chosen = tf.gather(hidden, parents)  # (B, C)
                at = (tf.range(context.shape[1]) == position)[None, :, None]
                context = tf.where(at, chosen[:, None], context)
                return tf.gather(candidate_logits, parents), context, cache

            self._functions[jit_compile] = tuple(
                tf.function(f, jit_compile=jit_compile, autograph=False) for f in (prefill, propose, follow))
        return self._functions[jit_compile]
