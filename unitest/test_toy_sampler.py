"""A decoding method added from inside a test, with no other file touched: one sampler class declaring one
new option, entered in `SAMPLERS`, works through ``ClipCap.generate`` / ``caption``, a saved and loaded
model, the command line (``main.py caption --method toy --toy-option 3``, its flag made from the
declaration), the web demo's controls and the serving export. The registration is removed after each test
(``monkeypatch``).

The command line runs in this process (``main.main``): a method registered by Python code exists in the
processes that run that code, so another process sees it only when it imports the module that registers it.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from custom_architectures.decoding_options import Control, Option
from custom_architectures.samplers import SAMPLERS, Greedy
from testing.tiny_models import DEMO_DIR

PHOTOS = [str(p) for p in sorted(DEMO_DIR.glob("*.jpg"))[:2]]
MAX_LENGTH = 6

#: the new option: declared once, read by generate, the command line, the web demo and the export
TOY_OPTION = Option("toy_option", int, 2, "which token to take at each step: the N-th most likely (1: greedy)",
                    minimum=1, control=Control(1, 5, 1, label="toy rank"))


class RankN(Greedy):
    """Takes the ``toy_option``-th most likely token at every step (1: greedy): one caption per image, in the
    compiled loop (so servable), validated by its declaration in the constructor."""

    options = (TOY_OPTION,)
    summary = "the N-th most likely token, see --toy-option"

    def __init__(self, toy_option=None, num_captions=None):
        super().__init__(num_captions)
        self.rank = TOY_OPTION.validate(toy_option)

    def choose(self, logits, seed, step):
        import tensorflow as tf

        return tf.math.top_k(logits, self.rank).indices[:, -1]


@pytest.fixture
def toy(monkeypatch):
    """"toy" registered for one test; `monkeypatch` takes it out again."""
    monkeypatch.setitem(SAMPLERS, "toy", RankN)
    yield "toy"
    assert "toy" in SAMPLERS  # still there during teardown: monkeypatch removes it after this


def _texts(results):
    return [candidates[0]["text"] for candidates in results]


def test_generate_and_caption_take_the_new_option(toy, tiny_clipcap):
    model = tiny_clipcap
    embeddings = model.encode_images(PHOTOS)
    greedy = model.generate(embeddings, method="greedy", max_length=MAX_LENGTH)
    first = model.generate(embeddings, method=toy, toy_option=1, max_length=MAX_LENGTH)
    assert [[c["tokens"] for c in g] for g in first] == [[c["tokens"] for c in g] for g in greedy]
    third = model.generate(embeddings, method=toy, toy_option=3, max_length=MAX_LENGTH)
    assert _texts(third) != _texts(greedy)  # the option reached the sampler
    assert model.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH) == _texts(third)
    default = model.generate(embeddings, method=toy, max_length=MAX_LENGTH)  # the declared default: 2
    assert _texts(default) == _texts(model.generate(embeddings, method=toy, toy_option=2, max_length=MAX_LENGTH))
    with pytest.raises(ValueError, match="toy_option must be >= 1, got 0"):
        model.generate(embeddings, method=toy, toy_option=0)
    with pytest.raises(ValueError, match="toy_option apply to method='toy', not 'beam'"):
        model.generate(embeddings, method="beam", toy_option=3)


def test_a_saved_and_loaded_model_decodes_with_it(toy, tiny_clipcap, tmp_path):
    from models.image_captioning.clip_cap import ClipCap

    expected = tiny_clipcap.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH)
    loaded = ClipCap.load(tiny_clipcap.save(tmp_path / "saved"))
    assert loaded.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH) == expected
    results = loaded.predict(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH, output_dir=tmp_path / "out",
                             progress=False)
    assert [r["caption"] for r in results] == expected
    settings = next(iter(json.loads((tmp_path / "out" / "map.json").read_text()).values()))["settings"]
    assert settings["method"] == "toy" and settings["toy_option"] == 3  # stored results are keyed by it


def test_the_command_line_has_its_flag(toy, tiny_model_dir, tiny_clipcap, capsys):
    import main

    caption = main.build_parser()._subparsers._group_actions[0].choices["caption"]
    flag = next(a for a in caption._actions if "--toy-option" in a.option_strings)
    assert flag.type is int and "N-th most likely" in flag.help and "(default: 2)" in flag.help
    assert "toy (the N-th most likely token" in caption.format_help()
    argv = ["caption", *PHOTOS, "--model", str(tiny_model_dir), "--max-length", str(MAX_LENGTH), "--no-save",
            "--no-progress", "--method", "toy"]
    assert main.main([*argv, "--toy-option", "3"]) == 0
    expected = tiny_clipcap.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH)
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{c}" for p, c in zip(PHOTOS, expected)]
    assert main.main([*argv, "--toy-option", "0"]) == 2  # checked before anything is loaded
    assert "toy_option must be >= 1" in capsys.readouterr().err
    assert main.main(["caption", PHOTOS[0], "--method", "beam", "--toy-option", "3", "--no-save"]) == 2
    assert "toy_option apply to method='toy'" in capsys.readouterr().err


def test_the_web_demo_has_its_control_and_passes_it_on(toy, tiny_clipcap):
    from models.image_captioning.web_demo import Captioner, demo_options

    option, methods = demo_options()["toy_option"]
    assert option is TOY_OPTION and methods == ("toy",)  # shown for the toy method alone
    rows = Captioner(tiny_clipcap).caption(PHOTOS, method=toy, toy_option=3.0, max_length=MAX_LENGTH)
    expected = tiny_clipcap.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH)
    assert [row["candidates"][0]["text"] for row in rows] == expected
    hidden = Captioner(tiny_clipcap).caption(PHOTOS, method="greedy", toy_option=3, max_length=MAX_LENGTH)
    assert [row["candidates"][0]["text"] for row in hidden] == tiny_clipcap.caption(PHOTOS, max_length=MAX_LENGTH)


def test_the_web_page_has_its_control(toy, tiny_clipcap):
    pytest.importorskip("gradio")
    from models.image_captioning.web_demo import build_demo

    demo = build_demo(tiny_clipcap)
    controls = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    slider = controls["toy-option"]
    assert (slider.minimum, slider.maximum, slider.step, slider.value) == (1, 5, 1, 2)
    assert slider.label == "toy rank" and slider.visible is False  # the page opens on greedy


def test_the_serving_export_decodes_with_it(toy, tiny_clipcap, tiny_model_dir, tmp_path):
    import tensorflow as tf

    import main

    out = tmp_path / "export"
    argv = ["export", str(tiny_model_dir), str(out), "--method", "toy", "--toy-option", "3", "--max-length",
            str(MAX_LENGTH), "--max-batch-size", "2"]
    assert main.main(argv) == 0
    metadata = json.loads((out / "assets.extra" / "clipcap_serving.json").read_text())
    assert metadata["method"] == "toy" and metadata["toy_option"] == 3 and metadata["beam_size"] is None
    served = tf.saved_model.load(str(out)).signatures["serving_default"](
        images=tf.constant([Path(p).read_bytes() for p in PHOTOS]))
    captions = [t.decode("utf-8") for t in served["captions"].numpy()]
    assert captions == tiny_clipcap.caption(PHOTOS, method=toy, toy_option=3, max_length=MAX_LENGTH)
    assert np.all(np.isfinite(served["scores"].numpy()))


def test_a_run_checks_its_decoding_arguments_once(monkeypatch, tiny_model_dir, capsys):
    """``main.py caption`` over two batches builds (and so checks) its sampler once, at the entry, and carries
    it to every batch (it was built three times and more: the command, ``predict``, each ``generate``)."""
    import main

    built = []

    class Counted(Greedy):
        def __init__(self, num_captions=None):
            built.append(num_captions)
            super().__init__(num_captions)

    monkeypatch.setitem(SAMPLERS, "greedy", Counted)
    argv = ["caption", *PHOTOS, "--model", str(tiny_model_dir), "--batch-size", "1", "--max-length", "3",
            "--no-save", "--no-progress"]
    assert main.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(PHOTOS) and len(built) == 1
