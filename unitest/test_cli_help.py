"""main.py's ``--help`` and text output: every option explains itself and shows its default, each command's
epilog is its own, ``--num-captions`` prints every caption, and the offline error reads as lines at a terminal
and points to the ``convert`` route."""

import argparse
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import main
from utils.cli import escape_field

ROOT = Path(__file__).resolve().parents[1]

#: options whose default is None but means a value, which --help must state (issue 23's list)
DECODING_DEFAULTS = ("--beam-size", "--max-length", "--temperature", "--top-k", "--top-p", "--num-captions",
                     "--seed")


def _commands():
    """{name: subparser} of main.py."""
    return dict(main.build_parser()._subparsers._group_actions[0].choices)


def _options(parser):
    """The optional arguments of ``parser`` (not -h), as argparse actions."""
    return [a for a in parser._actions if a.option_strings and a.option_strings[0] not in ("-h", "--help")]


def _shown_help(parser, action):
    """The help text --help shows for ``action`` (the formatter's default suffix included)."""
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_says_what_it_does_and_its_default(command):
    parser = _commands()[command]
    for action in _options(parser):
        name = action.option_strings[-1]
        shown = _shown_help(parser, action)
        what = re.sub(r"\(default:[^)]*\)", "", shown).strip()
        assert what, f"{command} {name}: no help saying what it does"
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            assert "default" in shown, f"{command} {name}: default {action.default!r} not shown in {shown!r}"
        if name in DECODING_DEFAULTS:
            assert "(default:" in shown, f"{command} {name}: no default in {shown!r}"


def test_each_epilog_is_about_its_own_command():
    commands = _commands()
    epilogs = {name: sub.epilog or "" for name, sub in commands.items()}
    for name, text in epilogs.items():
        assert f"main.py {name}" in text, f"{name}'s epilog has no example of {name}"
        assert "exit codes:" in text and "IMAGE_CAPTIONING_HOME" in text, name
    assert len(set(epilogs.values())) == len(epilogs), "two commands share an epilog"
    assert "output lines:" in epilogs["caption"] and "output lines:" not in epilogs["convert"]


def test_num_captions_prints_every_caption_numbered(tiny_model_dir, capsys):
    argv = ["caption", str(ROOT / "demo" / "cat.jpg"), str(ROOT / "demo" / "rocket.jpg"), "--model",
            str(tiny_model_dir), "--method", "beam", "--beam-size", "3", "--num-captions", "3", "--max-length", "4",
            "--no-save", "--no-progress"]
    assert main.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main.main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = [f"{escape_field(r['image'])}\t{rank}\t{escape_field(c['text'])}"
                for r in results for rank, c in enumerate(r["candidates"], 1)]
    assert len(expected) == 6 and lines == expected
    # one caption: the one-column format as before
    assert main.main([*argv[:5], "--max-length", "4", "--no-save", "--no-progress"]) == 0
    single = capsys.readouterr().out.splitlines()
    assert len(single) == 2 and all(line.count("\t") == 1 for line in single)


def _offline_caption(home, stderr):
    env = {**os.environ, "IMAGE_CAPTIONING_HOME": str(home), "IMAGE_CAPTIONING_OFFLINE": "1"}
    return subprocess.run([sys.executable, "main.py", "caption", "demo/cat.jpg", "--model", "coco"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=stderr, timeout=300)


def test_offline_error_is_lines_at_a_terminal_and_names_the_convert_route(tmp_path):
    master, slave = pty.openpty()
    try:
        result = _offline_caption(tmp_path / "home", slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child's side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    assert result.returncode == 3, text
    assert "\\n" not in text, text  # no escaped line breaks at a terminal
    lines = text.splitlines()
    assert any(line.startswith("error: cannot load model 'coco'") for line in lines), text
    assert any(line.strip().startswith("- coco_weights.pt is not in the cache") for line in lines), text
    assert any("python main.py convert <path to coco_weights.pt> --clip <path to ViT-B-32.pt> --tokenizer" in line
               for line in lines), text
    assert any(line.strip() == "python main.py caption IMAGES --model my_coco" for line in lines), text
    assert max(len(line) for line in lines) < 400, "still one long line"

    # piped (a script reads it): one error line, as before
    piped = _offline_caption(tmp_path / "home", subprocess.PIPE)
    errors = [line for line in piped.stderr.decode().splitlines() if line.startswith("error:")]
    assert piped.returncode == 3 and len(errors) == 1 and "python main.py convert" in errors[0]
