"""Fault injection: ``convert``, ``caption`` and ``train`` killed with SIGKILL at random points, many times.

Builds everything locally in a temporary folder (the tiny random model of ``testing/tiny_models.py``, a few
small images, the synthetic-shapes training set and its embeddings: nothing downloaded), then, for each
command, runs it once to completion to time it, and ``--kills`` times starts it, waits a random delay
(uniform from 0.9 x the time of its first write, for ``convert`` and ``train`` whose start-up only imports, or
from 0 for ``caption``, which writes map.json at its end, to 1.05 x the run, as timed on a run with a warm
compile cache) and kills it
with SIGKILL. After each kill it records where the process was (from what it left on disk: start-up or
computing, writing a staged folder, between the two renames of a replacement, deleting the previous copy,
writing map.json or a checkpoint) and checks:

- **the model loads** (``ClipCap.load`` on the store name for ``convert`` and ``caption``; the run's model
  folder for a ``train`` that finished);
- **no finished result is lost**: every ``map.json`` entry present just before the kill is still there;
  the newest complete training checkpoint seen before the kill is still there (or a newer one);
- **nothing stale is left after the next run** (the load above, then at the end of each command's series one
  run to completion): no ``.*.tmp`` / ``.*.old.*`` entries, no ``*.lock`` files.

It prints a table (runs, kills per phase, failures by kind) with the CPU model and flags, and exits 1 on any
failure. 4-12 minutes on 2 cores with the defaults (most of it is TensorFlow start-ups)::

    python benchmarks/fault_injection.py                     # 5 kills per command
    python benchmarks/fault_injection.py --kills 20 --seed 3
"""

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, print_machine  # noqa: E402

TINY_GPT2 = dict(n_positions=48, n_embd=64, n_layer=2, n_head=4)
IMAGES_PER_RUN = 16
#: a killed writer's leftovers: hidden temporaries and previous copies, lock files, TensorFlow's cache temporaries
STALE = re.compile(r"^\..*\.tmp$|^\..*\.old\..*|.*\.lock$|^xla_compile_cache__.*\.tmp$")


def stale_entries(*roots):
    """Every leftover of a killed writer under ``roots``: hidden ``.tmp`` / ``.old.`` entries, ``.lock`` files."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if STALE.match(n)]
    return sorted(found)


# ------------------------------------------------------------------------------------------------- set-up
def build_inputs(tmp, kills):
    """The tiny model's source files, images to caption, and the training embeddings + tokenizer."""
    from datasets.synthetic_shapes import make_shapes_dataset, train_shapes_tokenizer
    from main import main as cli
    from testing.tiny_models import build_tiny_files

    files = build_tiny_files(tmp / "tiny")
    images = make_shapes_dataset(tmp / "shapes" / "caption", num_images=IMAGES_PER_RUN * (kills + 3), seed=2,
                                 image_size=32).images
    make_shapes_dataset(tmp / "shapes" / "train", num_images=80, seed=0, image_size=32)
    tokenizer = train_shapes_tokenizer(tmp / "shapes_tokenizer_src")
    tokenizer.save_pretrained(str(tmp / "shapes_tokenizer"))
    if cli(["extract", str(tmp / "shapes" / "train" / "captions.json"), "--clip", str(files["clip"]),
            "--output", str(tmp / "emb" / "train.npz"), "--cache-dir", str(tmp / "cache"), "--no-progress"]) != 0:
        raise RuntimeError("extract failed")
    return files, [str(p) for p in images], tmp / "emb" / "train.npz", tmp / "shapes_tokenizer", tokenizer


