"""``main.py train --strategy multiworker`` for real: two worker processes on 127.0.0.1 (``TF_CONFIG``).

Both workers run the training command with MultiWorkerMirroredStrategy (one CPU replica each) on the
synthetic shapes; a one-process run (``--strategy default``) trains on the same data, order and global
batch. The trainer feeds ``experimental_distribute_dataset`` the globally batched dataset: tf.data's
auto-shard policy (AUTO: no file source, so DATA) splits every global batch into one half per worker, and
the loss of each replica is divided by the *global* token count, so the summed gradients are those of the
global batch. Both workers are given the same ``--output``: the chief writes there, worker 1 in
``worker-1/`` below it. The workers stop after 3 of the 6 steps (``--stop-after-steps``) and the same
commands resume them from their checkpoints. After the run both workers must hold the same weights and optimizer state (bit for bit) and
the per-step losses and final weights must match the one-process run within float32 tolerance.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets.embeddings import ExtractionResult, save_embedded_dataset
from datasets.synthetic_shapes import make_shapes_dataset, shape_features, train_shapes_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GPT2 = dict(n_positions=48, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
TIMEOUT = 420


def _free_ports(n):
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _steps(run):
    with open(run / "logs" / "steps.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _variables(run):
    """Every variable of the latest checkpoint: the weights file's datasets and the training state."""
    import h5py

    (checkpoint,) = sorted((run / "checkpoints").glob("ckpt-*"))[-1:]
    with np.load(checkpoint / "training_state.npz") as f:
        values = {f"state/{k}": f[k] for k in f.files}
    with h5py.File(checkpoint / "model.weights.h5", "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return values


@pytest.fixture(scope="module")
def embeddings_file(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("multiworker")
    data = make_shapes_dataset(root / "train", num_images=120, seed=0, image_size=32)
    features = shape_features([Image.open(p) for p in data.images])
    result = ExtractionResult(features, np.arange(data.num_images))
    path = save_embedded_dataset(root / "train.npz", data, result, "shapes-features")
    tokenizer = root / "tokenizer"
    train_shapes_tokenizer(tokenizer).save_pretrained(str(tokenizer))
    return root, path, tokenizer


def _run_workers(command, env, root, name):
    """Both workers (fresh free ports), one --output; returns their exit codes (logs in root/<name><i>.log)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    try:
        for index in range(2):
            worker_env = dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                                         "task": {"type": "worker", "index": index}}))
            log = open(root / f"{name}{index}.log", "w")
            workers.append((subprocess.Popen(command + ["--strategy", "multiworker", "--output", str(root / "mw")],
                                             env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        return [p.wait(timeout=TIMEOUT) for p, _ in workers]
    finally:
        for p, log in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def _tails(root, name):
    return "\n\n".join((root / f"{name}{i}.log").read_text()[-3000:] for i in range(2))


def test_two_workers_hold_identical_weights_and_match_one_process(embeddings_file):
    root, data, tokenizer = embeddings_file
    command = [sys.executable, str(ROOT / "main.py"), "-v", "train", str(data), "--tokenizer", str(tokenizer),
               "--gpt2-config", json.dumps(GPT2), "--epochs", "1", "--batch-size", "20", "--lr", "3e-3",
               "--warmup-steps", "2", "--prefix-length", "4", "--gradient-clip-norm", "0.5", "--log-every", "1",
               "--no-progress"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    single_log = open(root / "single.log", "w")
    single = subprocess.Popen(command + ["--strategy", "default", "--output", str(root / "single")], env=env,
                              stdout=single_log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        # stopped after 3 of the 6 steps (checkpoint written), then resumed by the same commands
        first = _run_workers(command + ["--stop-after-steps", "3"], env, root, "stopped")
        assert first == [0, 0], _tails(root, "stopped")
        assert all("stopped after 3 steps" in (root / f"stopped{i}.log").read_text() for i in range(2))
        assert _run_workers(command, env, root, "worker") == [0, 0], _tails(root, "worker")
        single.wait(timeout=TIMEOUT)
    finally:
        if single.poll() is None:
            single.kill()
            single.wait()
        single_log.close()
    single_err = (root / "single.log").read_text()
    assert single.returncode == 0, single_err[-3000:]
    logs = [(root / f"worker{i}.log").read_text() for i in range(2)]
    assert all("resumed from" in log for log in logs)

    steps = 120 // 20
    reference = _steps(root / "single")
    # one --output for both: the chief writes there, worker 1 below it (never into the chief's files)
    runs = [root / "mw", root / "mw" / "worker-1"]
    losses = [_steps(run) for run in runs]
    assert len(reference) == steps and reference[-1] < reference[0]
    assert losses[0] == losses[1]  # the loss is reduced over both workers: the same number on each
    np.testing.assert_allclose(losses[0], reference, rtol=2e-6, atol=0)

    w0, w1, one = _variables(runs[0]), _variables(runs[1]), _variables(root / "single")
    assert (runs[0] / "model" / "config.json").is_file() and (runs[1] / "model" / "config.json").is_file()
    assert set(w0) == set(w1) == set(one)
    moved = 0
    for key in sorted(one):
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)  # every variable, optimizer state too
        np.testing.assert_allclose(w0[key], one[key], rtol=0, atol=1e-6, err_msg=key)
        moved += not key.startswith("state/")  # a weight of the model
    assert moved > 0
    print(f"losses {reference}; largest relative loss difference to one process "
          f"{max(abs(a - b) / abs(b) for a, b in zip(losses[0], reference)):.2e}, largest weight difference "
          f"{max(float(np.abs(w0[k] - one[k]).max()) for k in one):.2e}")
    # the two workers really formed one cluster of two replicas (the trainer logs it at INFO, -v)
    assert all("replicas=2" in log for log in logs) and "replicas=1" in single_err
