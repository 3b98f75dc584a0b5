"""The command line: caption images, convert official checkpoints, download models, train and evaluate.

    python main.py caption demo/ --model coco                 # captions on stdout, map.json saved
    python main.py caption "photos/**/*.jpg" --method beam --beam-size 5 --json
    python main.py convert coco_weights.pt --clip ViT-B/32 --name my_coco
    python main.py download coco                              # download + convert once
    python main.py download --list                            # every name, its files and where they go
    python main.py export my_model my_model.pt --format official   # back to the official PyTorch format
    python main.py export coco exports/coco --method beam      # a serving SavedModel (TF Serving, Vertex)
    python main.py serve --model coco                          # the web demo (Gradio)

Run ``python main.py COMMAND --help`` for every option. Heavy libraries (TensorFlow, torch) are imported
only by the command that needs them, so ``--help`` is instant.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from custom_train_objects import commands as train_commands
from models import batch_command  # imports neither Beam nor TensorFlow
from utils.cli import (  # noqa: F401 (escape_field, load_model: part of main's API)
    EXIT_FAILED_INPUTS,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_ERRORS,
    UnknownModelError,
    add_decoding_arguments,
    decoding_kwargs,
    escape_field,
    load_model,
    model_or_exit_code,
)
from utils.cli import Formatter as _Formatter
from utils.cli import fail as _fail
from utils.file_utils import DEFAULT_MAX_BYTES

ENVIRONMENT_HELP = """\
environment variables:
  IMAGE_CAPTIONING_MIRROR=<base URL>  fetch every file from <base URL>/<file name> instead of its origin
                                      (names: `main.py download --list`); checksums are still verified
  IMAGE_CAPTIONING_OFFLINE=1          never download: a missing file is an error naming the file and the
                                      path where to place it
  IMAGE_CAPTIONING_HOME=<dir>         the model store (default: pretrained_models/ in the repository)

exit codes:
  0 every image captioned, 1 some inputs failed (listed on stderr), 2 usage error,
  3 the model could not be downloaded / converted / loaded, 130 interrupted (Ctrl-C)

output lines: in "<path><TAB><caption>" and "error: ..." lines a backslash, tab, newline or carriage
  return is written as \\\\, \\t, \\n, \\r (one result per line; undo by the reverse substitution)
