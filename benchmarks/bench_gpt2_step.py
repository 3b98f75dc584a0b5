"""Time one KV-cached GPT-2 (124M) decoding step: Keras (XLA) against transformers' PyTorch model.

Random weights (the same in both). Cache length 77 (a 10-token ClipCap prefix + 67 tokens), steps taken
after a 10-position prefix. Keras is timed two ways: the compiled step called from Python, and the average
step inside one compiled ``tf.while_loop`` (how ClipCap decodes). Prints a table with ratios.

    python -m benchmarks.bench_gpt2_step [--batch-sizes 16 80] [--steps 20]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  #  (torch + torchvision before TensorFlow: see ARCHITECTURE.md)
import torchvision  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel

# isort: split
import tensorflow as tf

from utils.convert.hf_gpt2 import load_gpt2

PREFIX, MAX_LENGTH = 10, 77


def time_torch(model, batch, steps):
    with torch.no_grad():
        out = model(inputs_embeds=torch.randn(batch, PREFIX, 768), use_cache=True)
        past, ids = out.past_key_values, torch.zeros(batch, 1, dtype=torch.long)
        out = model(ids, past_key_values=past, use_cache=True)  # warm-up
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(steps):
            out = model(ids, past_key_values=past, use_cache=True)
            past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - start) / steps


def time_keras_step(model, batch, steps):
    step = tf.function(model.call_with_cache, jit_compile=True)
    cache = model.init_cache(batch, MAX_LENGTH)
    logits, cache = step(tf.random.normal((batch, PREFIX, 768)), cache, tf.constant(0))
    x = model.embed_tokens(tf.zeros((batch, 1), tf.int32))
    logits, cache = step(x, cache, tf.constant(PREFIX))  # compile the one-token step
    start = time.perf_counter()
    for i in range(steps):
        logits, cache = step(model.embed_tokens(tf.argmax(logits, -1)[:, None]), cache, tf.constant(PREFIX + 1 + i))
    logits.numpy()
    return (time.perf_counter() - start) / steps


def time_keras_loop(model, batch, steps):
    @tf.function(jit_compile=True)
    def greedy(prefix, n):
        logits, cache = model.call_with_cache(prefix, model.init_cache(batch, MAX_LENGTH), 0)

        def body(i, logits, cache):
            x = model.embed_tokens(tf.argmax(logits, -1, output_type=tf.int32)[:, None])
            logits, cache = model.call_with_cache(x, cache, PREFIX + i)
            return i + 1, logits, cache

        return tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), logits, cache))[1]

    prefix = tf.random.normal((batch, PREFIX, 768))
    greedy(prefix, tf.constant(1)).numpy()  # compile
    start = time.perf_counter()
    greedy(prefix, tf.constant(1)).numpy()
    one = time.perf_counter() - start
    start = time.perf_counter()
    greedy(prefix, tf.constant(steps + 1)).numpy()
    return (time.perf_counter() - start - one) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 80])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()
    torch.manual_seed(0)
    torch_model = GPT2LMHeadModel(GPT2Config()).eval()
    keras_model = load_gpt2(torch_model.state_dict())
    print(f"GPT-2 124M, one cached decoding step (cache {MAX_LENGTH}, prefix {PREFIX}), "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'batch':>5} | {'torch ms':>9} | {'keras step ms':>13} | {'keras loop ms':>13} | "
          f"{'torch/step':>10} | {'torch/loop':>10}")
    for batch in args.batch_sizes:
        t = time_torch(torch_model, batch, args.steps) * 1e3
        s = time_keras_step(keras_model, batch, args.steps) * 1e3
        loop = time_keras_loop(keras_model, batch, args.steps) * 1e3
        print(f"{batch:>5} | {t:>9.1f} | {s:>13.1f} | {loop:>13.1f} | {t / s:>10.2f} | {t / loop:>10.2f}")


if __name__ == "__main__":
    main()
