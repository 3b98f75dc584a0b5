"""Saving and loading a ClipCap-size model's weights: `utils.weights_io` against Keras' own ``save_weights`` /
``load_weights`` (the floor: Keras' file, unaligned and without index, is what ours starts from), and
optionally against the ``weights_io.py`` of other git revisions (``--reference``, e.g. ``1bc0256^``, the
last one on Keras' private saving module, and ``c0b8577``, the SHA-256 pairing).

Model: `ClipCapBackbone` with random weights at the released size (MLP mapper 512 -> 10 x 768 and GPT-2
124M: ~156M parameters, ~620 MB of float32; ``--layers`` shrinks GPT-2 for a quick run). Each repeat runs
every row once, in turn (interleaved), into the same folder; medians are reported, so a shared machine
loads the rows alike; each save writes a new file (the previous one removed first, untimed), as a save
into a new folder does. Saves read the one model; loads go into a second one (built under
`variables_to_be_loaded`, as ``ClipCap.load`` does; its variables assigned), checked bit for bit against
the first after each load.

    python -m benchmarks.bench_weights_io [--repeats 5] [--layers 12] [--reference 1bc0256^ c0b8577]
"""

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone, build_mapper
from custom_architectures.transformers_arch.gpt2_arch import GPT2
from utils import weights_io

ROOT = Path(__file__).resolve().parents[1]


def build_model(layers, seed=0):
    """A random ClipCap backbone: MLP mapper (prefix 512, K=10) and GPT-2 124M with ``layers`` blocks."""
    import keras

    keras.utils.set_random_seed(seed)
    return ClipCapBackbone(build_mapper("mlp", prefix_size=512, prefix_length=10, n_embd=768), GPT2(n_layer=layers))


def reference_module(revision, directory, number):
    """``utils/weights_io.py`` as of git ``revision``, imported as a module of its own (its imports resolve to
    this checkout)."""
    source = subprocess.run(["git", "show", f"{revision}:utils/weights_io.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    path = Path(directory) / f"weights_io_reference{number}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_identical(model, expected, what):
    """Every weight of ``model`` equal, bit for bit, to ``expected`` (a list of arrays)."""
    for variable, values in zip(model.weights, expected, strict=True):
        if np.asarray(variable.numpy()).tobytes() != values.tobytes():
            raise AssertionError(f"{what}: {variable.path} differs after loading")


def rows(model, loaded, directory, references):
    """{name: (save function, load function)}: every save writes ``model`` to its own file in ``directory``,
    every load reads it into ``loaded`` (so that each save reads the same variables, whatever the last load
    did to ``loaded``'s); ``references``: {git revision: its weights_io module}."""
    keras_file, ours_file = str(directory / "keras.weights.h5"), str(directory / "ours.weights.h5")
    table = {
        "keras": (lambda: model.save_weights(keras_file), lambda: loaded.load_weights(keras_file)),
        "ours": (lambda: weights_io.save_weights(model, ours_file),
                 lambda: weights_io.load_weights_strict(loaded, ours_file)),
    }
    for number, (revision, module) in enumerate(references.items()):
        file = str(directory / f"reference{number}.weights.h5")
        table[f"weights_io of {revision}"] = (lambda m=module, f=file: m.save_weights(model, f),
                                              lambda m=module, f=file: m.load_weights_strict(loaded, f))
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12: the released 124M)")
    parser.add_argument("--reference", nargs="*", default=[], help="git revisions whose weights_io.py is also timed")
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()
    model = build_model(args.layers)
    expected = [np.array(v.numpy()) for v in model.weights]
    params = sum(int(v.size) for v in expected)
    print(f"model: ClipCapBackbone (MLP mapper, GPT-2 {args.layers} blocks), {params / 1e6:.1f}M parameters, "
          f"{len(expected)} weights, {sum(v.nbytes for v in expected) / 2**20:.0f} MiB; "
          f"{args.repeats} interleaved repeats, medians", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_weights_io-") as tmp:
        directory = Path(tmp)
        references = {rev: reference_module(rev, directory, i) for i, rev in enumerate(args.reference)}
        with weights_io.variables_to_be_loaded():
            loaded = build_model(args.layers, seed=1)
        table = rows(model, loaded, directory, references)
        files = dict(zip(table, ["keras", "ours"] + [f"reference{i}" for i in range(len(references))]))
        times = {name: {"save": [], "load": []} for name in table}
        for _ in range(args.repeats):
            for name, (save, load) in table.items():
                with contextlib.suppress(FileNotFoundError):  # each save writes a new file, as into a new
                    os.remove(directory / f"{files[name]}.weights.h5")  # folder (not a truncation, untimed)
                times[name]["save"].append(timed(save))
                times[name]["load"].append(timed(load))
                check_identical(loaded, expected, name)
        sizes = {name: os.path.getsize(directory / f"{files[name]}.weights.h5") for name in table}
    median = {name: {op: statistics.median(t) for op, t in ops.items()} for name, ops in times.items()}
    print("\n| weights_io | save (s) | save / keras | save / ours | load (s) | load / keras | load / ours | file (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in table:
        save, load = median[name]["save"], median[name]["load"]
        print(f"| {name} | {save:.3f} | {save / median['keras']['save']:.2f}x | {save / median['ours']['save']:.2f}x | "
              f"{load:.3f} | {load / median['keras']['load']:.2f}x | {load / median['ours']['load']:.2f}x | "
              f"{sizes[name] / 2**20:.0f} |")
    print("\nall runs (s): " + "; ".join(f"{name} {op} " + " ".join(f"{t:.2f}" for t in ts)
                                        for name, ops in times.items() for op, ts in ops.items()))


if __name__ == "__main__":
    main()
