"""Stress test of map.json under concurrent runs: 4 ``python main.py caption`` processes, one killed.

Builds the tiny random model (``testing/tiny_models.py``, nothing downloaded) and a set of small test
images in a temporary folder, starts 4 caption processes over overlapping subsets that all write the same
``--output-dir`` (so the same map.json), kills one of them at random with SIGKILL while the others run, and
then checks:

- map.json is valid JSON, with no key twice;
- every image captioned by a process that finished (its stdout lines) is in map.json exactly once; so is
  every caption the killed process printed (it prints after its last map.json write, so a process killed
  during its exit is checked too).

It prints a table (per process: images given, captioned, exit code; the union expected vs found;
duplicates; lost) and exits 1 when anything was lost, duplicated or unreadable. A couple of minutes on 2
cores (most of it is 4 TensorFlow start-ups)::

    python benchmarks/stress_outputs.py                  # builds the tiny model in the temporary folder
    python benchmarks/stress_outputs.py --model /tmp/tiny/model --images 200 --seed 3
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_images(directory, n):
    """n small PNGs of distinct sizes and colours; returns their absolute paths."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"img_{i:04d}.png"
        Image.new("RGB", (32 + i % 97, 24 + i // 97), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(path)
        paths.append(str(path.resolve()))
    return paths


def overlapping_sets(paths, k=4):
    """k subsets, each half of the images, consecutive ones overlapping by a quarter (wrapping around)."""
    n = len(paths)
    return [[paths[(start + j) % n] for j in range(n // 2)] for start in (i * n // k for i in range(k))]


def load_strict(path):
    """map.json parsed; the keys that appear more than once in the file."""
    duplicates = []

    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        return dict(items)

    return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=pairs), duplicates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a saved ClipCap folder (default: build the tiny random model)")
    parser.add_argument("--images", type=int, default=160, help="images in the test set")
    parser.add_argument("--seed", type=int, default=None, help="which process is killed, and when")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up on a process")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ is not a package on the path
    from benchmarks.machine import print_machine

    print_machine()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="stress_outputs_") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            print("building the tiny random model ...", flush=True)
            sys.path.insert(0, str(ROOT))
            from testing.tiny_models import build_tiny_model

            model = str(build_tiny_model(tmp / "tiny"))
        paths = make_images(tmp / "images", args.images)
        sets = overlapping_sets(paths)
        out = tmp / "out"
        env = {**os.environ, "IMAGE_CAPTIONING_HOME": str(tmp / "home"), "IMAGE_CAPTIONING_OFFLINE": "1",
               "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        procs = []
        for i, subset in enumerate(sets):
            cmd = [sys.executable, "main.py", "caption", *subset, "--model", model, "--output-dir", str(out),
                   "--batch-size", str(args.batch_size), "--no-progress"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp / f"p{i}.out", "w"),
                                          stderr=open(tmp / f"p{i}.err", "w")))
        victim = rng.randrange(len(procs))
        # kill mid-run: once map.json exists (captioning has begun), after a random short delay
        start = time.monotonic()
        while not (out / "map.json").exists() and time.monotonic() - start < args.timeout:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        killed_running = procs[victim].poll() is None
        procs[victim].send_signal(signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

        try:
            stored, duplicates = load_strict(out / "map.json")
            valid = True
        except (OSError, ValueError) as e:
            print(f"map.json is unreadable: {e}")
            stored, duplicates, valid = {}, [], False

        rows, expected = [], set()
        for i, (p, subset) in enumerate(zip(procs, sets)):
            lines = (tmp / f"p{i}.out").read_text(encoding="utf-8").splitlines()
            captioned = {line.split("\t", 1)[0] for line in lines if "\t" in line}
            finished = not (i == victim and killed_running)
            expected |= captioned  # printed only after the run's last map.json write
            if not finished:
                note = "SIGKILL while running" + (" (after printing its results)" if captioned else "")
            else:
                note = "finished before the kill" if i == victim else ""
            rows.append((f"p{i}", len(subset), len(captioned), p.returncode, note))
            if finished and p.returncode not in (0,):
                print(f"p{i} stderr:\n" + (tmp / f"p{i}.err").read_text(encoding="utf-8")[-2000:])
        found = expected & set(stored)
        lost = expected - set(stored)

        print(f"\n{'process':<8} {'given':>6} {'captioned':>10} {'exit':>6}  note")
        for name, given, captioned, code, note in rows:
            print(f"{name:<8} {given:>6} {captioned:>10} {code!s:>6}  {note}")
        print(f"\nimages in the test set:                      {len(paths)}")
        print(f"union captioned (printed) by the processes: {len(expected)}")
        print(f"  found in map.json (exactly once):          {len(found)}")
        print(f"  lost:                                      {len(lost)}")
        print(f"entries in map.json:                         {len(stored)} "
              f"(incl. {len(set(stored) - expected)} from the killed process only)")
        print(f"duplicate keys in map.json:                  {len(duplicates)}")
        print(f"map.json valid JSON:                         {valid}")
        ok = valid and not lost and not duplicates and all(
            code == 0 for (_, _, _, code, note) in rows if not note.startswith("SIGKILL"))
        print("\nOK" if ok else "\nFAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
