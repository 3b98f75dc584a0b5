"""The ``batch`` subcommand of ``main.py``: caption many images on Apache Beam (`register` adds it).

    python main.py batch 'photos/**' 'more/*.jpg' --model coco --output out/captions --method beam
    python main.py batch --input-list paths.csv --model runs/shapes/model --output out/captions \\
        --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing

Every option that this command does not know is a Beam pipeline option (``--runner``, ``--project``,
``--region``, ``--temp_location``, ``--num_workers``, ``--machine_type``, ...; write them ``--name=value``).
Apache Beam is imported only when the command runs.
"""

import argparse
import os
import sys

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _fail(message, code):
    print(f"error: {message}", file=sys.stderr)
    return code


def resolve_model_dir(name_or_dir):
    """A saved model directory: as given, a saved name in the model store, or an official name (downloaded
    and converted once, here, on the machine that starts the job)."""
    from utils import downloads

    if os.path.isdir(name_or_dir):
        return os.path.abspath(name_or_dir)
    directory = downloads.saved_model_dir(name_or_dir)
    if downloads.is_saved_model(directory):
        return str(directory)
    if name_or_dir in downloads.MODELS:
        downloads.get_pretrained(name_or_dir)
        return str(downloads.saved_model_dir(name_or_dir))
    raise KeyError(f"unknown model {name_or_dir!r}: not a directory, not a saved model in {downloads.home_dir()}, "
                   f"and not one of {', '.join(downloads.MODELS)}")


def generate_kwargs(args):
    keys = ("beam_size", "max_length", "temperature", "top_k", "top_p", "num_captions", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def pipeline_args(args):
    """Beam's options: ``--runner`` and every option this command does not know (``args.pipeline_args``)."""
    return [f"--runner={args.runner}", *getattr(args, "pipeline_args", [])]


def cmd_batch(args):
    try:
        model_dir = resolve_model_dir(args.model)
    except KeyError as e:
        return _fail(e.args[0], EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"cannot load model {args.model!r}: {e}", EXIT_MODEL)
    from models.image_captioning.beam_inference import read_records, run_batch

    try:
        files = run_batch(args.images, model_dir, args.output, method=args.method, batch_size=args.batch_size,
                          generate_kwargs=generate_kwargs(args), exif_transpose=not args.no_exif_transpose,
                          input_lists=args.input_list or (), skip_existing=args.skip_existing or (),
                          num_shards=args.num_shards, pipeline_args=pipeline_args(args), overwrite=args.overwrite)
    except KeyboardInterrupt:
        return _fail("interrupted (the output is written when the job ends: nothing of this run was kept)",
                     EXIT_INTERRUPTED)
    except (TypeError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    for path in files:
        print(path)
    if args.runner in ("DirectRunner", "PrismRunner"):  # local outputs: summarise them
        records = read_records(args.output)
        failed = sum(r["error"] is not None for r in records)
        print(f"{len(records) - failed} images captioned, {failed} errors", file=sys.stderr)
        if failed:
            return EXIT_FAILED_INPUTS
    return EXIT_OK


def register(subparsers):
    """Add ``batch`` to ``main.py``'s subparsers."""
    p = subparsers.add_parser(
        "batch", formatter_class=_Formatter, help="caption many images on Apache Beam (local or distributed)",
        description="Caption images with Apache Beam's RunInference: on this machine (DirectRunner, PrismRunner) "
                    "or on a cluster (DataflowRunner, FlinkRunner, SparkRunner). One JSON line per input "
                    "(image, caption, candidates with tokens and scores, error, model, settings) in sharded "
                    "files OUTPUT-records-SSSSS-of-NNNNN.jsonl; errors also in OUTPUT-errors-*.jsonl. Options this "
                    "command does not know are Beam pipeline options (--name=value).")
    p.add_argument("images", nargs="*", help="image files, directories (searched recursively) or glob patterns "
                                             "on any Beam file system (local, gs://, s3://, hdfs://)")
    p.add_argument("--input-list", action="append", help="a text file of image paths (one a line) or a CSV "
                                                         "with a header (column image / path / file_name, else "
                                                         "the first); repeatable")
    p.add_argument("--model", default="coco", help="a saved ClipCap directory (readable by every worker), a "
                                                   "saved name or an official name (coco, conceptual, ...)")
    p.add_argument("--output", required=True, help="the output prefix (local path or gs://... / s3://...)")
    p.add_argument("--method", choices=("greedy", "beam", "sample"), default="greedy", help="decoding method")
    p.add_argument("--beam-size", type=int, help="beams for --method beam (model default: 5)")
    p.add_argument("--max-length", type=int, help="maximum caption length in tokens (model default: 67)")
    p.add_argument("--temperature", type=float, help="softmax temperature (sample, beam)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (--method sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (--method sample)")
    p.add_argument("--num-captions", type=int, help="captions returned per image (beam, sample)")
    p.add_argument("--seed", type=int, help="random seed for --method sample")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call: a power of two")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of an earlier run at the same --output prefix (default: refuse)")
    p.add_argument("--num-shards", type=int, default=0, help="output files (0: the runner decides)")
    p.add_argument("--skip-existing", action="append", metavar="PREFIX",
                   help="an earlier output prefix: images captioned there with the same settings are skipped "
                        "(repeatable; write the new run to another prefix)")
    p.add_argument("--no-exif-transpose", action="store_true",
                   help="ignore the EXIF orientation (as OpenAI's and the official ClipCap code do)")
    p.add_argument("--runner", default="DirectRunner", help=f"the Beam runner ({', '.join(RUNNERS)}, ...)")
    p.set_defaults(func=cmd_batch, pipeline_args=[])
