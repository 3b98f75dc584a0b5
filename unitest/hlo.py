"""The optimized HLO of a compiled greedy decoding loop over a GPT-2 (what the tests of kernel layouts read)."""

import tensorflow as tf


def greedy_loop_hlo(model, prefix_length=4, cache_length=16, steps=3):
    """XLA's optimized HLO text of a greedy loop (one image, ``steps`` tokens after a prefix of zeros) over
    ``model``'s `GPT2.call_with_cache`, as the decoder compiles it: a kernel read by the loop appears in its
    ``while`` instruction's operands with the shape the loop reads."""

    @tf.function(jit_compile=True)
    def greedy(prefix, n):
        logits, cache = model.call_with_cache(prefix, model.init_cache(1, cache_length), 0)

        def body(i, logits, cache):
            token = tf.argmax(logits, -1, output_type=tf.int32)[:, None]
            return (i + 1, *model.call_with_cache(model.embed_tokens(token), cache, prefix_length + i))

        return tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), logits, cache))[1]

    prefix = tf.zeros((1, prefix_length, model.n_embd))
    return greedy.experimental_get_compiler_ir(prefix, tf.constant(steps))(stage="optimized_hlo")