class Command:
    """One command under test: its argv, where it writes, how to classify and check a kill."""

    def __init__(self, name, argv, watch):
        self.name, self.argv, self.watch = name, argv, watch

    #: where the kills start, as a fraction of the run's first write (convert, train: start-up only imports)
    window_start = 0.9

    def phase(self, before):
        raise NotImplementedError

    def prepare(self, finished):
        """Set ``argv`` for the next run (``finished``: whether the previous one ended by itself)."""

    def active(self):
        """Whether a run has made its first write (the kills are spread from there to the run's end)."""
        raise NotImplementedError

    def snapshot(self):
        return None

    def check(self, snapshot, exit_code):
        """Failure kinds (strings) after a kill; runs the 'next run' (a load) first."""
        raise NotImplementedError


def _marker_states(folder, prefix=""):
    from utils.file_utils import PARTIAL_MARKER

    states = []
    for p in Path(folder).glob(f".{prefix}*"):
        try:
            states.append((p.name, json.loads((p / PARTIAL_MARKER).read_text())["state"]))
        except (OSError, ValueError, KeyError):
            states.append((p.name, "unmarked"))
    return states


def _replacement_phase(folder, name, target_exists):
    """Where a replacement of ``folder/name`` stood, from what it left."""
    states = [s for n, s in _marker_states(folder, name + ".") if not n.startswith(f".{name}.~w")]
    if not states:
        return None
    if not target_exists and "complete" in states:
        return "between the two renames"
    if "trash" in states or ("old" in states and target_exists):
        return "deleting the previous copy"
    if "complete" in states:
        return "staged copy complete"
    return "writing the staged copy"


class Convert(Command):
    def __init__(self, files, home):
        super().__init__("convert", ["convert", str(files["checkpoint"]), "--clip", str(files["clip"]),
                                     "--tokenizer", str(files["tokenizer"]), "--name", "m", "--overwrite"], (home,))
        self.home = home

    def active(self):
        return any(self.home.glob(".m.*"))

    def phase(self, printed, started):
        return (_replacement_phase(self.home, "m", (self.home / "m").exists())
                or ("after the save (exiting)" if _newer(self.home / "m" / "config.json", started)
                    else "start-up / converting"))

    def check(self, snapshot, exit_code):
        return _loads("m")


