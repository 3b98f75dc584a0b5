"""Batch captioning throughput on Apache Beam's DirectRunner (1 worker, 2 worker processes) next to
``ClipCap.predict``, on random full-size weights, CPU.

Model: CLIP ViT-B/32 + MLP mapper (K = 10) + GPT-2 124M, random weights (built as in
``benchmarks/bench_clipcap.py``) and saved to a directory that the Beam workers load. Inputs: the 16
photographs of ``skimage.data`` saved as JPEG files, repeated to ``--images`` files. Greedy decoding,
``--max-length`` tokens without early stop, batches of ``--batch-size``, so every row does the same work.

Rows (images per second = images / wall-clock seconds):

- predict (cold): ``ClipCap.load`` + ``predict`` in this process, XLA compilation included;
- predict (warm): ``predict`` again on the same model (compiled shapes reused);
- Beam DirectRunner, 1 worker: ``run_batch`` in this process (the in-memory runner; RunInference loads its
  own copy of the model and compiles it), output files written;
- Beam DirectRunner, 2 workers: ``--direct_num_workers=2 --direct_running_mode=multi_processing``: two SDK
  worker processes, each loading and compiling the model.

Run from the repository root (a few minutes on 2 cores)::

    python -m benchmarks.bench_beam --images 32
"""

import argparse
import os
import shutil
import tempfile
import time

import torch  # noqa: F401, I001 - torchvision before TensorFlow
import torchvision  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def write_photos(directory, count):
    from benchmarks.bench_clipcap import photos

    images = photos()
    paths = []
    for i in range(count):
        path = os.path.join(directory, f"{i:05d}.jpg")
        images[i % len(images)].convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=20)
    args = parser.parse_args()
    from benchmarks.machine import print_machine

    print_machine()

    from benchmarks.bench_clipcap import build
    from models.image_captioning.beam_inference import read_records, run_batch
    from models.image_captioning.clip_cap import ClipCap
    from testing.tiny_models import train_tiny_tokenizer

    settings = dict(method="greedy", max_length=args.max_length, stop_token=None)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        tokenizer_dir = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))  # decoding only
        _, _, model = build("ViT-B/32", "mlp", directory, tokenizer_dir)
        model_dir = model.save(os.path.join(directory, "model"))
        del model
        image_dir = os.path.join(directory, "images")
        os.makedirs(image_dir)
        paths = write_photos(image_dir, args.images)
        n = len(paths)

        start = time.perf_counter()
        model = ClipCap.load(model_dir)
        results = model.predict(image_dir, batch_size=args.batch_size, save=False, progress=False, **settings)
        rows.append(("predict (cold: load + compile included)", time.perf_counter() - start))
        assert all(r["error"] is None for r in results)
        start = time.perf_counter()
        model.predict(image_dir, batch_size=args.batch_size, save=False, progress=False, **settings)
        rows.append(("predict (warm)", time.perf_counter() - start))
        del model

        kwargs = {k: v for k, v in settings.items() if k != "method"}
        for label, options in (("Beam DirectRunner, 1 worker (in process)", []),
                               ("Beam DirectRunner, 2 worker processes",
                                ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
            out = os.path.join(directory, "out", label.split(",")[1].strip().replace(" ", "_"))
            start = time.perf_counter()
            run_batch([image_dir], model_dir, out, batch_size=args.batch_size, generate_kwargs=kwargs,
                      pipeline_args=["--runner=DirectRunner", *options])
            rows.append((label, time.perf_counter() - start))
            records = read_records(out)
            assert len(records) == n and all(r["error"] is None for r in records), records[:2]
        shutil.rmtree(os.path.join(directory, "out"), ignore_errors=True)

    print(f"\n{n} JPEG photographs, CLIP ViT-B/32 + MLP K=10 + GPT-2 124M (random weights), greedy, "
          f"{args.max_length} tokens without early stop, batches of {args.batch_size}, {os.cpu_count()} CPU cores\n")
    print("| run | wall s | images/s |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {n / seconds:.2f} |")


if __name__ == "__main__":
    main()
