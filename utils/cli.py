"""What every command of ``main.py`` shares: exit codes, the help formatter, error lines and the decoding
options (so ``caption`` and ``batch`` cannot drift apart).

Light on purpose (no TensorFlow, no torch at import), so that ``main.py --help`` stays instant.

Example::

    from utils.cli import EXIT_USAGE, add_decoding_arguments, decoding_kwargs, fail
    add_decoding_arguments(parser)
    kwargs = decoding_kwargs(parser.parse_args())      # only the options given
"""

import argparse
import os
import sys

from custom_architectures.samplers import SAMPLERS

EXIT_OK = 0  # every input captioned
EXIT_FAILED_INPUTS = 1  # some inputs could not be captioned / read (listed on stderr)
EXIT_USAGE = 2  # bad command line (argparse's own code too)
EXIT_MODEL = 3  # the model could not be downloaded, converted or loaded
EXIT_INTERRUPTED = 130

DECODING_KEYS = ("beam_size", "max_length", "temperature", "top_k", "top_p", "num_captions", "seed", "magic_k",
                 "magic_alpha", "magic_beta", "rerank", "rerank_weight")

#: what loading a model may raise besides `UnknownModelError`: CheckpointError / ModelLoadError (ValueError),
#: DownloadError / OfflineError (RuntimeError), missing files (OSError), damaged configs (KeyError, TypeError)
MODEL_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in ``--help`` (not ``None`` / ``False``, which say nothing, nor a second time where the
    help already states one), descriptions and epilogs kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default:" in text:  # 0 is shown
            return text
        return super()._get_help_string(action)


_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
                          # a file name's undecodable bytes (surrogateescape: U+DC80-U+DCFF) as the bytes
                          **{chr(c): f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)},
                          **{chr(c): f"\\u{c:04x}" for c in (*range(0xD800, 0xDC80), *range(0xDD00, 0xE000))}})


def escape_field(text) -> str:
    """``text`` with backslash, newline, tab and carriage return written as ``\\\\``, ``\\n``, ``\\t``,
    ``\\r``, and a file name's undecodable bytes as ``\\xNN`` (``caf\\xe9.jpg``; other lone surrogates as
    ``\\uNNNN``): a path or caption holding them cannot break the one-result-per-line output nor its UTF-8
    (reversible)."""
    return str(text).translate(_ESCAPES)


def fail(message, code):
    """Print ``error: <message>`` on stderr and return the exit ``code``.

    Escaped onto one line (`escape_field`) when stderr is a file or a pipe, so that a script reads one error
    per line; at a terminal a message of several lines (the offline error lists each missing file) is
    printed as those lines, each escaped, the later ones indented: a person reads it there."""
    text = str(message)
    if "\n" in text and _is_terminal(sys.stderr):
        first, *rest = text.split("\n")
        lines = [f"error: {escape_field(first)}", *(f"  {escape_field(line)}" for line in rest)]
        print("\n".join(lines), file=sys.stderr)
    else:
        print(f"error: {escape_field(text)}", file=sys.stderr)
    return code


