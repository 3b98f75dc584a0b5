"""``main.py export`` (a serving SavedModel or the official ClipCap .pt) and ``main.py serve`` (the Gradio web
demo): the commands that hand a model to the outside world. Registered by ``main.py`` (`register`).
"""

import json
import os
import sys

from custom_architectures.decoding import request_options
from custom_architectures.samplers import servable_methods
from models.cli_models import load_model, model_or_exit_code
from models.precision import DEFAULT_PRECISION, add_precision_argument
from utils.cli import (
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_ARG_HELP,
    Formatter,
    add_decoding_arguments,
    decoding_from_args,
    epilog,
    missing_extra,
)
from utils.cli import fail as _fail

# ----------------------------------------------------------------------------------------------- export


EXPORT_FORMATS = ("savedmodel", "official")
#: what a SavedModel cannot do: several captions per image, draws, re-ranking (`serving.check_servable`)
NOT_EXPORTED = ("num_captions", "seed", "rerank", "rerank_weight")


def _export_format(args):
    """--format, or without it: official for a ``.pt`` output (what ``export`` always wrote there), else a
    serving SavedModel folder."""
    if args.format is not None:
        return args.format
    return "official" if str(args.output).lower().endswith(".pt") else "savedmodel"


def cmd_export(args):
    if _export_format(args) == "savedmodel":
        return cmd_export_savedmodel(args)
    from models.cli_models import UnknownModelError, resolve_model_dir
    from utils.convert.clipcap_export import check_official_targets
    from utils.file_utils import UnsafePathError

    given = [flag for flag, value in _decoding_flags(args) if value is not None]
    if args.precision not in (None, DEFAULT_PRECISION):  # None: as saved
        given.append("--precision")
    if given:
        return _fail(f"{', '.join(given)}: decoding settings and --precision apply to --format savedmodel only "
                     "(the official file holds the float32 weights)", EXIT_USAGE)
    missing = missing_extra("torch", '"torch>=2.13"', "export --format official (it writes a PyTorch file)")
    if missing:
        return _fail(missing, EXIT_USAGE)
    try:  # refuse before loading the model: never inside its folder, never a .json an export did not write
        source = resolve_model_dir(args.model, download=False)
    except UnknownModelError:
        source = None  # reported by the load below
    try:
        check_official_targets(args.output, args.overwrite, source if source and os.path.isdir(source) else None)
    except ValueError as e:  # UnsafePathError included
        return _fail(str(e).replace("overwrite=True (--overwrite)", "--overwrite"), EXIT_USAGE)
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


def _decoding_flags(args):
    """(flag, value) of the savedmodel-only options: ``--method``, the decoding options, ``--max-batch-size``."""
    options = [(o.flag, getattr(args, o.name, None)) for o in request_options(servable_methods())]
    return [("--method", args.method), *options, ("--max-batch-size", args.max_batch_size)]


def cmd_export_savedmodel(args):
    from models.image_captioning.serving import check_servable, export_savedmodel, is_exported_savedmodel
    from models.image_captioning.serving_ops import bucket_sizes
    from utils.file_utils import UnsafePathError, check_replaceable

    if args.clip_name is not None or args.legacy_buffers:
        return _fail("--clip-name / --legacy-buffers apply to --format official only", EXIT_USAGE)
    max_batch_size = 16 if args.max_batch_size is None else args.max_batch_size
    try:  # every check before the model is loaded
        request = decoding_from_args(args)  # checked once, carried to the export
        check_servable(request)
        bucket_sizes(max_batch_size)
        check_replaceable(args.output, is_exported_savedmodel, args.overwrite)
    except ValueError as e:  # UnsafePathError included
        return _fail(str(e), EXIT_USAGE)
    model, code = model_or_exit_code(args.model, load=lambda name: load_model(name, args.precision))
    if model is None:
        return code
    try:
        directory, metadata, seconds = export_savedmodel(model, args.output, request, max_batch_size=max_batch_size,
                                                         overwrite=args.overwrite)
    except UnsafePathError as e:
        return _fail(str(e), EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"export failed: {e}", EXIT_MODEL)
    print(directory)
    print(f"SavedModel written in {seconds:.1f} s: {json.dumps(metadata)}", file=sys.stderr)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ serve