class Caption(Command):
    window_start = 0.0  # map.json is written at the end: kills spread over loading and captioning

    def __init__(self, images, home, out):
        super().__init__("caption", ["caption", *images, "--model", "m", "--output-dir", str(out),
                                     "--batch-size", "4", "--no-progress"], (out, home))
        self.out, self.images = out, images

    def active(self):
        return (self.out / "map.json").exists() or any(self.out.glob(".map.json.~w*"))

    def phase(self, printed, started):
        if list(self.out.glob(".map.json.~w*.tmp")):
            return "writing map.json"
        if _newer(self.out / "map.json", started):
            return "after writing map.json (exiting)"
        return "start-up / captioning"

    def snapshot(self):
        try:
            return set(json.loads((self.out / "map.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return set()

    def check(self, snapshot, exit_code):
        failures = _loads("m")
        try:
            now = set(json.loads((self.out / "map.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            now = set()
        except ValueError:
            return failures + ["map.json unreadable"]
        if snapshot - now:
            failures.append(f"map.json lost {len(snapshot - now)} entries")
        return failures

    def prepare(self, finished):
        """The next run captions images no run has captioned (its work is real; earlier entries must stay)."""
        self.batch = getattr(self, "batch", -1) + 1
        chunk = self.images[self.batch * IMAGES_PER_RUN:(self.batch + 1) * IMAGES_PER_RUN]
        self.argv = ["caption", *chunk, *self.argv[self.argv.index("--model"):]]


class Train(Command):
    def __init__(self, embeddings, tokenizer_dir, clip, runs):
        self.runs, self.run_index = runs, 0
        self.base = ["train", str(embeddings), "--tokenizer", str(tokenizer_dir), "--gpt2-config",
                     json.dumps(TINY_GPT2), "--clip", str(clip), "--epochs", "3", "--batch-size", "10",
                     "--lr", "1e-3", "--warmup-steps", "5", "--prefix-length", "4", "--checkpoint-every-steps",
                     "4", "--no-progress"]
        super().__init__("train", self.base + ["--output", str(self.run_dir())], (runs,))

    def run_dir(self):
        return self.runs / f"run{self.run_index}"

    def prepare(self, finished):
        """A finished run: the next one starts a new run folder; a killed one: the next resumes it."""
        if finished:
            self.run_index += 1
            self.argv = self.base + ["--output", str(self.run_dir())]

    def active(self):
        return (self.run_dir() / "checkpoints").exists()

    def phase(self, printed, started):
        ckpt = self.run_dir() / "checkpoints"
        states = [s for _, s in _marker_states(ckpt)] if ckpt.is_dir() else []
        model = _replacement_phase(self.run_dir(), "model", (self.run_dir() / "model").exists())
        if model:
            return "saving the model: " + model
        if "trash" in states:
            return "deleting an old checkpoint"
        if states:
            return "writing a checkpoint"
        if _newer(self.run_dir() / "model" / "config.json", started):
            return "after saving the model (exiting)"
        return "start-up / training"

    def snapshot(self):
        from custom_train_objects.checkpoints import list_checkpoints

        done = list_checkpoints(self.run_dir() / "checkpoints")
        return done[-1].name if done else None

    def check(self, snapshot, exit_code):
        from custom_train_objects.checkpoints import list_checkpoints
        from utils.file_utils import recover_replacements

        failures = []
        recover_replacements(self.run_dir() / "checkpoints")  # what the next train run does first
        done = list_checkpoints(self.run_dir() / "checkpoints")
        if snapshot is not None and (not done or done[-1].name < snapshot):
            failures.append(f"checkpoint {snapshot} lost")
        if (self.run_dir() / "model").exists() or exit_code == 0:
            failures += _loads(str(self.run_dir() / "model"))
        return failures


def _newer(path, since):
    """Whether ``path`` was written after ``since`` (a time.time())."""
    try:
        return os.stat(path).st_mtime >= since
    except OSError:
        return False


def _loads(name):
    """[] when ``ClipCap.load(name)`` works (which is also the next run that recovers a killed save)."""
    from models.image_captioning.clip_cap import ClipCap

    try:
        ClipCap.load(name)
        return []
    except Exception as e:  # noqa: BLE001 - any failure to load is what this counts
        return [f"model does not load ({type(e).__name__})"]


# ------------------------------------------------------------------------------------------------ running
def start(argv, env, tmp, tag):
    out = open(tmp / f"{tag}.out", "w")
    err = open(tmp / f"{tag}.err", "w")
    return subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, env=env, stdout=out, stderr=err)


def run_to_end(command, env, tmp, tag, timeout):
    """Run ``command`` to its end; returns (seconds to its first write, seconds in all)."""
    t0 = time.monotonic()
    proc = start(command.argv, env, tmp, tag)
    first_write = None
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if first_write is None and command.active():
            first_write = time.monotonic() - t0
        time.sleep(0.005)
    code = proc.wait(timeout)
    if code != 0:
        raise RuntimeError(f"{command.name} failed (exit {code}): {(tmp / f'{tag}.err').read_text()[-3000:]}")
    total = time.monotonic() - t0
    return (total if first_write is None else first_write), total


def kill_series(command, kills, env, tmp, rng, timeout, stats):
    """Time one run, then ``kills`` runs killed at random points; fills ``stats``."""
    command.prepare(True)
    run_to_end(command, env, tmp, f"{command.name}-cold", timeout)  # compiles: the cache makes later runs faster
    command.prepare(True)
    first_write, duration = run_to_end(command, env, tmp, f"{command.name}-first", timeout)
    stats["duration"], stats["first_write"] = duration, first_write
    stats["runs"] += 2
    finished = True
    for i in range(kills):
        tag = f"{command.name}-{i}"
        command.prepare(finished)
        proc = start(command.argv, env, tmp, tag)
        t0, started = time.monotonic(), time.time()
        # spread over the part of the run that works and writes (the start-up only imports), a little beyond
        delay = rng.uniform(command.window_start * first_write, duration * 1.05)
        deadline = time.monotonic() + delay
        snapshot = command.snapshot()
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            snapshot = command.snapshot()  # what was finished just before the kill
        finished = proc.poll() is not None
        if finished:  # a busy machine makes run times vary: aim the next kills within this shorter run
            duration = min(duration, time.monotonic() - t0)
            first_write = min(first_write, duration)
        else:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout)
        printed = (tmp / f"{tag}.out").stat().st_size > 0
        phase = "finished before the kill" if finished else command.phase(printed, started)
        stats["phases"][phase] += 1
        stats["runs"] += 1
        stats["kills"] += not finished
        if finished and code != 0:
            stats["failures"][f"exit {code} without a kill"] += 1
        for failure in command.check(snapshot, code if finished else None):
            stats["failures"][failure] += 1
    # the next run, to completion: after it nothing of the killed runs may be left
    command.prepare(finished)
    run_to_end(command, env, tmp, f"{command.name}-last", timeout)
    stats["runs"] += 1
    for path in stale_entries(*command.watch):
        stats["failures"][f"stale after the next run: {Path(path).name}"] += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="killed runs per command")
    parser.add_argument("--commands", nargs="+", default=["convert", "caption", "train"],
                        choices=["convert", "caption", "train"])
    parser.add_argument("--seed", type=int, default=0, help="the random delays")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up on a process")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    os.environ.update({"CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    print_machine()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault_injection_") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        os.environ["IMAGE_CAPTIONING_HOME"] = str(home)  # this process's loads read the same store
        env = {**os.environ, "IMAGE_CAPTIONING_OFFLINE": "1"}
        print("building the tiny model, images and training embeddings ...", flush=True)
        files, images, embeddings, tokenizer_dir, _ = build_inputs(tmp, args.kills)
        commands = {"convert": Convert(files, home), "caption": Caption(images, home, tmp / "out"),
                    "train": Train(embeddings, tokenizer_dir, files["clip"], tmp / "runs")}
        if "convert" not in args.commands:
            run_to_end(commands["convert"], env, tmp, "convert-setup", args.timeout)
        results = {}
        for name in args.commands:
            print(f"{name}: {args.kills} killed runs ...", flush=True)
            stats = {"runs": 0, "kills": 0, "phases": collections.Counter(), "failures": collections.Counter()}
            kill_series(commands[name], args.kills, env, tmp, rng, args.timeout, stats)
            results[name] = stats
    print_table(results, time.monotonic() - t_start, args)
    return 1 if any(s["failures"] for s in results.values()) else 0


def print_table(results, seconds, args):
    print(f"\nfault injection: SIGKILL at a uniform random delay from 0.9 x the first write (convert, train; caption: "
          f"0) to 1.05 x the run (timed on a warm run, shortened by runs that end sooner); seed {args.seed}")
    print(describe_machine())
    print(f"\n{'command':<9} {'one run':>8} {'1st write':>10} {'runs':>5} {'killed':>7} {'failures':>9}")
    for name, s in results.items():
        print(f"{name:<9} {s['duration']:>7.1f}s {s['first_write']:>9.1f}s {s['runs']:>5} {s['kills']:>7} "
              f"{sum(s['failures'].values()):>9}")
    print("\nkills by phase (where the process was, from what it left):")
    for name, s in results.items():
        for phase, n in sorted(s["phases"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<9} {phase:<45} {n:>4}")
    failures = [(name, kind, n) for name, s in results.items() for kind, n in s["failures"].items()]
    print("\nfailures by kind:" + ("" if failures else " none"))
    for name, kind, n in failures:
        print(f"  {name:<9} {kind:<45} {n:>4}")
    print(f"\nchecks after each kill: the model loads; map.json entries and checkpoints written before the kill "
          f"are kept; after the next run no .*.tmp, .*.old.* or *.lock is left. Total {seconds:.0f} s.")
    print("OK" if not failures else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
