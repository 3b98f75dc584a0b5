"""The ``batch`` subcommand of ``main.py``: caption many images on Apache Beam (`register` adds it).

    python main.py batch 'photos/**' 'more/*.jpg' --model coco --output out/captions --method beam
    python main.py batch --input-list paths.csv --model runs/shapes/model --output out/captions \\
        --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing

Every option that this command does not know is a Beam pipeline option (``--runner``, ``--project``,
``--region``, ``--temp_location``, ``--num_workers``, ``--machine_type``, ...; write them ``--name=value``).
Apache Beam is imported only when the command runs.
"""

import sys

from models.cli_models import model_or_exit_code, resolve_model_dir
from models.precision import add_precision_argument
from utils.cli import (
    EXIT_FAILED_INPUTS,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_ERRORS,
    Formatter,
    add_decoding_arguments,
    decoding_from_args,
    epilog,
    fail,
    missing_extra,
)

RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


def pipeline_args(args):
    """Beam's options: ``--runner`` and every option this command does not know (``args.pipeline_args``)."""
    return [f"--runner={args.runner}", *getattr(args, "pipeline_args", [])]


def cmd_batch(args):
    missing = missing_extra("apache_beam", "-r requirements-beam.txt", "batch")
    if missing:
        return fail(missing, EXIT_USAGE)
    try:  # bad values fail here, before the model is looked at and the job starts (not on its workers)
        request = decoding_from_args(args)  # checked once, carried to the workers
    except (TypeError, ValueError) as e:
        return fail(str(e), EXIT_USAGE)
    from models.image_captioning import beam_inference

    try:  # an --output whose folder cannot be written: refused before a model is fetched or an input read
        beam_inference.check_output_prefix(args.output)
    except ValueError as e:
        return fail(str(e), EXIT_USAGE)
    model_dir, code = model_or_exit_code(args.model, load=resolve_model_dir)
    if model_dir is None:
        return code
    settings, code = _launch_settings(args, model_dir, request)
    if settings is None:
        return code
    try:
        files = beam_inference.run_batch(
            args.images, model_dir, args.output, method=request, batch_size=args.batch_size,
            exif_transpose=not args.no_exif_transpose, input_lists=args.input_list or (),
            skip_existing=args.skip_existing or (), num_shards=args.num_shards, pipeline_args=pipeline_args(args),
            overwrite=args.overwrite, precision=args.precision, settings=settings)
    except KeyboardInterrupt:
        return fail("interrupted (the output is written when the job ends: nothing of this run was kept)",
                     EXIT_INTERRUPTED)
    except (TypeError, ValueError) as e:
        return fail(str(e), EXIT_USAGE)
    for path in files:
        print(path)
    if args.runner in ("DirectRunner", "PrismRunner"):  # local outputs: summarise them
        records = beam_inference.read_records(args.output)
        failed = sum(r["error"] is not None for r in records)
        print(f"{len(records) - failed} images captioned, {failed} errors", file=sys.stderr)
        if failed:
            return EXIT_FAILED_INPUTS
    return EXIT_OK


def _launch_settings(args, model_dir, request):
    """``(the records' settings, None)`` read here, in the launching process, from the saved model (its name,
    identity and CLIP input size: `beam_inference.batch_settings`, `clip_input_resolution`), or ``(None, exit
    code)`` with the error printed: 3 for a folder that is no saved model or a damaged one (as ``caption``),
    2 for a model without a CLIP image encoder."""
    from models.image_captioning import beam_inference

    try:
        settings = beam_inference.batch_settings(model_dir, request.method, request.given,
                                                 not args.no_exif_transpose, args.precision)
        beam_inference.clip_input_resolution(model_dir)
    except beam_inference.NoImageEncoderError as e:
        return None, fail(str(e), EXIT_USAGE)
    except MODEL_ERRORS as e:
        return None, fail(f"cannot load model {args.model!r}: {e}", EXIT_MODEL)
    return settings, None


BATCH_EPILOG = epilog(
    ["python main.py batch 'photos/**' --model coco --output out/captions --method beam --beam-size 5",
     "python main.py batch --input-list paths.csv --model coco --output out/run2 --skip-existing out/captions \\",
     "    --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing",
     "python main.py batch 'gs://bucket/photos/**' --model /app/pretrained_models/coco --output gs://bucket/out \\",
     "    --runner=DataflowRunner --project=my-project --region=europe-west1 --temp_location=gs://bucket/tmp"],
    "0 every image captioned, 1 some inputs failed (local runners: records with an error), 2 usage error,\n"
    "  3 the model could not be found or loaded, 130 interrupted (nothing of the run is kept)")


def register(subparsers):
    """Add ``batch`` to ``main.py``'s subparsers."""
    p = subparsers.add_parser(
        "batch", formatter_class=Formatter, epilog=BATCH_EPILOG,
        help="caption many images on Apache Beam (local or distributed)",
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
    add_decoding_arguments(p, batch_help="images per model call: a power of two")
    add_precision_argument(p)
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