def _is_terminal(stream):
    """Whether ``stream`` is a terminal (False for a stream without ``isatty`` or a closed one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def missing_extra(module, install, what):
    """None when ``module`` can be imported; else the message saying what to ``pip install`` (``install``: a
    package, or ``-r <requirements file>``).

    The optional dependencies (Gradio for ``serve``, Apache Beam for ``batch`` / ``extract --runner``, torch for
    ``export --format official``) are not in requirements.txt, so that a plain install stays small; a command
    that needs one says which."""
    import importlib.util

    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except (ImportError, ValueError):  # a parent package missing, or a module marked absent in sys.modules
        pass
    return f"{what} needs {module}, which is not installed: pip install {install}"


def report_skipped(failed, names, total):
    """Print one ``error: skipped <name>: <message>`` line per failed item and a count; True if any."""
    for i, message in sorted(failed.items()):
        print(f"error: skipped {escape_field(names[i])}: {escape_field(message)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {total} images could not be read (left out)", file=sys.stderr)
    return bool(failed)


def add_decoding_arguments(p, batch_help="images per encoding / decoding batch"):
    """``--method``, ``--beam-size`` ... ``--seed`` and ``--batch-size`` (the arguments of ``generate``).

    Unset options keep ``ClipCap.generate``'s defaults, which their help states (only the options given are
    passed on: `decoding_kwargs`)."""
    p.add_argument("--method", choices=tuple(SAMPLERS), default="greedy",
                   help="decoding method: greedy (= the official generate2), beam (= generate_beam), sample, or "
                        "magic (MAGIC search, guided by CLIP's text tower: slower, see --magic-k)")
    p.add_argument("--beam-size", type=int, help="beams for --method beam (default: 5)")
    p.add_argument("--max-length", type=int, help="most generated tokens per caption (default: 67)")
    p.add_argument("--temperature", type=float,
                   help="divide the logits by this before softmax (sample, beam) (default: 1.0)")
    p.add_argument("--top-k", type=int,
                   help="sample among the k most likely tokens only (--method sample) (default: no limit)")
    p.add_argument("--top-p", type=float,
                   help="nucleus sampling: sample among the most likely tokens whose probability reaches p "
                        "(--method sample) (default: 1.0, no limit)")
    p.add_argument("--num-captions", type=int,
                   help="captions per image, best first (beam: <= --beam-size; sample: independent draws); "
                        "text output numbers them (default: 1)")
    p.add_argument("--seed", type=int,
                   help="random seed for --method sample, in [0, 2**32) (default: a new random seed per run)")
    p.add_argument("--magic-k", type=int,
                   help="--method magic: candidate tokens per step, the most likely ones (default: 45)")
    p.add_argument("--magic-alpha", type=float,
                   help="--method magic: weight of the degeneration penalty, in [0, 1] (default: 0.1)")
    p.add_argument("--magic-beta", type=float,
                   help="--method magic: weight of CLIP's image-text score, >= 0 (default: 2.0)")
    p.add_argument("--rerank", choices=("clip",),
                   help="re-rank every candidate of --method beam (all --beam-size beams) or sample (the "
                        "--num-captions draws) by CLIPScore with the model's CLIP text encoder, and keep the best "
                        "--num-captions (default: the decoder's order)")
    p.add_argument("--rerank-weight", type=float,
                   help="with --rerank clip, rank by clip_score + A * the language model's score (average "
                        "log-probability per token) (default: 0, CLIPScore alone)")
    p.add_argument("--batch-size", type=int, default=16, help=batch_help)


def decoding_kwargs(args):
    """The decoding options given on the command line, as ``generate`` keyword arguments."""
    return {k: getattr(args, k) for k in DECODING_KEYS if getattr(args, k, None) is not None}


#: the environment variables every command reads (part of every command's --help epilog: `epilog`)
ENVIRONMENT_HELP = """\
environment variables:
  IMAGE_CAPTIONING_MIRROR=<base URL>  fetch every file from <base URL>/<file name> instead of its origin
                                      (names: `main.py download --list`); checksums are still verified
  IMAGE_CAPTIONING_OFFLINE=1          never download: a missing file is an error naming the file and the
                                      path where to place it
  IMAGE_CAPTIONING_HOME=<dir>         the model store (default: pretrained_models/ in the repository)
  IMAGE_CAPTIONING_XLA_CACHE=0        do not keep compiled XLA programs in <model store>/xla_cache/
                                      (`main.py cache` shows it, `main.py cache --clear` empties it)
"""

#: how ``caption``'s result and error lines are escaped (its epilog, and `escape_field`)
ESCAPING_HELP = """\
output lines: in "<path><TAB><caption>" and "error: ..." lines a backslash, tab, newline or carriage
  return is written as \\\\, \\t, \\n, \\r, and a file name's bytes that are not UTF-8 as \\xNN (one
  result per line; undo by the reverse substitution); --json writes them as \\udcNN escapes
"""


def epilog(examples, exit_codes, *extra):
    """A command's ``--help`` epilog: its own ``examples`` (lines), its ``exit_codes`` (text after "exit
    codes:"), any ``extra`` sections, then the environment variables every command reads."""
    lines = ["examples:", *(f"  {line}" for line in examples), "", "exit codes:", f"  {exit_codes}", ""]
    return "\n".join(lines) + "".join(f"\n{section}" for section in extra) + "\n" + ENVIRONMENT_HELP


MODEL_ARG_HELP = ("a model name (coco, conceptual, coco_transformer: downloaded and converted on first use), the "
                  "name of a model saved in the model store, or a directory holding a saved model")


def exit_now(code):
    """End the process with ``code`` at once: flush stdout / stderr and the logging handlers, then
    ``os._exit`` (no interpreter teardown: TensorFlow's took ~1 s after a one-image caption). Only for a
    command whose every file is written and closed (``main.py caption`` writes map.json atomically)."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)
