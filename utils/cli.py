"""What every command of ``main.py`` shares: exit codes, the help formatter, error lines and the decoding
options (made from the samplers' declarations, so that no command lists them and none can drift apart).

Light on purpose (no TensorFlow, no torch at import), so that ``main.py --help`` stays instant.

Example::

    from utils.cli import EXIT_USAGE, add_decoding_arguments, decoding_from_args, fail
    add_decoding_arguments(parser)
    request = decoding_from_args(parser.parse_args())  # checked once: a Decoding, carried to generate
"""

import argparse
import os
import sys

from custom_architectures.decoding import decoding, request_options
from custom_architectures.samplers import SAMPLERS, sampler_class

EXIT_OK = 0  # every input captioned
EXIT_FAILED_INPUTS = 1  # some inputs could not be captioned / read (listed on stderr)
EXIT_USAGE = 2  # bad command line (argparse's own code too)
EXIT_MODEL = 3  # the model could not be downloaded, converted or loaded
EXIT_INTERRUPTED = 130

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


def add_decoding_arguments(p, batch_help="images per encoding / decoding batch", methods=None, skip=(), prefix="",
                           method_default="greedy", batch_size=16):
    """``--method`` and one flag per decoding option of ``methods`` (names; None: every registered method), made
    from the declarations (`custom_architectures.decoding.request_options`: flag, type, choices, help and
    default), then ``--batch-size`` (default ``batch_size``; None: no such flag).

    ``skip``: options a command does not offer; ``prefix``: put before every help text (``"savedmodel: "``);
    ``method_default``: None lets a command tell whether ``--method`` was given. Unset options keep their
    declared defaults, which their help states (only the options given are passed on: `decoding_kwargs`)."""
    methods = tuple(SAMPLERS) if methods is None else tuple(methods)
    named = ", ".join(f"{m} ({sampler_class(m).summary})" if sampler_class(m).summary else m for m in methods)
    p.add_argument("--method", choices=methods, default=method_default,
                   help=f"{prefix}decoding method: {named} (default: greedy)")
    for option in request_options(methods):
        if option.name not in skip:
            p.add_argument(option.flag, type=option.type, choices=option.choices,
                           help=f"{prefix}{_option_help(option, methods)} (default: {option.default_words()})")
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive_int, default=batch_size, help=batch_help)


def positive_int(text):
    """argparse ``type=`` of a count that must be >= 1 (``--batch-size``): 0 or a negative number is a usage
    error (exit 2) when the command line is parsed, not after the model and the inputs were loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _option_help(option, methods):
    """An option's help, saying which of ``methods`` take it unless all do or the help says so already."""
    takers = [m for m in methods if option in sampler_class(m).options]
    if not takers or len(takers) == len(methods) or "--method" in option.help:
        return option.help
    return f"{option.help} (--method {', '.join(takers)})"


def decoding_kwargs(args):
    """The decoding options given on the command line, as ``generate`` keyword arguments."""
    return {o.name: getattr(args, o.name) for o in request_options() if getattr(args, o.name, None) is not None}


def decoding_from_args(args):
    """The checked `custom_architectures.decoding.Decoding` of the command line's ``--method`` and decoding
    options: the one check of a run's decoding arguments, before anything is read or loaded. Raises
    ValueError / TypeError naming the option."""
    return decoding(args.method or "greedy", **decoding_kwargs(args))


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
