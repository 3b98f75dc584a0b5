"""README.md and docs/*.md against the code: every ``python main.py <command> --<option>`` they write exists in
that command's parser (and every ``main.py <command>`` names a command), and README's models table names the
files and Drive ids the model store expects. A renamed or removed option fails here, not in a reader's shell.
"""

import re
import shlex
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: where a command line ends inside a code line: a shell comment, a pipe, a chain, a redirection
_END = re.compile(r"\s(#|\|\||\||&&|;|>|2>)\s?")
#: commands that hand the options they do not know to Apache Beam (written ``--name=value``)
BEAM_COMMANDS = ("batch", "extract")


def code_of(markdown):
    """The code of a Markdown text: every fenced block's lines (a trailing backslash joins the next line)
    and every inline code span, as a list of strings."""
    code, fenced, block = [], False, []
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                code.extend(re.sub(r"\\\n\s*", " ", "\n".join(block)).split("\n"))
            fenced, block = not fenced, []
        elif fenced:
            block.append(line)
        else:
            code.extend(re.findall(r"`([^`]+)`", line))
    return code


def command_lines(markdown):
    """``(command, [options])`` for every ``main.py <command> ...`` in the code of ``markdown``; command is
    the word after ``main.py`` (placeholders such as ``<command>`` or ``COMMAND`` are left out)."""
    found = []
    for code in code_of(markdown):
        for match in re.finditer(r"main\.py((?:\s+-\S+)*)\s+(\S+)(.*)", code):
            command, rest = match.group(2), _END.split(match.group(3))[0]
            if not re.fullmatch(r"[a-z][a-z_]*", command):
                continue
            try:
                words = shlex.split(rest)
            except ValueError:  # an unbalanced quote in prose-like code: take the words as they are
                words = rest.split()
            options = [w.strip("[]").split("=")[0] for w in words if w.strip("[").startswith("--")]
            found.append((command, [o.rstrip(".,;:)") for o in options], "=" in rest))
    return found


def _parsers():
    parser = main.build_parser()
    commands = dict(parser._subparsers._group_actions[0].choices)
    return parser, commands


def unknown_in(markdown):
    """Every ``command`` or ``command --option`` written in ``markdown`` that main.py's parser lacks."""
    _, commands = _parsers()
    problems = []
    for code in code_of(markdown):
        for match in re.finditer(r"main\.py\s+(?:-\S+\s+)*(\S+)", code):
            command = match.group(1)
            if re.fullmatch(r"[a-z][a-z_]*", command) and command not in commands:
                problems.append(f"main.py {command}: no such command")
    for command, options, _ in command_lines(markdown):
        if command not in commands:
            continue  # reported above
        known = {s for a in commands[command]._actions for s in a.option_strings}
        for option in options:
            if option in known:
                continue
            if command in BEAM_COMMANDS and "_" in option or command in BEAM_COMMANDS and option in (
                    "--project", "--region", "--experiments"):
                continue  # a Beam pipeline option, passed on
            problems.append(f"main.py {command} {option}: no such option")
    return sorted(set(problems))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_and_option_written_exists(path):
    assert unknown_in(path.read_text(encoding="utf-8")) == []


def test_the_check_catches_a_missing_option_and_command():
    text = ("Run `python main.py caption demo/ --model coco --no-such-option`:\n\n```bash\n"
            "python main.py convert x.pt --clip ViT-B/32 \\\n    --tokenizer-dir tok/ --name x  # comment --ignored\n"
            "python main.py frobnicate --model coco\n```\n")
    assert unknown_in(text) == ["main.py caption --no-such-option: no such option",
                                "main.py convert --tokenizer-dir: no such option",
                                "main.py frobnicate: no such command"]
    assert unknown_in("`python main.py caption demo/ --num-captions 3 [--json]` and `main.py COMMAND --help`") == []


def test_the_docs_cover_every_command():
    written = {command for path in DOCS for command, _, _ in command_lines(path.read_text(encoding="utf-8"))}
    assert set(_parsers()[1]) <= written


def test_models_table_names_the_store_files():
    from models.image_captioning.presets import MODELS

    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \(`([^`]+)`\)", (ROOT / "README.md").read_text(), re.M)
    assert {name for name, _, _ in rows} == set(MODELS)
    for name, filename, drive_id in rows:
        assert (filename, drive_id) == (MODELS[name].checkpoint.filename, MODELS[name].checkpoint.drive_id), name


def test_readme_is_one_screenful_with_the_offline_route_near_the_top():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    offline = next(i for i, line in enumerate(lines) if line.startswith("## Without network"))
    assert offline < 100 and "--tokenizer" in "\n".join(lines[offline:offline + 12])
    for page in re.findall(r"\]\((docs/[\w-]+\.md)", text):
        assert (ROOT / page).is_file(), page


def _anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of README and docs/ names an existing file and, with ``#anchor``, one of its
    headings (the pages were split out of one README: a stale ``#section`` would lead nowhere)."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            page = (path.parent / file).resolve() if file else path
            assert page.exists(), f"{path.name}: {target}"
            if anchor and page.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{path.name}: {target}"
