"""The serving SavedModel on random full-size weights: export time, size, first and warm request latency.

Model: CLIP ViT-B/32 + MLP mapper (K = 10) + GPT-2 124M, random weights (built as in
``benchmarks/bench_clipcap.py``), exported with ``export_savedmodel`` (greedy, ``--max-length`` tokens
without early stop, so every request does the same work). The SavedModel is then loaded in a separate
``python -I`` process (no repository on its path, as a deployment) and the ``serving_default`` signature
is called with 1 and 16 JPEG photographs (``skimage.data``): *first* includes the XLA compilation of that
batch size's programs, *warm* is the best of 3 later calls.

Run from the repository root (a few minutes on 2 cores)::

    python -m benchmarks.bench_serving

``--pixels`` measures only the graph's decoding + preprocessing of one image (no model, seconds): today's
(`serving_pixels`: INTEGER_ACCURATE JPEG, PIL's fixed-point resize in integer ops, uint8 until the crop)
against the previous graph's (default DCT, float32 copy of the image, ``tf.image.resize`` bicubic
antialiased in two rounded passes: `_previous_pixels`, kept here as the reference), interleaved, median of
``--repeats`` warm calls, on JPEG photos of growing size.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import torch  # noqa: F401, I001 - torchvision before TensorFlow
import torchvision  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

CLIENT = r"""
import json, sys, time
import tensorflow as tf
start = time.perf_counter()
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
out = {"load_s": time.perf_counter() - start}
images = [open(p, "rb").read() for p in sys.argv[2:]]
for n in (1, len(images)):
    batch = tf.constant(images[:n])
    times = []
    for _ in range(4):
        t = time.perf_counter()
        serve(images=batch)["captions"].numpy()
        times.append(time.perf_counter() - t)
    out[n] = {"first_s": times[0], "warm_s": min(times[1:])}
print(json.dumps(out))
"""


def _size(directory):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _previous_pixels(data, n_px):
    """The previous graph's preprocessing of a JPEG (reference for ``--pixels``): default DCT, float32 copy,
    two ``tf.image.resize`` bicubic antialiased passes rounded to 8 bits, crop, normalisation."""
    import tensorflow as tf

    from utils.clip_preprocessing import MEAN, STD

    image = tf.io.decode_jpeg(data, channels=3)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    short = tf.minimum(height, width)
    new_h = tf.cast(tf.floor(n_px * height / short), tf.int32)
    new_w = tf.cast(tf.floor(n_px * width / short), tf.int32)
    x = tf.cast(image, tf.float32)[None]
    x = tf.clip_by_value(tf.round(tf.image.resize(x, tf.stack([shape[0], new_w]), "bicubic", antialias=True)), 0, 255)
    x = tf.clip_by_value(tf.round(tf.image.resize(x, tf.stack([new_h, new_w]), "bicubic", antialias=True)), 0, 255)
    top = tf.cast(tf.round(tf.cast(new_h - n_px, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - n_px, tf.float64) / 2.0), tf.int32)
    x = x[0, top : top + n_px, left : left + n_px] / 255.0
    return (x - tf.constant(MEAN)) / tf.constant(STD)


def pixels_table(repeats):
    """Per-image seconds of the graph's decoding + preprocessing, previous vs today's, interleaved."""
    import statistics

    import tensorflow as tf
    from PIL import Image

    from benchmarks.bench_clipcap import photos
    from models.image_captioning import serving_ops
    from models.image_captioning.serving_pixels import row_pixels
    from utils.clip_preprocessing import tf_normalize

    signature = [tf.TensorSpec((), tf.string)]

    @tf.function(input_signature=signature)
    def today(data):
        index, _, _, _, size = serving_ops.read_header(data)
        return tf_normalize(row_pixels(index, data, size, 224))

    previous = tf.function(lambda data: _previous_pixels(data, 224), input_signature=signature)
    photo = photos()[0].convert("RGB")
    print("| JPEG | previous graph ms | today's ms | today / previous |")
    print("|---|---:|---:|---:|")
    for width, height in ((448, 448), (640, 480), (1600, 1200), (4000, 3000)):
        buffer = io.BytesIO()
        photo.resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        data = tf.constant(buffer.getvalue())
        times = {"previous": [], "today": []}
        for _ in range(2):  # warm: traced, then the shapes seen
            previous(data), today(data)
        for _ in range(repeats):
            for name, function in (("previous", previous), ("today", today)):
                start = time.perf_counter()
                function(data).numpy()
                times[name].append(time.perf_counter() - start)
        old, new = statistics.median(times["previous"]) * 1e3, statistics.median(times["today"]) * 1e3
        print(f"| {width}x{height} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--pixels", action="store_true", help="only the decoding + preprocessing table")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()
    if args.pixels:
        pixels_table(args.repeats)
        return

    from benchmarks.bench_beam import write_photos
    from benchmarks.bench_clipcap import build
    from models.image_captioning.serving import export_savedmodel
    from testing.tiny_models import train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        tokenizer_dir = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))  # decoding only
        _, _, model = build("ViT-B/32", "mlp", directory, tokenizer_dir)
        out = os.path.join(directory, "export")
        start = time.perf_counter()
        export_savedmodel(model, out, method="greedy", max_length=args.max_length, stop_token=None,
                          max_batch_size=16)
        export_s = time.perf_counter() - start
        size = _size(out)
        image_dir = os.path.join(directory, "images")
        os.makedirs(image_dir)
        paths = write_photos(image_dir, args.images)
        proc = subprocess.run([sys.executable, "-I", "-c", CLIENT, out, *paths], cwd=directory,
                              capture_output=True, text=True, check=True)
        timings = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"\nCLIP ViT-B/32 + MLP K=10 + GPT-2 124M (random weights), greedy, {args.max_length} tokens without "
          f"early stop; export {export_s:.1f} s, SavedModel {size / 2**20:.0f} MiB, load {timings['load_s']:.1f} s\n")
    print("| images per request | first request s (compiles) | warm request s | warm images/s |")
    print("|---:|---:|---:|---:|")
    for n in ("1", str(args.images)):
        t = timings[n]
        print(f"| {n} | {t['first_s']:.2f} | {t['warm_s']:.2f} | {int(n) / t['warm_s']:.2f} |")


if __name__ == "__main__":
    main()