"""


# ---------------------------------------------------------------------------------------------- caption


def _model_arg_help():
    return ("a model name (coco, conceptual, coco_transformer: downloaded and converted on first use), the "
            "name of a model saved in the model store, or a directory holding a saved model")


def cmd_caption(args):
    from loggers.console import quiet_logger
    from models.image_captioning.clip_cap import check_decoding_args
    from models.image_captioning.prediction import predict
    from utils.devices import resolve_device

    try:  # before the model is loaded: a wrong option costs no load
        check_decoding_args(args.method, **decoding_kwargs(args))
        device = resolve_device(args.device)
    except (TypeError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    model, code = model_or_exit_code(args.model)
    if model is None:
        return code
    model.to(device)
    try:
        with quiet_logger("models.image_captioning.prediction"):  # failures are listed below
            results = predict(model, args.images, batch_size=args.batch_size, method=args.method,
                              save=not args.no_save, overwrite=args.overwrite, output_dir=args.output_dir,
                              return_candidates=args.json, progress=not args.no_progress,
                              exif_transpose=not args.no_exif_transpose, max_file_bytes=_max_bytes(args),
                              **decoding_kwargs(args))
    except KeyboardInterrupt:
        return _fail("interrupted; every caption made so far is saved in map.json", EXIT_INTERRUPTED)
    except (TypeError, ValueError) as e:  # e.g. arguments the decoding method does not accept
        return _fail(str(e), EXIT_USAGE)
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    else:
        for r in results:
            if r["error"] is None:
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
    from models.image_captioning.pretrained import convert_model
    from models.siamese.presets import CLIP_SOURCES, fetch_clip
    from utils.downloads import fetch_gpt2_tokenizer

    try:
        clip = fetch_clip(args.clip) if args.clip in CLIP_SOURCES else args.clip
        tokenizer = fetch_gpt2_tokenizer(args.tokenizer)
        extra = {} if args.normalize_prefix is None else {"normalize_prefix": args.normalize_prefix}
        convert_model(ClipCap, args.checkpoint, clip, tokenizer, directory, name=name, overwrite=args.overwrite,
                      clip_name=args.clip if args.clip in CLIP_SOURCES else None, **extra)
    except MODEL_ERRORS as e:
        return _fail(f"conversion failed: {e}", EXIT_MODEL)
    print(directory)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- export


EXPORT_FORMATS = ("savedmodel", "official")


def _export_format(args):
    """--format, or without it: official for a ``.pt`` output (what ``export`` always wrote there), else a
    serving SavedModel folder."""
    if args.format is not None:
        return args.format
    return "official" if str(args.output).lower().endswith(".pt") else "savedmodel"


def cmd_export(args):
    if _export_format(args) == "savedmodel":
        return cmd_export_savedmodel(args)
    from utils.convert.clipcap_export import sidecar_path
    from utils.file_utils import UnsafePathError

    given = [f"--{k.replace('_', '-')}" for k in ("method", "beam_size", "max_length", "max_batch_size")
             if getattr(args, k) is not None]
    if given:
        return _fail(f"{', '.join(given)}: decoding settings apply to --format savedmodel only", EXIT_USAGE)
    for target in (args.output, str(sidecar_path(args.output))):  # refuse before loading the model
        if os.path.lexists(target) and not (args.overwrite and os.path.isfile(target)
                                            and not os.path.islink(target)):
            return _fail(f"{target} already exists: pass --overwrite to replace it (nothing was written)",
                         EXIT_USAGE)
    model, code = model_or_exit_code(args.model)
    if model is None:
        return code
    try:
        pt, description = model.save_official(args.output, clip_name=args.clip_name,
                                              legacy_buffers=args.legacy_buffers, overwrite=args.overwrite)
    except UnsafePathError as e:
        return _fail(str(e), EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"export failed: {e}", EXIT_MODEL)
    with open(description, encoding="utf-8") as f:
        clip = json.load(f)["clip"]
    print(pt)
    print(description)
    if clip is None:
        print(f"warning: the CLIP this model expects is not recorded; it is left null in {description} "
              "(pass --clip-name)", file=sys.stderr)
    return EXIT_OK


def cmd_export_savedmodel(args):
    from models.image_captioning.clip_cap import check_decoding_args
    from models.image_captioning.serving import export_savedmodel, is_exported_savedmodel
    from models.image_captioning.serving_ops import bucket_sizes
    from utils.file_utils import UnsafePathError, check_replaceable

    if args.clip_name is not None or args.legacy_buffers:
        return _fail("--clip-name / --legacy-buffers apply to --format official only", EXIT_USAGE)
    settings = {"method": args.method or "greedy", "beam_size": 5 if args.beam_size is None else args.beam_size,
                "max_length": 67 if args.max_length is None else args.max_length,
                "max_batch_size": 16 if args.max_batch_size is None else args.max_batch_size}
    try:  # every check before the model is loaded
        check_decoding_args(settings["method"], beam_size=settings["beam_size"], max_length=settings["max_length"])
        bucket_sizes(settings["max_batch_size"])
        check_replaceable(args.output, is_exported_savedmodel, args.overwrite)
    except ValueError as e:  # UnsafePathError included
        return _fail(str(e), EXIT_USAGE)
    model, code = model_or_exit_code(args.model)
    if model is None:
        return code
    try:
        directory, metadata, seconds = export_savedmodel(model, args.output, overwrite=args.overwrite, **settings)
    except UnsafePathError as e:
        return _fail(str(e), EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"export failed: {e}", EXIT_MODEL)
    print(directory)
    print(f"SavedModel written in {seconds:.1f} s: {json.dumps(metadata)}", file=sys.stderr)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ serve


def cmd_serve(args):
    try:
        import gradio  # noqa: F401
    except ImportError:
        return _fail("the web demo needs Gradio: pip install -r requirements.txt", EXIT_USAGE)
    from models.image_captioning.web_demo import serve

    model, code = model_or_exit_code(args.model)
    if model is None:
        return code
    serve(model, host=args.host, port=args.port, max_file_bytes=args.max_file_bytes, max_pixels=args.max_pixels)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- download


def cmd_download(args):
    from models.image_captioning.presets import MODELS, describe_sources
    from models.siamese.presets import CLIP_SOURCES, fetch_clip

    if args.list:
        print("\n".join(describe_sources()))
        return EXIT_OK
    if not args.names:
        return _fail("give at least one name (or --list)", EXIT_USAGE)
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


# ------------------------------------------------------------------------------------------------ parser


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main.py", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
        description="ClipCap image captioning in TensorFlow / Keras: caption images, convert the official "
                    "PyTorch checkpoints, download models, train and evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("caption", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
                       help="caption images, directories or glob patterns",
                       description="Caption images: one '<path>\\t<caption>' line per image on stdout (or JSON "
                                   "with --json), results saved to map.json; a rerun skips images already "
                                   "captioned with the same model and settings.")
    p.add_argument("images", nargs="+", help="image files, directories (searched recursively) or glob patterns "
                                             "(quote them: 'photos/**/*.jpg')")
    p.add_argument("--model", default="coco", help=_model_arg_help())
    add_decoding_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of results (image, caption, candidates, error, timings)")
    p.add_argument("--output-dir", help="where map.json is written (default: pretrained_models/<model>/outputs)")
    p.add_argument("--overwrite", action="store_true", help="caption again images already in map.json")
    p.add_argument("--no-save", action="store_true", help="neither read nor write map.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-exif-transpose", action="store_true",
                   help="ignore the EXIF orientation (as OpenAI's and the official ClipCap code do)")
    p.add_argument("--max-file-bytes", type=_non_negative_int, default=DEFAULT_MAX_BYTES,
                   help="refuse image files larger than this many bytes (0: no limit)")
    p.add_argument("--device", help="run the models on 'cpu', 'gpu' or 'gpu:N' (default: TensorFlow's placement, "
                                     "a GPU when one is visible); a device TensorFlow does not see is an error")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("convert", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
                       help="convert an official ClipCap .pt (+ CLIP + tokenizer) to a saved model",
                       description="Convert an official ClipCap PyTorch checkpoint, with the CLIP it was trained "
                                   "on and the GPT-2 tokenizer, into a saved Keras model (loadable without torch).")
    p.add_argument("checkpoint", help="the official ClipCap checkpoint (.pt state dict)")
    p.add_argument("--clip", required=True, help="a CLIP name (ViT-B/32, RN50x4, ...: downloaded) or an OpenAI "
                                                 "CLIP .pt file")
    p.add_argument("--tokenizer", default="gpt2", help="a GPT-2 tokenizer directory or hub name")
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

    p = sub.add_parser("export", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
                       help="export a model: a serving SavedModel, or the official ClipCap PyTorch .pt",
                       description="Export a model converted or trained here. --format savedmodel (the default "
                                   "unless OUTPUT ends with .pt) writes a TensorFlow SavedModel folder that captions "
                                   "encoded image bytes (signature serving_default: images -> captions, scores; "
                                   "signature embeddings: CLIP embeddings -> captions, scores) and needs neither "
                                   "this repository nor torch; the decoding settings are fixed at export. "
                                   "--format official (the default for a .pt OUTPUT) writes the official ClipCap "
                                   "state dict (torch.save of ClipCaptionModel.state_dict(), gpt.* and "
                                   "clip_project.* keys; load_state_dict(strict=True) works) and, beside it, "
                                   "<output stem>.json: the CLIP it needs and the official constructor's arguments.")
    p.add_argument("model", help=_model_arg_help())
    p.add_argument("output", help="savedmodel: the folder to write (new, empty, or an export of ours with "
                                  "--overwrite); official: the .pt file (written atomically, the .json beside it)")
    p.add_argument("--format", choices=EXPORT_FORMATS,
                   help="the output format (default: official when OUTPUT ends with .pt, else savedmodel)")
    p.add_argument("--method", choices=("greedy", "beam"), help="savedmodel: the decoding method baked in "
                                                                "(default: greedy)")
    p.add_argument("--beam-size", type=int, help="savedmodel: beams for --method beam (default: 5)")
    p.add_argument("--max-length", type=int, help="savedmodel: most generated tokens per caption (default: 67)")
    p.add_argument("--max-batch-size", type=int, help="savedmodel: largest compiled batch, a power of two; larger "
                                                      "requests run in chunks (default: 16)")
    p.add_argument("--clip-name", help="official: the CLIP the model expects (ViT-B/32, RN50x4, ...), written to "
                                       "the .json (default: the name recorded by download / train --clip <name>)")
    p.add_argument("--legacy-buffers", action="store_true",
                   help="official: add GPT-2's attn.bias / attn.masked_bias buffers, which older transformers "
                        "(4.x of the official code's time) expect for a strict load")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (savedmodel: only a "
                                                            "SavedModel this command wrote)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
                       help="a web demo (Gradio): upload images, choose the decoding, read captions",
                       description="Start a Gradio web app: drop or upload images (or paste URLs), choose greedy, "
                                   "beam or sampling, see each image with its captions, scores and timings. The "
                                   "model is loaded and compiled once; requests are queued one at a time. "
                                   "Gradio's API (gradio_client) answers on the same server (api_name /caption).")
    p.add_argument("--model", default="coco", help=_model_arg_help())
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--max-file-bytes", type=int, default=20 * 1024 * 1024, help="the largest upload accepted")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="the most pixels an image may decode to")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("download", formatter_class=_Formatter, epilog=ENVIRONMENT_HELP,
                       help="download (and convert) models by name",
                       description="Download the files of ClipCap models (checkpoint, CLIP, tokenizer) and "
                                   "convert them once into the model store; or download CLIP checkpoints.")
    p.add_argument("names", nargs="*", help="coco, conceptual, coco_transformer, or a CLIP name (ViT-B/32, ...)")
    p.add_argument("--list", action="store_true", help="list every name, its files, origins and cache paths")
    p.add_argument("--no-convert", action="store_true", help="only download the files")
    p.add_argument("--force", action="store_true", help="convert again even if a saved model exists")
    p.set_defaults(func=cmd_download)

    train_commands.register(sub)
    batch_command.register(sub)
    return parser


def main(argv=None):
    """Run the CLI; returns the exit code (see ``--help``)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only commands that pass options on (to Beam: `batch`, `extract --runner`) accept them
        if not hasattr(args, "pipeline_args"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pipeline_args = unknown
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere (loading a model, converting): a clean exit, no traceback
        return _fail("interrupted", EXIT_INTERRUPTED)
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