def cmd_serve(args):
    missing = missing_extra("gradio", "-r requirements-serve.txt", "the web demo (serve)")
    if missing:
        return _fail(missing, EXIT_USAGE)
    from models.image_captioning.web_demo import serve

    model, code = model_or_exit_code(args.model, load=lambda name: load_model(name, args.precision))
    if model is None:
        return code
    serve(model, host=args.host, port=args.port, max_file_bytes=args.max_file_bytes, max_pixels=args.max_pixels,
          max_request_pixels=args.max_request_pixels, allow_private_urls=args.allow_private_urls)
    return EXIT_OK


EXPORT_EPILOG = epilog(
    ["python main.py export coco exports/coco/1 --method beam       # a SavedModel for TF Serving / Vertex AI",
     "python main.py export runs/coco/model my_coco.pt --format official --clip-name ViT-B/32",
     "    # the official ClipCap state dict (+ my_coco.json: its CLIP and constructor arguments)"],
    "0 exported (the paths are printed), 2 usage error (an option of the other format, an existing output\n"
    "  without --overwrite), 3 the model could not be loaded or exported, 130 interrupted")
SERVE_EPILOG = epilog(
    ["python main.py serve --model coco                     # http://127.0.0.1:7860",
     "python main.py serve --model my_coco --host 0.0.0.0 --port 8080   # reachable from other machines"],
    "0 stopped, 2 usage error (Gradio missing, unknown model), 3 the model could not be loaded, 130 interrupted")


def register(subparsers):
    """Add ``export`` and ``serve`` to ``main.py``'s subparsers."""
    p = subparsers.add_parser("export", formatter_class=Formatter, epilog=EXPORT_EPILOG,
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
    p.add_argument("model", help=MODEL_ARG_HELP)
    p.add_argument("output", help="savedmodel: the folder to write (new, empty, or an export of ours with "
                                  "--overwrite); official: the .pt file (written atomically, the .json beside it)")
    p.add_argument("--format", choices=EXPORT_FORMATS,
                   help="the output format (default: official when OUTPUT ends with .pt, else savedmodel)")
    # the decoding baked in: the methods whose sampler can be compiled into the graph, and their options
    add_decoding_arguments(p, methods=servable_methods(), skip=NOT_EXPORTED, prefix="savedmodel: ",
                           method_default=None, batch_size=None)
    p.add_argument("--max-batch-size", type=int, help="savedmodel: largest compiled batch, a power of two; larger "
                                                      "requests run in chunks (default: 16)")
    p.add_argument("--clip-name", help="official: the CLIP the model expects (ViT-B/32, RN50x4, ...), written to "
                                       "the .json (default: the name recorded by download / train --clip <name>)")
    p.add_argument("--legacy-buffers", action="store_true",
                   help="official: add GPT-2's attn.bias / attn.masked_bias buffers, which older transformers "
                        "(4.x of the official code's time) expect for a strict load")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (savedmodel: only a "
                                                            "SavedModel this command wrote; official: the .pt if it "
                                                            "is a PyTorch checkpoint, and "
                                                            "the .json only if an export wrote it; never inside a "
                                                            "saved model's folder)")
    add_precision_argument(p)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("serve", formatter_class=Formatter, epilog=SERVE_EPILOG,
                       help="a web demo (Gradio): upload images, choose the decoding, read captions",
                       description="Start a Gradio web app: drop or upload images (or paste http(s) URLs), choose greedy, "
                                   "beam or sampling, see each image with its captions, scores and timings. The "
                                   "model is loaded and compiled once; requests are queued one at a time. "
                                   "Gradio's API (gradio_client) answers on the same server (api_name /caption).")
    p.add_argument("--model", default="coco", help=MODEL_ARG_HELP)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--max-file-bytes", type=int, default=20 * 1024 * 1024, help="the largest upload accepted")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="the most pixels an image may decode to")
    p.add_argument("--max-request-pixels", type=int, help="the most pixels one request's images may decode to "
                                                          "together (default: twice --max-pixels); an image "
                                                          "beyond it gets an error row")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let the URL box fetch loopback, private, link-local and other non-public addresses "
                        "(127.0.0.1, 10.x, 192.168.x, 169.254.169.254, ::1, ...). Visitors can then reach whatever "
                        "this machine reaches: its own services, the local network, a cloud's metadata service. "
                        "Only for a demo whose every visitor you trust. Without it such URLs are refused; server "
                        "paths and other schemes are refused either way")
    add_precision_argument(p)
    p.set_defaults(func=cmd_serve)
