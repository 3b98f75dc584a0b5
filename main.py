"""The command line: caption images, convert official checkpoints, download models, train and evaluate.

    python main.py caption demo/ --model coco                 # captions on stdout, map.json saved
    python main.py caption "photos/**/*.jpg" --method beam --beam-size 5 --json
    python main.py convert coco_weights.pt --clip ViT-B/32 --name my_coco
    python main.py download coco                              # download + convert once
    python main.py download --list                            # every name, its files and where they go
    python main.py export my_model my_model.pt --format official   # back to the official PyTorch format
    python main.py export coco exports/coco --method beam      # a serving SavedModel (TF Serving, Vertex)
    python main.py serve --model coco                          # the web demo (Gradio)

Run ``python main.py COMMAND --help`` for every option. Heavy libraries (TensorFlow; torch, only for
``export``) are imported only by the command that needs them, so ``--help`` is instant.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from custom_train_objects import commands as train_commands
from models import batch_command, export_commands  # import neither Beam nor TensorFlow
from models.cli_models import UnknownModelError, load_model, model_or_exit_code  # noqa: F401 (load_model: main's API)
from models.precision import add_precision_argument
from utils import compile_cache
from utils.cli import (  # noqa: F401 (escape_field: part of main's API)
    ESCAPING_HELP,
    EXIT_FAILED_INPUTS,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_ARG_HELP,
    MODEL_ERRORS,
    add_decoding_arguments,
    decoding_from_args,
    epilog,
    escape_field,
    exit_now,
)
from utils.cli import Formatter as _Formatter
from utils.cli import fail as _fail
from utils.file_utils import DEFAULT_MAX_BYTES, json_text
from utils.tf_startup import import_tensorflow, quiet_environment

#: commands that load TensorFlow (imported quietly up front); `caption` imports it itself, only when it has
#: work to do, and `download` only when it converts
TF_COMMANDS = ("convert", "export", "train", "extract", "evaluate", "batch")
#: commands whose process, run as a script, ends with ``os._exit`` once its results are written and the
#: streams flushed (`utils.cli.exit_now`): TensorFlow's teardown (freeing the model, joining its thread
#: pools) took ~1 s after the last caption was printed. Their files are written atomically before.
FAST_EXIT_COMMANDS = ("caption",)



# ---------------------------------------------------------------------------------------------- caption


def cmd_caption(args):
    images = list(args.images)
    try:
        for path in args.from_file or ():
            images.extend(_read_list(path))
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    if not images:
        return _fail(f"no images listed in {', '.join(args.from_file)}", EXIT_USAGE)
    if args.grid and (problem := _grid_problem(args.grid)):  # before any work
        return _fail(problem, EXIT_USAGE)
    try:  # the one check of the decoding options, before anything is read or loaded: carried from here
        request = decoding_from_args(args)
    except (TypeError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    results = None if args.no_save or args.overwrite else _answers_from_map(args, images, request)
    if results is not None:  # every image already captioned with these settings: no model loaded
        _save_grid(args, results)
        return _report(args, results)
    problem = None if args.no_save else _output_problem(args)
    if problem is not None:  # before the model is loaded: captions that could not be saved cost no load
        return _fail(problem, EXIT_USAGE)

    import_tensorflow(quiet=not args.verbose, lean=True)  # Keras without pandas / pyplot: ~1 s
    from loggers.console import quiet_logger
    from models.image_captioning.prediction import MapWriteError, predict
    from utils.devices import resolve_device

    try:  # before the model is loaded: a wrong device costs no load
        device = resolve_device(args.device)
    except (TypeError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    status = None if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    if status:
        status(f"loading {args.model} ...")
    start = time.perf_counter()
    model, code = model_or_exit_code(args.model, load=lambda name: load_model(name, args.precision))
    if model is None:
        return code
    model.to(device)
    if status:
        status(f"{args.model} loaded in {time.perf_counter() - start:.1f} s")
    try:
        with quiet_logger("models.image_captioning.prediction"):  # failures are listed below
            results = predict(model, images, batch_size=args.batch_size, method=request,
                              save=not args.no_save, overwrite=args.overwrite, output_dir=args.output_dir,
                              return_candidates=_want_candidates(args), progress=not args.no_progress,
                              exif_transpose=not args.no_exif_transpose, max_file_bytes=_max_bytes(args),
                              status=status)
    except KeyboardInterrupt:
        return _fail("interrupted; every caption made so far is saved in map.json", EXIT_INTERRUPTED)
    except MapWriteError as e:  # the output folder is unusable (found before any image is read), or a write
        if e.results is None:   # failed at the end of the run: its results are printed all the same
            return _fail(str(e), EXIT_USAGE)
        _report(args, e.results)
        return _fail(str(e), EXIT_FAILED_INPUTS)
    except (TypeError, ValueError) as e:  # e.g. arguments the decoding method does not accept
        return _fail(str(e), EXIT_USAGE)
    _save_grid(args, results)
    return _report(args, results)


def _output_problem(args):
    """Why map.json cannot be written in ``--output-dir`` (not a writable folder, a damaged or linked map.json),
    or None; the default folder, which depends on the model, is checked by ``predict`` itself."""
    if args.output_dir is None:
        return None
    from models.image_captioning.prediction import MAP_FILENAME, check_map_writable

    try:
        check_map_writable(Path(args.output_dir) / MAP_FILENAME)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _grid_problem(path):
    """Why ``--grid`` cannot be written there (not a .png name, or an existing file that is not a grid this
    library wrote, e.g. a user's photo: never overwritten), or None."""
    from utils.file_utils import UnsafePathError, check_overwritable
    from utils.plot_utils import is_captions_grid

    if Path(path).suffix.lower() != ".png":
        return f"--grid {path}: give a .png file name"
    try:
        check_overwritable(path, is_captions_grid, "a captions grid")
    except (UnsafePathError, OSError) as e:
        return str(e)
    return None


GRID_MAX_IMAGES = 64


def _save_grid(args, results):
    """``--grid``: the captioned local images in a contact sheet (failed inputs and URLs left out)."""
    if not args.grid:
        return
    from utils.plot_utils import save_captions_grid

    shown = [r for r in results if r["error"] is None and isinstance(r["image"], str) and os.path.isfile(r["image"])]
    if not shown:
        print("no grid: no image was captioned", file=sys.stderr)
        return
    if len(shown) > GRID_MAX_IMAGES:  # one figure holds every image decoded: bounded
        print(f"grid: the first {GRID_MAX_IMAGES} of {len(shown)} captioned images", file=sys.stderr)
        shown = shown[:GRID_MAX_IMAGES]
    try:
        save_captions_grid(args.grid, [r["image"] for r in shown], [r["caption"] for r in shown],
                           titles=[os.path.basename(r["image"]) for r in shown])
    except (OSError, ValueError) as e:  # an image gone since, a folder not writable: the captions still print
        print(f"error: cannot write the grid {args.grid}: {e}", file=sys.stderr)
        return
    if not args.no_progress:
        print(f"grid of {len(shown)} image(s) saved in {args.grid}", file=sys.stderr)


def _answers_from_map(args, images, request):
    """``predict``'s results from map.json alone when the saved model's every input is there with these
    settings (`models.image_captioning.cached_answers`), else None (the model is needed)."""
    from models.cli_models import resolve_model_dir
    from models.image_captioning.cached_answers import answers_from_map

    try:
        model_dir = resolve_model_dir(args.model, download=False)
    except (UnknownModelError, ValueError):
        return None  # reported when loading
    if not os.path.isdir(model_dir):  # an official model not downloaded yet
        return None
    return answers_from_map(model_dir, images, method=request, output_dir=args.output_dir,
                            return_candidates=_want_candidates(args), exif_transpose=not args.no_exif_transpose,
                            precision=args.precision, max_file_bytes=_max_bytes(args))


def _read_list(path):
    """The images listed in a text file: one path or URL a line; blank lines and ``#`` comments skipped."""
    from utils.file_utils import DEFAULT_MAX_BYTES, read_regular_file

    try:
        text = read_regular_file(path, DEFAULT_MAX_BYTES).decode("utf-8")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the list of images {path}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _report(args, results):
    """Print the results (lines or JSON on stdout, failures on stderr); the exit code."""
    if args.json:
        print(json_text(results, indent=1, default=str))  # a file name's undecodable bytes: \udcXX escapes
    else:
        for r in results:
            if r["error"] is not None:
                continue
            if (args.num_captions or 1) > 1:  # every caption, numbered from 1 (best first)
                # an entry of map.json written without its candidates (hand-made) has its caption alone
                for rank, candidate in enumerate(r.get("candidates") or [{"text": r["caption"]}], 1):
                    print(f"{escape_field(r['image'])}\t{rank}\t{escape_field(candidate['text'])}")
            else:
                print(f"{escape_field(r['image'])}\t{escape_field(r['caption'])}")
    failed = [r for r in results if r["error"] is not None]
    for r in failed:
        print(f"error: {escape_field(_error_line(r))}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} inputs could not be captioned", file=sys.stderr)
        return EXIT_FAILED_INPUTS
    if not results:
        return _fail("no images given", EXIT_FAILED_INPUTS)
    return EXIT_OK


def _want_candidates(args):
    """Whether results need every candidate: for --json, and for the numbered lines of --num-captions > 1."""
    return bool(args.json or (args.num_captions or 1) > 1)


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _max_bytes(args):
    return None if args.max_file_bytes == 0 else args.max_file_bytes


def _error_line(result):
    """'<path>: <reason>', the path once: image errors already start with (or name) the path."""
    image, error = str(result["image"]), str(result["error"])
    return error if image in error else f"{image}: {error}"


# ---------------------------------------------------------------------------------------------- convert


def cmd_convert(args):
    from utils.file_utils import check_model_name, check_replaceable
    from utils.model_store import is_saved_model, saved_model_dir

    # every check of names and destinations before any work: a bad one is a usage error, nothing is touched
    if args.output is None and args.name is None:
        return _fail("give --name NAME (saved in the model store) or --output DIR", EXIT_USAGE)
    try:
        if args.output is None:
            directory = saved_model_dir(args.name)
            name = args.name
        else:
            directory = Path(args.output)
            name = args.name if args.name is not None else Path(os.path.abspath(directory)).name
            if args.name is None:
                try:
                    check_model_name(name)
                except ValueError as e:
                    raise ValueError(f"the folder name of --output {args.output!r} is not a plain model name "
                                     "(it is recorded as the model's name): give one with --name") from e
        check_model_name(name)
        check_replaceable(directory, is_saved_model, args.overwrite)
    except ValueError as e:  # an invalid name, or an UnsafePathError: a destination that is not ours
        return _fail(str(e), EXIT_USAGE)
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.gpt2_hub import fetch_gpt2_tokenizer
    from models.image_captioning.pretrained import convert_model
    from models.siamese.presets import CLIP_SOURCES, fetch_clip
    from utils.tokenizer import load_gpt2_tokenizer, stop_token_id

    try:
        _stderr_line(f"reading the GPT-2 tokenizer {args.tokenizer} ...")  # first: the stop token is checked on it
        tokenizer = load_gpt2_tokenizer(fetch_gpt2_tokenizer(args.tokenizer))
        if args.stop_token is not None:  # not one token of the vocabulary: refused before any download
            stop_token_id(tokenizer, args.stop_token)
        clip = fetch_clip(args.clip) if args.clip in CLIP_SOURCES else args.clip
        extra = {} if args.normalize_prefix is None else {"normalize_prefix": args.normalize_prefix}
        if args.stop_token is not None:
            extra["stop_token"] = args.stop_token
        start = time.perf_counter()
        convert_model(ClipCap, args.checkpoint, clip, tokenizer, directory, name=name, overwrite=args.overwrite,
                      clip_name=args.clip if args.clip in CLIP_SOURCES else None, status=_stderr_line, **extra)
    except MODEL_ERRORS as e:
        return _fail(f"conversion failed: {e}", EXIT_MODEL)
    print(directory)
    model_arg = name if args.output is None else str(directory)
    _stderr_line(f"converted in {time.perf_counter() - start:.1f} s; caption with:\n"
                 f"  python main.py caption IMAGES --model {model_arg}")
    return EXIT_OK


def _stderr_line(line):
    """A status line on stderr (stdout keeps what a script reads: the folder)."""
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- download


def cmd_download(args):
    from models.image_captioning.presets import MODELS, describe_sources
    from models.siamese.presets import CLIP_SOURCES, fetch_clip

    if args.list:
        print("\n".join(describe_sources()))
        return EXIT_OK
    if not args.names:
        return _fail("give at least one name (or --list)", EXIT_USAGE)
    import_tensorflow(quiet=not args.verbose)
    for name in args.names:
        if name not in MODELS and name not in CLIP_SOURCES:
            return _fail(f"unknown name {name!r}; known: {', '.join([*MODELS, *CLIP_SOURCES])}",
                         EXIT_USAGE)
    from models.image_captioning.pretrained import download_model, get_pretrained
    from utils.model_store import saved_model_dir

    try:
        for name in args.names:
            if name in CLIP_SOURCES:
                print(fetch_clip(name))
            elif args.no_convert:
                print("\n".join(str(p) for p in download_model(name)))
            else:
                from models.image_captioning.clip_cap import ClipCap

                get_pretrained(ClipCap, name, force_convert=args.force)
                print(saved_model_dir(name))
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(str(e), EXIT_MODEL)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ cache


def cmd_cache(args):
    from utils import compile_cache
    from utils.file_utils import UnsafePathError

    if args.clear:
        try:
            root = compile_cache.clear()
        except (UnsafePathError, OSError) as e:
            return _fail(f"cannot clear the compile cache: {e}", EXIT_USAGE)
        print(f"cleared {root}")
        return EXIT_OK
    info = compile_cache.describe()
    print(f"compile cache: {info['root']}{'' if info['enabled'] else ' (disabled: IMAGE_CAPTIONING_XLA_CACHE)'}")
    print(f"this version's folder: {info['current']}")
    for key, entry in info["keys"].items():
        current = " (current)" if info["current"].endswith(key) else ""
        print(f"  {key}: {entry['entries']} programs, {entry['bytes'] / 1e6:.1f} MB{current}")
    total = sum(e["bytes"] for e in info["keys"].values())
    print(f"total: {total / 1e6:.1f} MB")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser

#: each command's --help epilog: its own examples and exit codes, then the environment variables
MAIN_EPILOG = epilog(
    ["python main.py caption demo/cat.jpg --model coco       # the first caption (downloads coco once)",
     "python main.py convert coco_weights.pt --clip ViT-B-32.pt --tokenizer gpt2-tokenizer/ --name my_coco",
     "python main.py caption demo/ --model my_coco            # without network, after convert",
     "python main.py COMMAND --help                           # every option of a command"],
    "0 success, 1 some inputs failed (listed on stderr), 2 usage error, 3 the model could not be downloaded / "
    "converted / loaded, 130 interrupted (Ctrl-C)")
CAPTION_EPILOG = epilog(
    ["python main.py caption demo/cat.jpg --model coco",
     "python main.py caption 'photos/**/*.jpg' --method beam --beam-size 5 --json",
     "python main.py caption demo/ --method sample --num-captions 3 --seed 0   # <path> TAB <n> TAB <caption>",
     "python main.py caption --from-file list.txt https://example.com/cat.jpg --no-save"],
    "0 every image captioned, 1 some inputs failed (listed on stderr) or map.json could not be written\n"
    "  (every result printed first), 2 usage error (an --output-dir that cannot be written or holds a\n"
    "  malformed map.json included), 3 the model could not be downloaded / converted / loaded (a malformed\n"
    "  config.json included), 130 interrupted (Ctrl-C)", ESCAPING_HELP)
CONVERT_EPILOG = epilog(
    ["python main.py convert coco_weights.pt --clip ViT-B/32 --name my_coco       # CLIP and tokenizer downloaded",
     "python main.py convert coco_weights.pt --clip ViT-B-32.pt --tokenizer gpt2-tokenizer/ --name my_coco",
     "    # no network: the CLIP .pt and a folder holding GPT-2's vocab.json and merges.txt",
     "python main.py caption demo/cat.jpg --model my_coco                         # then caption with it"],
    "0 converted (the saved folder is printed), 2 usage error (a bad --name, a destination that is not a saved\n"
    "  model of ours), 3 the conversion failed (unreadable or wrong checkpoint, missing file), 130 interrupted")
DOWNLOAD_EPILOG = epilog(
    ["python main.py download coco coco_transformer     # download and convert once into the model store",
     "python main.py download ViT-B/32                  # a CLIP checkpoint only",
     "python main.py download --list                    # every file, its origin, its place and SHA-256",
     "python main.py download coco --no-convert         # only the files (e.g. to copy to an offline machine)"],
    "0 done (the paths are printed), 2 unknown name, 3 a download or conversion failed (offline: the error\n"
    "  names each missing file and where to place it), 130 interrupted")
CACHE_EPILOG = epilog(
    ["python main.py cache            # where the compiled programs are, and how large",
     "python main.py cache --clear    # empty it (only a folder made of cache entries)"],
    "0 done, 2 the cache folder holds something else and was not cleared")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main.py", formatter_class=_Formatter, epilog=MAIN_EPILOG,
        description="ClipCap image captioning in TensorFlow / Keras: caption images, convert the official "
                    "PyTorch checkpoints, download models, train and evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details (INFO) and keep TensorFlow's own log lines (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("caption", formatter_class=_Formatter, epilog=CAPTION_EPILOG,
                       help="caption images, directories or glob patterns",
                       description="Caption images: one '<path>\\t<caption>' line per image on stdout (or JSON "
                                   "with --json), results saved to map.json; a rerun skips images already "
                                   "captioned with the same model and settings.")
    p.add_argument("images", nargs="*", help="image files, directories (searched recursively), glob patterns "
                                             "(quote them: 'photos/**/*.jpg') or http(s) URLs")
    p.add_argument("--from-file", action="append", metavar="LIST",
                   help="a text file listing images (paths, directories, patterns or URLs), one a line; blank "
                        "lines and lines starting with # are skipped (repeatable)")
    p.add_argument("--model", default="coco", help=MODEL_ARG_HELP)
    add_decoding_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of results (image, caption, candidates, error, timings)")
    p.add_argument("--output-dir", help="where map.json is written (default: pretrained_models/.outputs/<model "
                                        "name>, outside the model's folder)")
    p.add_argument("--overwrite", action="store_true", help="caption again images already in map.json")
    p.add_argument("--no-save", action="store_true", help="neither read nor write map.json")
    p.add_argument("--grid", metavar="FILE.png",
                   help="also save a contact sheet: the images in a grid with their captions (PNG; default: none)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar nor status lines (loading, compiling) on stderr")
    p.add_argument("--no-exif-transpose", action="store_true",
                   help="ignore the EXIF orientation (as OpenAI's and the official ClipCap code do)")
    p.add_argument("--max-file-bytes", type=_non_negative_int, default=DEFAULT_MAX_BYTES,
                   help="refuse image files larger than this many bytes (0: no limit)")
    p.add_argument("--device", help="run the models on 'cpu', 'gpu' or 'gpu:N' (default: TensorFlow's placement, "
                                     "a GPU when one is visible); a device TensorFlow does not see is an error")
    add_precision_argument(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("convert", formatter_class=_Formatter, epilog=CONVERT_EPILOG,
                       help="convert an official ClipCap .pt (+ CLIP + tokenizer) to a saved model",
                       description="Convert an official ClipCap PyTorch checkpoint, with the CLIP it was trained "
                                   "on and the GPT-2 tokenizer, into a saved Keras model (loadable without torch).")
    p.add_argument("checkpoint", help="the official ClipCap checkpoint (.pt state dict)")
    p.add_argument("--clip", required=True, help="a CLIP name (ViT-B/32, RN50x4, ...: downloaded) or an OpenAI "
                                                 "CLIP .pt file")
    p.add_argument("--tokenizer", default="gpt2", help="a GPT-2 tokenizer directory or hub name")
    p.add_argument("--stop-token", help="the token that ends the captions, one token of the tokenizer's vocabulary, "
                                        "recorded in the model (default: '.')")
    p.add_argument("--normalize-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the CLIP embedding before the mapper (default: by checkpoint kind, as the "
                        "released weights expect: transformer yes, MLP no)")
    p.add_argument("--name", help="the model's name: one plain folder name (letters, digits, '.', '_', '-'), "
                                  "its directory in the model store; with --output only recorded in the config "
                                  "(default: the --output folder's name)")
    p.add_argument("--output", help="save here instead of <model store>/<name> (a new or empty folder, or a "
                                    "saved model with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing saved model at the destination (never any other folder)")
    p.set_defaults(func=cmd_convert)

    export_commands.register(sub)

    p = sub.add_parser("download", formatter_class=_Formatter, epilog=DOWNLOAD_EPILOG,
                       help="download (and convert) models by name",
                       description="Download the files of ClipCap models (checkpoint, CLIP, tokenizer) and "
                                   "convert them once into the model store; or download CLIP checkpoints.")
    p.add_argument("names", nargs="*", help="coco, conceptual, coco_transformer, or a CLIP name (ViT-B/32, ...)")
    p.add_argument("--list", action="store_true", help="list every name, its files, origins and cache paths")
    p.add_argument("--no-convert", action="store_true", help="only download the files")
    p.add_argument("--force", action="store_true", help="convert again even if a saved model exists")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cache", formatter_class=_Formatter, epilog=CACHE_EPILOG,
                       help="show or clear the compiled-program (XLA) cache",
                       description="Compiled XLA programs are kept in <model store>/xla_cache/<key>/ (key: "
                                   "TensorFlow, Keras, Python, CPU and library versions), so a new process "
                                   "loads them instead of compiling again. Show where and how large, or clear it.")
    p.add_argument("--clear", action="store_true", help="delete every cached program (only cache files)")
    p.set_defaults(func=cmd_cache)

    train_commands.register(sub)
    batch_command.register(sub)
    return parser


def main(argv=None, fast_exit=False):
    """Run the CLI; returns the exit code (see ``--help``). ``fast_exit`` (the script sets it): a command of
    `FAST_EXIT_COMMANDS` ends the process itself (`utils.cli.exit_now`) instead of returning."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only commands that pass options on (to Beam: `batch`, `extract --runner`) accept them
        if not hasattr(args, "pipeline_args"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pipeline_args = unknown
    if args.command == "caption" and not args.images and not args.from_file:
        parser.error("caption: give images (paths, directories, patterns, URLs) or --from-file LIST")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_environment(args.verbose)  # no TensorFlow C++ log lines unless --verbose or the user set the level
    compile_cache.enable()  # before TensorFlow is imported (a no-op when `models` already did it)
    try:
        if args.command in TF_COMMANDS:
            import_tensorflow(quiet=not args.verbose)
        code = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere (loading a model, converting): a clean exit, no traceback
        return _fail("interrupted", EXIT_INTERRUPTED)
    code = EXIT_OK if code is None else int(code)
    if fast_exit and args.command in FAST_EXIT_COMMANDS:
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main(fast_exit=True))
