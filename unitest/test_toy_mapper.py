"""A new mapper type needs its class and one registry entry, nothing else: the proof.

`ToyMapper` is written here, in the test, and entered in `mapper_registry.MAPPERS` for the module's tests
only (removed after). With no other file touched it works through every path a mapper takes: `ClipCap` built
on it (generate), save / load (the same tokens), the training command (``--mapping-type toy``: the choices
and the model factory read the registry and the class's constructor), the CLI's ``caption`` on the trained
model, and the serving SavedModel (its ``embeddings`` and image-bytes signatures caption as `ClipCap` does).
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from custom_architectures.transformers_arch.mapper_registry import MAPPERS, MapperType, mapper_arguments
from datasets.synthetic_shapes import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("isolated_home")  # conftest: a per-test model store, offline
TINY_GPT2 = dict(n_positions=48, n_embd=64, n_layer=2, n_head=4)
PREFIX = 3


@keras.saving.register_keras_serializable(package="image_captioning_toy")
class ToyMapper(keras.Model):
    """Linear(D -> width) -> tanh -> Linear(-> K*C), reshaped to (K, C): a mapper of the test's own."""

    def __init__(self, prefix_size, prefix_length, n_embd, width=16, **kwargs):
        super().__init__(**kwargs)
        self.prefix_size, self.prefix_length, self.n_embd, self.width = prefix_size, prefix_length, n_embd, width
        self.hidden = keras.layers.Dense(width, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(prefix_length * n_embd, name="out")
        self.hidden.build((None, prefix_size))
        self.out.build((None, width))
        self.built = True

    def call(self, embeddings):
        x = self.out(self.hidden(keras.ops.convert_to_tensor(embeddings, "float32")))  # (B, K*C)
        return keras.ops.reshape(x, (-1, self.prefix_length, self.n_embd))  # (B, K, C)

    def get_config(self):
        config = super().get_config()
        config.update(prefix_size=self.prefix_size, prefix_length=self.prefix_length, n_embd=self.n_embd,
                      width=self.width)
        return config


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    """"toy" in the registry for this module's tests only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MAPPERS, "toy", MapperType(ToyMapper))
        yield
    assert "toy" not in MAPPERS


def test_the_registry_is_read_without_keras():
    """The command line lists the mapper types (``--mapping-type`` choices) without importing Keras."""
    code = ("import sys, main, hparams.training as h; from custom_architectures.transformers_arch.mapper_registry "
            "import MAPPERS; assert tuple(MAPPERS) == ('mlp', 'linear', 'transformer'); "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _captions(results):
    return [[c["tokens"] for c in r] for r in results]


def test_a_backbone_on_the_toy_mapper_generates_and_saves(tiny_files, tmp_path):
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone, build_mapper
    from custom_architectures.transformers_arch.gpt2_arch import GPT2
    from models.image_captioning.clip_cap import ClipCap
    from utils.tokenizer import load_gpt2_tokenizer

    assert mapper_arguments("toy") == ("prefix_size", "prefix_length", "n_embd", "width")
    tokenizer = load_gpt2_tokenizer(tiny_files["tokenizer"])
    keras.utils.set_random_seed(0)
    mapper = build_mapper("toy", prefix_size=32, prefix_length=PREFIX, n_embd=64, width=8)
    model = ClipCap(ClipCapBackbone(mapper, GPT2(vocab_size=len(tokenizer), **TINY_GPT2, initializer_range=0.2)),
                    tokenizer)
    assert model.config["mapping_type"] == "toy" and model.config["width"] == 8
    embeddings = np.random.default_rng(0).normal(size=(3, 32)).astype("float32")
    expected = model.generate(embeddings, max_length=8)
    assert all(r[0]["tokens"] for r in expected)
    model.save(tmp_path / "toy")
    loaded = ClipCap.load(str(tmp_path / "toy"))
    assert type(loaded.mapper) is ToyMapper and {**loaded.config, "name": None} == dict(model.config)
    assert _captions(loaded.generate(embeddings, max_length=8)) == _captions(expected)
    beam = dict(method="beam", beam_size=2, num_captions=2, max_length=8)
    assert _captions(loaded.generate(embeddings, **beam)) == _captions(model.generate(embeddings, **beam))
    from utils.convert.clipcap_export import mapper_state_dict  # the official .pt: only the official mappers

    with pytest.raises(ValueError, match="'toy' mapper has no official checkpoint format"):
        mapper_state_dict(loaded.mapper, loaded.config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The toy mapper trained by the ``train`` command on the synthetic shapes (embedded by the tiny CLIP):
    {"model": saved folder, "images": a few image paths}."""
    from main import main
    from testing.tiny_models import shared_tiny_files

    files = shared_tiny_files(tmp_path_factory)
    root = tmp_path_factory.mktemp("toy_training")
    data = make_shapes_dataset(root / "train", num_images=40, seed=0, image_size=32)
    embedded = root / "train.npz"
    assert main(["extract", str(root / "train" / "captions.json"), "--clip", str(files["clip"]), "--output",
                 str(embedded), "--cache-dir", str(root / "cache"), "--no-progress"]) == 0
    assert main(["train", str(embedded), "--tokenizer", str(files["tokenizer"]), "--gpt2-config",
                 json.dumps(TINY_GPT2), "--clip", str(files["clip"]), "--output", str(root / "run"), "--epochs", "1",
                 "--batch-size", "10", "--lr", "1e-3", "--warmup-steps", "2", "--prefix-length", str(PREFIX),
                 "--mapping-type", "toy", "--no-progress"]) == 0
    images = root / "images"
    images.mkdir()
    for path in data.images[:3]:  # PNG: lossless, the same pixels for PIL and the serving graph
        Image.open(path).convert("RGB").resize((48, 40)).save(images / f"{Path(path).stem}.png")
    return {"model": root / "run" / "model", "images": sorted(images.iterdir()), "root": root}


def test_the_train_command_trains_and_saves_the_toy_mapper(trained):
    from models.image_captioning.clip_cap import ClipCap

    hparams = json.loads((trained["model"].parent / "hparams.json").read_text())
    assert hparams["mapping_type"] == "toy"
    model = ClipCap.load(str(trained["model"]))
    assert type(model.mapper) is ToyMapper and model.prefix_length == PREFIX and model.mapper.width == 16
    assert model.clip is not None
    model.save(trained["root"] / "again")  # save / load of a trained toy: the same tokens
    again = ClipCap.load(str(trained["root"] / "again"))
    embeddings = model.encode_images([str(p) for p in trained["images"]])
    assert _captions(again.generate(embeddings, max_length=8)) == _captions(model.generate(embeddings, max_length=8))


def test_the_caption_command_runs_the_toy_model(trained, capsys):
    from main import main
    from models.image_captioning.clip_cap import ClipCap

    paths = [str(p) for p in trained["images"]]
    assert main(["caption", *paths, "--model", str(trained["model"]), "--max-length", "8", "--no-progress",
                 "--output-dir", str(trained["root"] / "outputs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = ClipCap.load(str(trained["model"])).caption(paths, max_length=8)
    assert [line.split("\t", 1) for line in lines] == [[p, c] for p, c in zip(paths, expected, strict=True)]


def test_the_serving_export_captions_as_the_toy_model(trained):
    import tensorflow as tf

    from main import main
    from models.image_captioning.clip_cap import ClipCap

    out = trained["root"] / "export"
    assert main(["export", str(trained["model"]), str(out), "--max-batch-size", "4", "--method", "greedy",
                 "--max-length", "8"]) == 0
    model = ClipCap.load(str(trained["model"]))
    served = tf.saved_model.load(str(out))
    images = tf.constant([p.read_bytes() for p in trained["images"]])
    by_bytes = served.signatures["serving_default"](images=images)
    captions = [c.decode() for c in by_bytes["captions"].numpy()]
    assert captions == model.caption([str(p) for p in trained["images"]], max_length=8) and any(captions)
    embeddings = model.encode_images([str(p) for p in trained["images"]])
    by_embeddings = served.signatures["embeddings"](embeddings=tf.constant(embeddings))
    expected = model.generate(embeddings, max_length=8, compile_now=True)
    assert [c.decode() for c in by_embeddings["captions"].numpy()] == [r[0]["text"] for r in expected]
    assert json.loads(served.metadata().numpy().decode())["mapping_type"] == "toy"
