"""What the library writes and reads back outside model folders, tried by a careless or hostile user.

hparams.json of wrong types, an embedding cache or embeddings file crafted or truncated, a FIFO among the images
of a content-keyed extraction, an evaluation that fails after its captions were written, and results of a
random draw without a seed taken from map.json as if they answered a new draw. Light: no TensorFlow model
(fake models, numpy arrays), except the command-line check of ``train --hparams``.
"""

import json
import os
import threading
import zipfile

import numpy as np
import pytest

from datasets.caption_dataset import CaptionDataset, DatasetError
from hparams.training import TrainingHParams

# ------------------------------------------------------------------------------------------ hparams.json


@pytest.mark.parametrize("data, field", [
    ({"lr": "0.1"}, "lr"),                 # a string where a number goes: was a TypeError traceback
    ({"epochs": None}, "epochs"),          # null for a required number: TypeError traceback
    ({"normalize": "no"}, "normalize"),    # a truthy string: was silently normalize=True
    ({"prefix_only": 0}, "prefix_only"),   # 0 is not a boolean (JSON has true / false)
    ({"batch_size": 2.5}, "batch_size"),   # a fraction of a caption: was accepted
    ({"seed": "x"}, "seed"),
    ({"lr": float("nan")}, "lr"),          # NaN passes every `<= 0` check: was accepted
    ({"gradient_clip_norm": float("inf")}, "gradient_clip_norm"),
    ({"stop_token": 5}, "stop_token"),
    ({"mapping_type": ["mlp"]}, "mapping_type"),  # unhashable: was a TypeError in the registry lookup
    ({"max_length": True}, "max_length"),  # a bool is not a count
])
def test_hparams_of_a_wrong_type_are_refused_naming_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        TrainingHParams.from_dict(data)


def test_hparams_numbers_keep_working():
    hp = TrainingHParams.from_dict({"lr": 1, "weight_decay": 0, "gradient_clip_norm": 1, "max_length": 20,
                                    "stop_token": "!", "mixed_precision": None})
    assert hp.lr == 1.0 and isinstance(hp.lr, float) and isinstance(hp.gradient_clip_norm, float)
    assert hp.max_length == 20 and hp.stop_token == "!"
    assert TrainingHParams.from_dict(hp.to_dict()) == hp


@pytest.mark.parametrize("text", ['["lr"]', "5", '"lr"', "null"])
def test_an_hparams_file_that_is_not_an_object_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "hparams.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="hparams.json"):
        TrainingHParams.load(path)


