"""device= / --device (utils.devices): names resolved against what TensorFlow sees, a clear error for a GPU
that is not there, identical captions when placed on the CPU explicitly."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import main
from models.image_captioning.clip_cap import ClipCap
from testing import tiny_models
from utils.devices import device_scope, resolve_device

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = bool(tf.config.list_logical_devices("GPU"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(tiny_models.shared_tiny_model(tmp_path_factory))


@pytest.mark.parametrize("name", ["cpu", "CPU", "cpu:0", "/CPU:0", " cpu "])
def test_cpu_names(name):
    assert resolve_device(name) == "/CPU:0"


def test_none_is_tensorflow_placement():
    assert resolve_device(None) is None
    with device_scope(None):
        assert float(tf.reduce_sum(tf.ones(3))) == 3.0


@pytest.mark.parametrize("name", ["tpu", "gpu:x", "cuda", "", "cpu:0:1", 0, ("gpu",)])
def test_malformed_names_are_refused(name):
    with pytest.raises(ValueError, match="device must be 'cpu', 'gpu' or 'gpu:N'"):
        resolve_device(name)


def test_missing_devices_are_errors_naming_the_visible_ones():
    with pytest.raises(ValueError, match=r"sees no CPU:7 \(visible: .*CPU:0"):
        resolve_device("cpu:7")
    with pytest.raises(ValueError, match="GPU:999" if HAS_GPU else "sees no GPU on this machine"):
        resolve_device("gpu:999")
    if not HAS_GPU:
        with pytest.raises(ValueError, match="sees no GPU on this machine"):
            resolve_device("gpu")


def test_clipcap_on_cpu_gives_the_same_captions(tiny_model):
    model = ClipCap.load(tiny_model)
    images = [ROOT / "demo" / "cat.jpg"]
    expected = model.generate(model.encode_images(images), max_length=6)  # first call: uncompiled ("auto")
    assert model.to("cpu") is model and model.device == "/CPU:0" and model.clip.device == "/CPU:0"
    again = model.generate(model.encode_images(images), max_length=6)  # compiled: scores equal to the last bits
    assert [[c["tokens"] for c in r] for r in again] == [[c["tokens"] for c in r] for r in expected]
    assert [[c["text"] for c in r] for r in again] == [[c["text"] for c in r] for r in expected]
    np.testing.assert_allclose([c["score"] for r in again for c in r], [c["score"] for r in expected for c in r],
                               rtol=0, atol=1e-5)
    results = model.predict(images, save=False, max_length=6, progress=False)
    assert [r["caption"] for r in results] == [expected[0][0]["text"]]
    if not HAS_GPU:
        with pytest.raises(ValueError, match="no GPU"):
            model.to("gpu")
        assert model.device == "/CPU:0"  # a refused device changes nothing
    assert model.to(None).device is None and model.clip.device is None


@pytest.mark.skipif(HAS_GPU, reason="checks the error of a machine without GPU")
def test_cli_device(tiny_model, tmp_path, capsys):
    code = main.main(["caption", str(ROOT / "demo" / "cat.jpg"), "--model", tiny_model, "--device", "gpu",
                      "--no-save", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and "sees no GPU" in err and out == ""
    code = main.main(["caption", str(ROOT / "demo" / "cat.jpg"), "--model", tiny_model, "--device", "cpu",
                      "--no-save", "--no-progress", "--max-length", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(str(ROOT / "demo" / "cat.jpg") + "\t")
