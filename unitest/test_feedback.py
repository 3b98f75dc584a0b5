"""What the CLI says while it works: ``caption`` says what it is about to do before the first batch, each
stage of a one-batch run (its progress bar would appear only at the end) and where the captions went;
``convert`` shows its steps and ends with the command that captions with the new model."""

from pathlib import Path

import main

ROOT = Path(__file__).resolve().parents[1]


def _in_order(lines, expected):
    """Whether every line of ``expected`` is in ``lines``, in that order; the positions."""
    positions = [lines.index(line) for line in expected]
    return positions == sorted(positions)


def test_caption_says_what_happens_then_where_the_captions_are(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    images = [str(ROOT / "demo" / name) for name in ("cat.jpg", "rocket.jpg")]
    output = tmp_path / "out"
    code = main.main(["caption", *images, "--model", str(tiny_model_dir), "--max-length", "3",
                      "--output-dir", str(output)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = err.splitlines()
    expected = ["captioning 2 image(s), batches of 16, greedy, max_length=3",
                "encoding 2 image(s) with CLIP ...",
                "decoding 2 caption(s) (greedy, max_length=3) ...",
                f"captions saved in {output / 'map.json'}"]
    assert _in_order(lines, expected), err
    assert lines.index(expected[0]) > next(i for i, line in enumerate(lines) if " loaded in " in line)
    # a rerun answered from map.json: nothing to caption, nothing said about saving
    assert main.main(["caption", *images, "--model", str(tiny_model_dir), "--max-length", "3",
                      "--output-dir", str(output)]) == 0
    assert "captions saved" not in capsys.readouterr().err


def test_convert_shows_its_steps_and_the_next_command(tiny_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    code = main.main(["convert", str(tiny_files["checkpoint"]), "--clip", str(tiny_files["clip"]),
                      "--tokenizer", str(tiny_files["tokenizer"]), "--name", "mine"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(tmp_path / "home" / "mine")  # stdout: the folder alone, as before
    lines = err.splitlines()
    steps = [f"reading the GPT-2 tokenizer {tiny_files['tokenizer']} ...",
             f"reading and converting the CLIP {tiny_files['clip']} (image and text encoders) ...",
             f"reading and converting the ClipCap checkpoint {tiny_files['checkpoint']} (mapper and GPT-2) ...",
             f"saving {tmp_path / 'home' / 'mine'} ..."]
    assert _in_order(lines, steps), err
    assert lines[-1] == "  python main.py caption IMAGES --model mine" and lines[-2].startswith("converted in ")
