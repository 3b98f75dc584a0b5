"""Peak memory of a serving SavedModel's ``serving_default`` calls, in a process without this repository.

Run by `unitest/test_serving.py` as ``python -I savedmodel_memory_client.py SAVEDMODEL REQUEST.json OUT.json
LIMIT_MB`` from a temporary working directory (``-I``: the repository is not on ``sys.path``, as in
`unitest/savedmodel_client.py`). REQUEST.json is a list of batches, each a list of image file paths; each batch
is one call. OUT.json: per batch its captions, scores and the process's peak resident memory after the call
(``VmHWM``, MB). A watchdog stops the process (exit 3, OUT.json says so) when its resident memory passes
LIMIT_MB, so that a graph that decodes a decompression bomb fails the test instead of exhausting the machine.
"""

import importlib.util
import json
import os
import sys
import threading
import time

for package in ("models", "utils", "custom_architectures", "custom_layers"):
    assert importlib.util.find_spec(package) is None, f"the repository's {package!r} is importable"

import tensorflow as tf  # noqa: E402

path, request_path, out_path, limit_mb = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])


def status_mb(field):
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write(result):
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


def watchdog():
    while True:
        rss = status_mb("VmRSS")
        if rss > limit_mb:
            write({"stopped": f"resident memory {rss:.0f} MB passed the limit of {limit_mb:.0f} MB"})
            os._exit(3)
        time.sleep(0.005)


threading.Thread(target=watchdog, daemon=True).start()
with open(request_path, encoding="utf-8") as f:
    batches = json.load(f)
loaded = tf.saved_model.load(path)
serve = loaded.signatures["serving_default"]
calls = []
for batch in batches:
    images = []
    for name in batch:
        with open(name, "rb") as f:
            images.append(f.read())
    start = time.perf_counter()
    out = serve(images=tf.constant(images))
    calls.append({"captions": [c.decode() for c in out["captions"].numpy()],
                  "scores": [float(s) for s in out["scores"].numpy()],
                  "seconds": time.perf_counter() - start, "peak_mb": status_mb("VmHWM")})
write({"calls": calls})
