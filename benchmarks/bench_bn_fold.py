"""ModifiedResNet with its BatchNorms folded into the convolutions vs OpenAI's layout (BN layers), RN50x4, CPU.

The same random OpenAI-format weights (random BN statistics) are converted both ways and saved as CLIP
folders; then, best of ``--repeats`` rounds taking turns: building the Keras image encoder from its config
(with its random initialisation, and without, as a load builds it), ``CLIP.load`` of the saved folder (build + weights), one eager encode of 1 image, and a graph-mode
(``tf.function``, no XLA) batch of 8, its first call (tracing included) and its steady state. Prints a
markdown table, the layer and variable counts, and the max relative difference between the two encoders.

Run from the repository root::

    python -m benchmarks.bench_bn_fold                # RN50x4, 3 rounds
    python -m benchmarks.bench_bn_fold --repeats 5 --threads 2
"""

import argparse
import os
import tempfile
import time

# torchvision (imported by the clip package) must be loaded before TensorFlow: the other order segfaults
import torch  # noqa: F401, I001
import torchvision  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np
import tensorflow as tf

from custom_architectures.clip_arch import ModifiedResNet
from models.siamese.clip import CLIP
from testing.clip_reference import OPENAI_CONFIGS, random_clip_state_dict
from utils.convert.openai_clip import clip_from_state_dict
from utils.weights_io import variables_to_be_loaded


def timed(fn, *args):
    """``(seconds, fn(*args))``."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(folder, images):
    """One round of every timing for the CLIP saved at ``folder``: {what: seconds}."""
    config = CLIP.load(folder).model.visual.get_config()
    times = {"build encoder, random init": timed(ModifiedResNet.from_config, config)[0]}
    with variables_to_be_loaded():  # as at load: no initializer runs
        times["build encoder, no init"] = timed(ModifiedResNet.from_config, config)[0]
    times["CLIP.load"], clip = timed(CLIP.load, folder)
    visual = clip.model.visual
    times["eager, 1 image"] = timed(lambda x: np.asarray(visual(x, training=False)), images[:1])[0]
    graph = tf.function(lambda x: visual(x, training=False), jit_compile=False)
    times["graph, 8: first call"] = timed(lambda x: graph(x).numpy(), images)[0]
    times["graph, 8: steady"] = timed(lambda x: graph(x).numpy(), images)[0]
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    from benchmarks.machine import print_machine

    print_machine()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    config = OPENAI_CONFIGS["RN50x4"]
    state_dict = {k: v for k, v in random_clip_state_dict(config, seed=0).items()
                  if k.startswith("visual.") or k == "logit_scale"}
    n_px = config["image_resolution"]
    images = np.random.default_rng(0).normal(size=(8, n_px, n_px, 3)).astype("float32")
    kinds = {"folded": True, "BN layers": False}
    with tempfile.TemporaryDirectory() as tmp:
        folders, outputs, counts = {}, {}, {}
        for kind, fold in kinds.items():
            clip = CLIP(clip_from_state_dict(state_dict, visual_only=True, fold_batch_norm=fold))
            folders[kind] = clip.save(os.path.join(tmp, kind.replace(" ", "_")))
            visual = clip.model.visual
            counts[kind] = (len(visual._flatten_layers(include_self=False)), len(visual.weights))
            outputs[kind] = np.asarray(visual(images, training=False))
        best = {kind: {} for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                times = measure(folders[kind], images)
                for name, seconds in times.items():
                    best[kind][name] = min(best[kind].get(name, float("inf")), seconds)
    diff = np.abs(outputs["folded"] - outputs["BN layers"]).max() / np.abs(outputs["BN layers"]).max()
    print(f"RN50x4, best of {args.repeats}; layers / variables: " +
          ", ".join(f"{k} {counts[k][0]} / {counts[k][1]}" for k in kinds) +
          f"; max |folded - BN| / max |BN| = {diff:.1e}\n")
    print("| seconds | " + " | ".join(kinds) + " | ratio |")
    print("|---|" + "---|" * (len(kinds) + 1))
    for name in best["folded"]:
        folded, unfolded = best["folded"][name], best["BN layers"][name]
        print(f"| {name} | {folded:.3f} | {unfolded:.3f} | {unfolded / folded:.2f}x |")


if __name__ == "__main__":
    main()