def test_train_with_a_crafted_hparams_file_is_a_usage_error(tmp_path, capsys):
    """``train --hparams`` with a string for ``lr``: exit 2 naming the field (was a TypeError traceback)."""
    from main import main

    crafted = tmp_path / "hp.json"
    crafted.write_text(json.dumps({"lr": "1e-4"}))
    code = main(["train", str(tmp_path / "train.npz"), "--output", str(tmp_path / "run"), "--hparams", str(crafted),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "lr" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- embedding cache


def _cache_with_index(tmp_path, lines, shard=None):
    from datasets.embeddings import INDEX_FILENAME, EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    cache.add(["a", "b"], np.ones((2, 4)))
    if shard is not None:
        np.save(cache.directory / "shard_000000.npy", shard)
    (cache.directory / INDEX_FILENAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return cache.directory


@pytest.mark.parametrize("keys", [5, [[1], [2]], [None, "b"], {"a": 1, "b": 2}])
def test_an_index_line_with_crafted_keys_is_ignored_not_a_crash(tmp_path, keys, caplog):
    """keys that are not a list of strings: the line is ignored (its images encoded again); was a TypeError
    (``len(5)``, unhashable list keys) out of the cache's constructor."""
    from datasets.embeddings import EmbeddingCache

    _cache_with_index(tmp_path, [{"shard": "shard_000000.npy", "keys": keys}])
    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    assert len(cache) == 0 and "index line ignored" in caplog.text


@pytest.mark.parametrize("shard", [np.array([["x", "y"], ["z", "w"]]), np.ones((2, 4), np.int64),
                                   np.ones((2, 4), np.complex64)])
def test_a_shard_that_does_not_hold_float_embeddings_is_ignored(tmp_path, shard, caplog):
    """A shard of strings (or integers) where float32 embeddings go: ignored with a warning; was a ValueError
    from ``get`` (strings) or integers silently taken for embeddings."""
    from datasets.embeddings import EmbeddingCache

    _cache_with_index(tmp_path, [{"shard": "shard_000000.npy", "keys": ["a", "b"]}], shard=shard)
    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    assert "a" not in cache and "float" in caplog.text


def test_a_users_file_named_like_a_shard_does_not_break_the_cache(tmp_path):
    """``shard_notes.npy`` left in the cache folder: new shards are numbered past the cache's own, the user's
    file is untouched (was a ValueError from ``int("notes")`` at every add)."""
    from datasets.embeddings import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    (cache.directory / "shard_notes.npy").write_bytes(b"mine")
    cache.add(["a"], np.ones((1, 3)))
    again = EmbeddingCache(tmp_path / "cache", "model-a")
    assert "a" in again and (cache.directory / "shard_notes.npy").read_bytes() == b"mine"


def test_content_key_of_a_fifo_is_refused_without_blocking(tmp_path):
    """``key_mode="content"`` hashes the file: a FIFO named like an image blocked the extraction forever (open
    waits for a writer) and ``/dev/zero`` was hashed without end; only regular files are read."""
    from datasets.embeddings import image_key
    from utils.file_utils import UnsafePathError

    fifo = tmp_path / "cat.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def key():
        try:
            outcome["key"] = image_key(fifo, "content")
        except Exception as e:  # noqa: BLE001 (the test checks which)
            outcome["error"] = e

    thread = threading.Thread(target=key, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the old code's open() so that the thread ends
        with open(fifo, "wb"):
            pass
        thread.join(10)
        pytest.fail("image_key blocked on a FIFO")
    assert isinstance(outcome.get("error"), UnsafePathError), outcome
    if os.path.exists("/dev/zero"):
        with pytest.raises(UnsafePathError, match="not a regular file"):
            image_key("/dev/zero", "content")


# ------------------------------------------------------------------------------------ embeddings .npz file


_ARRAYS = dict(embeddings=np.ones((1, 4), np.float32), image_index=np.zeros(1, np.int64),
               images=np.array(["a.jpg"]), captions=np.array(["a cat"]))
_META = json.dumps({"name": "x", "model_id": "m", "image_ids": [1], "failed": {}})


def _npz(path, **overrides):
    arrays = {**_ARRAYS, "meta": np.asarray(_META), **overrides}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("overrides, expected", [
    ({"meta": np.asarray("5")}, "meta"),                                   # was TypeError: int not subscriptable
    ({"meta": np.asarray("[" * 5000 + "]" * 5000)}, "meta"),               # was RecursionError
    ({"meta": np.asarray(json.dumps({"image_ids": 7}))}, "image_ids"),     # was TypeError
    ({"meta": np.asarray(json.dumps({"image_ids": [[1]]}))}, "image_ids"),  # unhashable ids: TypeError
    ({"embeddings": np.ones(1, np.float32)}, "embeddings"),                # 1-d: an IndexError in train
    ({"embeddings": np.array([["a", "b"]])}, "embeddings"),                # strings: ValueError text
    ({"embeddings": np.ones((1, 4, 1), np.float32)}, "embeddings"),
])
def test_a_crafted_embeddings_file_is_a_dataset_error(tmp_path, overrides, expected):
    from datasets.embeddings import load_embedded_dataset

    path = _npz(tmp_path / "e.npz", **overrides)
    with pytest.raises(DatasetError, match=expected) as info:
        load_embedded_dataset(path)
    assert str(path) in str(info.value)


def _npz_with_embeddings(path, compression, shape, nbytes):
    """An embeddings .npz whose other arrays are sound and whose embeddings entry declares float32 ``shape`` in
    its header but holds ``nbytes`` zero bytes, its entries written with ``compression``."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, array in {**_ARRAYS, "meta": np.asarray(_META)}.items():
            if name != "embeddings":
                with z.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, array)
        with z.open("embeddings.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(bytes(nbytes))
    return path


def test_a_compressed_embeddings_file_is_refused_before_it_is_inflated(tmp_path):
    """`extract` writes its .npz uncompressed, so what an entry holds is what the file holds; a deflated entry
    may declare far more (a 2 MB file inflating to 2 GB of float32 was read whole): refused unread."""
    from datasets.embeddings import load_embedded_dataset

    path = _npz_with_embeddings(tmp_path / "bomb.npz", zipfile.ZIP_DEFLATED, (1, 1 << 22), 16 << 20)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match="compressed"):
        load_embedded_dataset(path)


def test_an_embeddings_file_written_by_extract_still_loads(tmp_path):
    from datasets.embeddings import ExtractionResult, load_embedded_dataset, save_embedded_dataset

    data = CaptionDataset(["a.jpg", "b.jpg"], [1, 2], ["a cat", "a dog", "two dogs"], [0, 1, 1], name="d")
    result = ExtractionResult(np.arange(8, dtype=np.float32).reshape(2, 4), np.array([0, 1]))
    path = save_embedded_dataset(tmp_path / "e.npz", data, result, "clip:v2:abc")
    loaded, embeddings, meta = load_embedded_dataset(path)
    assert loaded.captions == data.captions and embeddings.shape == (2, 4) and meta["model_id"] == "clip:v2:abc"


# ------------------------------------------------------------------------------------------------ evaluate


class _FakeCaptioner:
    name = "fake"

    def __init__(self, text):
        self.text = text

    def generate(self, embeddings, method=None):
        return [[{"text": self.text, "score": 0.0}] for _ in embeddings]


def test_a_failed_evaluation_leaves_no_metrics_of_another_run(tmp_path, monkeypatch):
    """An evaluation interrupted while scoring (SPICE's Java takes minutes; Ctrl-C) had written its captions to
    results.json beside the metrics.json of the previous evaluation (another model): a pair that read as one
    result. The stale metrics.json (a file of ours) is removed before the new results are written."""
    from custom_train_objects import evaluation

    data = CaptionDataset(["a.jpg", "b.jpg"], [1, 2], ["a cat", "a dog"], [0, 1], name="d")
    embeddings = np.ones((2, 4), np.float32)
    out = tmp_path / "eval"
    evaluation.evaluate_model(_FakeCaptioner("a cat"), data, out, embeddings=embeddings, metrics=("BLEU",))
    assert json.loads((out / "metrics.json").read_text())["model"] == "fake"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "caption_metrics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_model(_FakeCaptioner("a dog"), data, out, embeddings=embeddings, metrics=("BLEU",))
    results = json.loads((out / "results.json").read_text())
    assert [r["caption"] for r in results] == ["a dog", "a dog"]  # the captions made are kept
    assert not (out / "metrics.json").exists()  # and no metrics of the other captions beside them


# ------------------------------------------------------------------------------ map.json: unseeded draws


class _FakeClip:
    input_resolution = 8

    def image_embedder(self, **kwargs):
        from models.siamese.image_embedding import ImageEmbedder

        clip = self

        class Embedder(ImageEmbedder):
            def preprocess(self, image):
                return np.array([image.width, image.height], np.float32)

        return Embedder(clip.encode_pixels, self.input_resolution, **kwargs)

    def encode_pixels(self, pixels, compile_now=None):
        return np.asarray(pixels) * 1.0

    def will_compile(self, count, compile_now=None):
        return False


class _FakeSampler:
    """Captions a random number when no seed is given (as `ClipCap.generate` draws a new seed), else the seed."""

    name = "fake"
    identity = "sha256:fake"

    def __init__(self):
        self.clip = _FakeClip()
        self.calls = 0

    def decoder_will_compile(self, *args, **kwargs):
        return False

    def generate(self, embeddings, method=None, **kwargs):
        self.calls += 1
        seed = method.seed if method.seed is not None else int(np.random.default_rng().integers(1 << 30))
        return [[{"text": f"draw {seed}", "score": 0.0, "tokens": [1]}] for _ in embeddings]


def test_unseeded_sampling_is_never_answered_from_map_json(tmp_path):
    """``--method sample`` without ``--seed`` draws "a new random seed per run": a rerun answered it with the
    captions the first run drew (from map.json, or without the model at all), as if the same draw had been asked
    for again. Those entries are kept (the results of the run) but answer no later run; seeded ones do."""
    from PIL import Image

    from models.image_captioning.freshness import answers
    from models.image_captioning.prediction import generation_settings, load_map, predict

    image = tmp_path / "cat.png"
    Image.new("RGB", (20, 10), "red").save(image)
    out = tmp_path / "out"
    model = _FakeSampler()
    first = predict(model, [str(image)], method="sample", output_dir=out, progress=False)
    second = predict(model, [str(image)], method="sample", output_dir=out, progress=False)
    assert model.calls == 2 and not second[0]["cached"], (first, second)
    entry = load_map(out / "map.json")[str(image)]
    assert entry["caption"] == second[0]["caption"]  # the latest draw is stored
    assert not answers(entry, entry["settings"], lambda: {"size": entry["size"], "sha256": entry["sha256"]})

    seeded = [predict(model, [str(image)], method="sample", seed=3, output_dir=out, progress=False) for _ in "ab"]
    assert model.calls == 3 and seeded[1][0]["cached"] and seeded[1][0]["caption"] == "draw 3"
    greedy = generation_settings(model, "greedy", {})
    assert "unseeded" not in greedy  # deterministic methods keep the keys they had


# -------------------------------------------------------------------------------------------- training logs


def test_a_users_csv_named_like_a_training_log_is_refused_not_emptied(tmp_path):
    """``train --output ~/work`` where ``~/work/logs/steps.csv`` is the user's own table: a new run (``resume(0)``)
    rewrote it with its header alone, every row lost. Now the logger refuses it before any work."""
    from loggers.training_loggers import CSVLogger
    from utils.file_utils import UnsafePathError

    logs = tmp_path / "logs"
    logs.mkdir()
    for mine in ("step,note\n1,my own data\n2,more of it\n", "step,note\n1,my own data\n"):
        (logs / "steps.csv").write_text(mine)
        with pytest.raises(UnsafePathError, match="steps.csv"):
            CSVLogger(logs).resume(0)
        assert (logs / "steps.csv").read_text() == mine
    (logs / "steps.csv").unlink()
    (logs / "epochs.csv").mkdir()  # a folder in its place: was an IsADirectoryError in the middle of fit
    with pytest.raises(UnsafePathError, match="epochs.csv"):
        CSVLogger(logs)


def test_the_logs_of_an_earlier_run_are_still_resumed(tmp_path):
    from loggers.training_loggers import CSVLogger, is_log_file

    first = CSVLogger(tmp_path)
    for step in range(1, 6):
        first.log_step(step, {"epoch": 1, "loss": 1.0 / step, "lr": 1e-4})
    first.log_epoch(0, {"step": 5, "seconds": 1.5, "loss": 0.4, "val_loss": float("nan")})
    with open(tmp_path / "steps.csv", "a") as f:
        f.write("6,1,0.1,1e")  # a row torn by a kill in the middle of a number (1e-05)
    assert is_log_file(tmp_path / "steps.csv", "step") and is_log_file(tmp_path / "epochs.csv", "epoch")
    again = CSVLogger(tmp_path)
    again.resume(3)
    assert (tmp_path / "steps.csv").read_text().splitlines()[1:] == ["1,1,1.0,0.0001", "2,1,0.5,0.0001",
                                                                    "3,1,0.33333333,0.0001"]


# ------------------------------------------------------------------------------- map.json: int8 folders


def _int8_folder_with_answers(tmp_path):
    """A saved folder of int8 weights as `cached_answers` sees it (config.json, metadata.json: no weights are
    read) and a map.json whose entry that model made (keyed by the identity the folder records)."""
    from PIL import Image

    from models.image_captioning.freshness import file_stamp
    from models.image_captioning.prediction import generation_settings_for

    folder = tmp_path / "q8"
    folder.mkdir()
    gpt2 = {"class_name": "GPT2", "config": {"n_layer": 2, "quantization": "int8"}}
    (folder / "config.json").write_text(json.dumps({"name": "q8", "format_version": 2, "model": {
        "class_name": "ClipCapBackbone", "config": {"gpt2": gpt2}}}))
    identity = "sha256:" + "8" * 64
    (folder / "metadata.json").write_text(json.dumps({"format_version": 2, "identity": identity}))
    image = tmp_path / "cat.png"
    Image.new("RGB", (20, 10), "red").save(image)
    out = tmp_path / "out"
    out.mkdir()
    settings = generation_settings_for("q8", identity, "greedy", {"max_length": 5})
    entry = {"caption": "an int8 caption", "candidates": None, "settings": settings, **file_stamp(image)}
    (out / "map.json").write_text(json.dumps({str(image): entry}))
    return folder, image, out


def test_an_int8_folder_asked_for_float32_is_not_answered_with_its_int8_captions(tmp_path):
    """``caption --model q8 --precision float32``: the load refuses it (its float32 weights are not there), yet
    map.json answered with the int8 model's captions (exit 0) because float32 left the identity as recorded.
    And ``--precision int8`` (what it holds) was never answered: the int8 identity was keyed a second time."""
    from models.image_captioning.cached_answers import answers_from_map

    folder, image, out = _int8_folder_with_answers(tmp_path)
    ask = dict(images=[str(image)], output_dir=out, max_length=5)
    assert answers_from_map(folder, precision=None, **ask)[0]["caption"] == "an int8 caption"
    assert answers_from_map(folder, precision="int8", **ask)[0]["caption"] == "an int8 caption"
    for other in ("float32", "bfloat16"):
        assert answers_from_map(folder, precision=other, **ask) is None, other


def test_batch_keys_an_int8_folder_as_it_loads(tmp_path):
    """``batch --precision int8`` on an int8 folder keyed its records by the int8 identity hashed a second
    time (no caption's map.json entry, nor --skip-existing record, matched), and ``--precision float32`` by the
    int8 identity, though no worker can load it so: now the identity it loads with, and a ValueError (exit 3)
    before the job for float32."""
    from models.image_captioning.beam_inference import batch_settings
    from models.image_captioning.identity import recorded_identity

    folder, _, _ = _int8_folder_with_answers(tmp_path)
    identity = recorded_identity(folder)
    for precision in (None, "int8"):
        assert batch_settings(folder, "greedy", {"max_length": 5}, precision=precision)["model_identity"] == identity
    for other in ("float32", "bfloat16"):
        with pytest.raises(ValueError, match="holds int8 weights"):
            batch_settings(folder, "greedy", {"max_length": 5}, precision=other)


# --------------------------------------------------------------------- map.json: hand-edited candidates


def _float_folder_with_entry(tmp_path, candidates, argv_options):
    """A saved folder as `cached_answers` reads it (no weights) and a map.json entry that answers the command
    line ``argv_options`` for one image, with ``candidates`` as a hand-edit left them."""
    from PIL import Image

    from main import build_parser
    from models.image_captioning.freshness import file_stamp
    from models.image_captioning.prediction import generation_settings_for
    from utils.cli import decoding_from_args

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": "m", "format_version": 2, "model": {}}))
    identity = "sha256:" + "3" * 64
    (folder / "metadata.json").write_text(json.dumps({"format_version": 2, "identity": identity}))
    image = tmp_path / "cat.png"
    Image.new("RGB", (20, 10), "red").save(image)
    request = decoding_from_args(build_parser().parse_args(["caption", str(image), *argv_options]))
    settings = generation_settings_for("m", identity, request.method, request.given)
    out = tmp_path / "out"
    out.mkdir()
    entry = {"caption": "a red square", "settings": settings, **file_stamp(image)}
    if candidates != "absent":
        entry["candidates"] = candidates
    (out / "map.json").write_text(json.dumps({str(image): entry}))
    return ["caption", str(image), "--model", str(folder), "--output-dir", str(out), "--no-progress",
            *argv_options]


@pytest.mark.parametrize("candidates", [[1, 2], [{"score": 0.0}], [{"text": 5, "score": 0.0}]])
def test_a_hand_edited_candidate_list_is_a_clear_error_not_a_traceback(tmp_path, capsys, candidates):
    """``caption --num-captions 2`` answered from a map.json whose candidates were edited into numbers: a
    TypeError traceback while printing; now map.json is refused as malformed (exit 2, the entry named)."""
    from main import main

    argv = _float_folder_with_entry(tmp_path, candidates, ["--method", "beam", "--num-captions", "2"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a caption entry" in err and "cat.png" in err and "Traceback" not in err, err


@pytest.mark.parametrize("candidates", [None, "absent"])
def test_an_entry_without_candidates_prints_its_caption(tmp_path, capsys, candidates):
    """The same entry with no candidates at all (``null``, or none stored): its caption, numbered 1 (was
    ``enumerate(None)``: a TypeError traceback)."""
    from main import main

    argv = _float_folder_with_entry(tmp_path, candidates, ["--method", "beam", "--num-captions", "2"])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{tmp_path / 'cat.png'}\t1\ta red square"] and "Traceback" not in err, err


def test_an_embeddings_entry_declaring_more_than_it_holds_is_refused_unallocated(tmp_path):
    """An .npy header in the .npz may declare any shape: numpy allocated it before reading (a MemoryError
    traceback for terabytes); the declared size is checked against what the entry holds first."""
    from datasets.embeddings import load_embedded_dataset

    path = _npz_with_embeddings(tmp_path / "liar.npz", zipfile.ZIP_STORED, (1 << 20, 1 << 20), 64)
    with pytest.raises(DatasetError, match="declares"):
        load_embedded_dataset(path)


# ------------------------------------------------------------------------------------- extract's cache


def test_extract_with_a_damaged_cache_is_a_clear_error(tmp_path, capsys):
    """The cache folder of this CLIP holding shards of two widths (or a model.json of another model): the
    cache raises a DatasetError naming its folder, which ``extract`` let out as a traceback."""
    from datasets.embeddings import EmbeddingCache, clip_model_id
    from datasets.synthetic_shapes import make_shapes_dataset
    from main import main
    from models.siamese.clip import CLIP
    from testing.tiny_models import build_tiny_clip

    clip_path = build_tiny_clip(tmp_path / "clip.pt")
    make_shapes_dataset(tmp_path / "data", num_images=2, seed=0, image_size=32)
    cache = EmbeddingCache(tmp_path / "cache", clip_model_id(CLIP.from_pretrained(str(clip_path))))
    cache.add(["x"], np.ones((1, 4)))
    np.save(cache.directory / "shard_000001.npy", np.ones((1, 5), np.float32))
    with open(cache.directory / "index.jsonl", "a") as f:
        f.write(json.dumps({"shard": "shard_000001.npy", "keys": ["y"]}) + "\n")
    code = main(["extract", str(tmp_path / "data" / "captions.json"), "--clip", str(clip_path), "--output",
                 str(tmp_path / "e.npz"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "shards of different widths" in err and "Traceback" not in err, err
    assert not (tmp_path / "e.npz").exists()


def test_a_file_where_the_tensorboard_folder_goes_is_refused_clearly(tmp_path):
    """``<run>/tensorboard`` a regular file (or a dangling link): TensorFlow's FailedPreconditionError ("Not a
    directory"), which ``train`` does not catch, came out of the trainer's constructor as a traceback."""
    from loggers.training_loggers import build_loggers
    from utils.file_utils import UnsafePathError

    (tmp_path / "tensorboard").write_text("mine")
    with pytest.raises(UnsafePathError, match="tensorboard"):
        build_loggers(tmp_path, console=False, csv=False)
    assert (tmp_path / "tensorboard").read_text() == "mine"
    (tmp_path / "tensorboard").unlink()
    (tmp_path / "tensorboard").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError, match="dangling"):
        build_loggers(tmp_path, console=False, csv=False)


@pytest.mark.parametrize("bad", [-1, 0, 2.5, "2", True])
def test_a_batch_size_that_is_no_positive_integer_is_named(tiny_clipcap, tmp_path, bad):
    """``generate_captions(..., batch_size=-1)`` returned no caption at all (and `evaluate_model` would have
    written empty results); ``predict(batch_size=2.5)`` raised "'float' object cannot be interpreted as an
    integer", naming nothing. Each now raises a ValueError naming batch_size, before any work."""
    import numpy as np

    from custom_train_objects.evaluation import generate_captions
    from models.image_captioning.prediction import predict

    embeddings = np.zeros((2, tiny_clipcap.mapper.prefix_size), np.float32)
    with pytest.raises(ValueError, match="batch_size must be"):
        generate_captions(tiny_clipcap, embeddings, batch_size=bad, max_length=3)
    with pytest.raises(ValueError, match="batch_size must be"):
        predict(tiny_clipcap, [np.zeros((8, 8, 3), np.uint8)], batch_size=bad, save=False)
    with pytest.raises(ValueError, match="batch_size must be"):
        tiny_clipcap.clip.encode_image([np.zeros((8, 8, 3), np.uint8)], batch_size=bad)
