"""The ``train``, ``extract`` and ``evaluate`` subcommands of ``main.py`` (`register` adds them).

    python main.py extract data/shapes/train/captions.json --clip clip.pt --output emb/train.npz
    python main.py train emb/train.npz --val emb/val.npz --tokenizer tok/ --gpt2 gpt2/ --clip clip.pt \
        --output runs/shapes --epochs 10 --prefix-only
    python main.py evaluate data/shapes/val/captions.json --model runs/shapes/model --output runs/shapes/eval

Heavy libraries are imported inside the command functions, so ``main.py --help`` stays instant.
"""

import json
import logging
import sys

from custom_architectures.samplers import deterministic_methods
from hparams.training import TrainingHParams
from models.cli_models import UnknownModelError, load_model
from utils.cli import EXIT_FAILED_INPUTS as EXIT_FAILED
from utils.cli import (
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_ERRORS,
    add_decoding_arguments,
    decoding_from_args,
    epilog,
    missing_extra,
    report_skipped,
)
from utils.cli import Formatter as _Formatter
from utils.cli import fail as _fail

logger = logging.getLogger(__name__)

DATA_FORMATS = ("coco", "karpathy", "table")
STRATEGIES = ("default", "mirrored", "multiworker")


def _add_data_arguments(p):
    p.add_argument("data", help="the captions: a COCO annotations JSON, a Karpathy dataset_*.json, or a CSV / "
                                "JSONL table of image,caption")
    p.add_argument("--format", choices=DATA_FORMATS, help="the data format (default: from the file: .csv / "
                                                          ".tsv / .jsonl -> table, dataset_*.json -> karpathy, "
                                                          "other .json -> coco)")
    p.add_argument("--images", help="the image folder (COCO), root (Karpathy) or base of relative paths (table); "
                                    "default: the data file's folder")
    p.add_argument("--split", default="test", help="Karpathy split(s), comma-separated (train includes restval)")


def load_dataset(args):
    """A `CaptionDataset` from the data arguments (``data``, ``--format``, ``--images``, ``--split``)."""
    from pathlib import Path

    fmt = args.format
    if fmt is None:
        suffix, name = Path(args.data).suffix.lower(), Path(args.data).name
        fmt = "table" if suffix in (".csv", ".tsv", ".jsonl", ".ndjson") else (
            "karpathy" if name.startswith("dataset_") else "coco")
    if fmt == "coco":
        from datasets.coco import load_coco

        return load_coco(args.data, args.images)
    if fmt == "karpathy":
        from datasets.karpathy import load_karpathy

        return load_karpathy(args.data, args.images, split=args.split.split(","))
    from datasets.captions_table import load_captions_table

    return load_captions_table(args.data, args.images)


def _load_clip(path):
    from models.siamese.clip import CLIP

    return CLIP.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ extract


def cmd_extract(args):
    from datasets.caption_dataset import DatasetError
    from datasets.embeddings import (
        check_embedded_output,
        clip_encoder,
        extract_embeddings,
        save_embedded_dataset,
    )

    if getattr(args, "pipeline_args", None) and args.runner is None:
        return _fail(f"unrecognized arguments: {' '.join(args.pipeline_args)} (Beam options need --runner)",
                     EXIT_USAGE)
    missing = args.runner is not None and missing_extra("apache_beam", "-r requirements-beam.txt", "extract --runner")
    if missing:
        return _fail(missing, EXIT_USAGE)
    try:
        check_embedded_output(args.output)  # before the (long) extraction: never overwrite a user's file
        dataset = load_dataset(args)
    except (DatasetError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        clip = _load_clip(args.clip)
    except MODEL_ERRORS as e:  # as every command loading a model: KeyError / TypeError from a damaged folder too
        return _fail(f"cannot load CLIP {args.clip!r}: {e}", EXIT_MODEL)
    if args.runner is not None:
        return _extract_on_beam(args, dataset, clip)
    encoder = clip_encoder(clip, exif_transpose=not args.no_exif_transpose)
    try:
        result = extract_embeddings(dataset.images, encoder, cache_dir=args.cache_dir, batch_size=args.batch_size,
                                    key_mode=args.key_mode, progress=not args.no_progress)
        path = save_embedded_dataset(args.output, dataset, result, encoder.model_id)
    except KeyboardInterrupt:
        return _fail("interrupted; every embedding computed so far is in the cache: run again to resume",
                     EXIT_INTERRUPTED)
    except ValueError as e:  # a cache folder of another model or mixed widths (DatasetError), an output replaced
        return _fail(str(e), EXIT_USAGE)  # by a user's file meanwhile (UnsafePathError): named, no traceback
    print(f"{path}: {len(result.indices)} images ({result.cache_hits} from the cache, {result.computed} "
          f"encoded), {len(dataset)} captions in {dataset.name}")
    return EXIT_FAILED if report_skipped(result.failed, dataset.images, dataset.num_images) else EXIT_OK


def _extract_on_beam(args, dataset, clip):
    from datasets.beam_extraction import extract_on_beam
    from models.batch_command import pipeline_args

    try:
        path, result = extract_on_beam(dataset, args.clip, args.output, clip=clip, shards=args.shards,
                                       batch_size=args.batch_size, exif_transpose=not args.no_exif_transpose,
                                       pipeline_args=pipeline_args(args))
    except KeyboardInterrupt:
        return _fail("interrupted (the job's files are written when it ends: nothing of this run was kept)",
                     EXIT_INTERRUPTED)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    print(f"{path}: {len(result.indices)} images ({result.computed} encoded on {args.runner}), {len(dataset)} "
          f"captions in {dataset.name}")
    return EXIT_FAILED if report_skipped(result.failed, dataset.images, dataset.num_images) else EXIT_OK


# -------------------------------------------------------------------------------------------------- train


def make_strategy(name):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # cluster from the TF_CONFIG variable
    return None


def cmd_train(args):
    from custom_train_objects.model_factory import build_clipcap_for_training, embeddings_clip_problem
    from custom_train_objects.trainer import Trainer, TrainingDiverged, TrainingStopped, check_output_dir
    from datasets.caption_dataset import DatasetError
    from datasets.embeddings import extracted_with, load_embedded_dataset
    from utils.file_utils import check_model_name

    try:
        if args.name is not None:  # recorded in the model; it decides where save / predict write by default
            check_model_name(args.name)
        check_output_dir(args.output)  # a file there: refused before loading anything
        hp = TrainingHParams.from_args(args)
    except (ValueError, OSError) as e:
        return _fail(str(e), EXIT_USAGE)
    # MultiWorkerMirroredStrategy configures the collective ops of the TensorFlow context: it must come before
    # any other TensorFlow work (loading CLIP, building the model), or TF raises "Collective ops must be
    # configured at program startup"
    strategy = make_strategy(args.strategy)
    try:
        train, embeddings, meta = load_embedded_dataset(args.train)
        val = load_embedded_dataset(args.val) if args.val else None
    except DatasetError as e:
        return _fail(str(e), EXIT_USAGE)
    clip = None
    model_id = str(meta.get("model_id") or "")
    try:
        if args.clip:
            clip = _load_clip(args.clip)
            if model_id.startswith("clip:") and not extracted_with(clip, model_id):  # before building the model
                return _fail(f"{args.train} was extracted with another CLIP than {args.clip} (the model would "
                             "caption with a CLIP it was not trained on)", EXIT_USAGE)
        model = build_clipcap_for_training(hp, prefix_size=embeddings.shape[1], tokenizer=args.tokenizer,
                                           gpt2=args.gpt2, gpt2_config=args.gpt2_config, init_model=args.init_model,
                                           clip=clip, name=args.name)
        # the CLIP the trained model keeps (--clip, else --init-model's) produced the training and --val files
        kept = args.clip or f"the CLIP of {args.init_model}"
        checks = ([] if clip is not None else [(args.train, meta)]) + ([(args.val, val[2])] if val else [])
        for source, file_meta in checks:
            problem = embeddings_clip_problem(model.clip, file_meta.get("model_id"), source, kept,
                                              reference=model_id)
            if problem:
                return _fail(problem, EXIT_USAGE)
        from models.siamese.presets import CLIP_SOURCES

        if args.clip in CLIP_SOURCES:  # recorded for `main.py export --format official`
            model.info["clip_name"] = args.clip
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        return _fail(f"cannot build the model: {e}", EXIT_MODEL)
    try:
        trainer = Trainer(model, hp, args.output, strategy=strategy, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # an output folder (a worker's too) that cannot be used
        return _fail(str(e), EXIT_USAGE)
    try:
        history = trainer.fit(train, embeddings, val_dataset=val[0] if val else None,
                              val_embeddings=val[1] if val else None, resume=not args.no_resume,
                              stop_after_steps=args.stop_after_steps, embeddings_model_id=model_id)
    except TrainingStopped as e:
        print(f"{e}: run the same command again to resume", file=sys.stderr)
        return EXIT_OK
    except TrainingDiverged as e:  # no model (exit 3, as a model that cannot be built); the checkpoints are kept
        return _fail(str(e), EXIT_MODEL)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume from the last checkpoint",
                     EXIT_INTERRUPTED)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    for record in history["epochs"]:
        print(json.dumps(record))
    print(f"{args.output}/model")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args):
    from custom_train_objects.evaluation import NoImagesError, evaluate_model
    from datasets.caption_dataset import DatasetError
    from loggers.console import quiet_logger

    try:
        request = decoding_from_args(args)  # the one check of the decoding options, before any work
        dataset = load_dataset(args)
    except (DatasetError, TypeError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        model = load_model(args.model)
        clip_for_score = _load_clip(args.clip_score_model) if args.clip_score_model else None
    except UnknownModelError as e:
        return _fail(e.args[0], EXIT_USAGE)
    except MODEL_ERRORS as e:  # a damaged saved model: exit 3 naming the file
        return _fail(f"cannot load model: {e}", EXIT_MODEL)
    try:
        with quiet_logger("custom_train_objects.evaluation"):  # skipped metrics: noted below
            report = evaluate_model(model, dataset, args.output, method=request, batch_size=args.batch_size,
                                    metrics=args.metrics, clip_for_score=clip_for_score, cache_dir=args.cache_dir,
                                    progress=not args.no_progress)
    except NoImagesError as e:  # every image unreadable: listed, as extract lists them; nothing written
        names = list(e.failed)
        report_skipped(dict(enumerate(e.failed.values())), names, len(names))
        return _fail(str(e), EXIT_FAILED)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    print(json.dumps(report["metrics"], indent=1))
    for metric, reason in report["skipped"].items():
        print(f"note: {metric} skipped: {reason}", file=sys.stderr)
    print(f"{args.output}/metrics.json")
    return EXIT_FAILED if report["failed_images"] else EXIT_OK


# ------------------------------------------------------------------------------------------------- parser


EXTRACT_EPILOG = epilog(
    ["python main.py extract data/coco/annotations/captions_train2014.json --images data/coco/train2014 \\",
     "    --clip ViT-B/32 --output emb/train.npz",
     "python main.py extract data/dataset_coco.json --format karpathy --split train --clip RN50x4 --output emb/k.npz",
     "python main.py extract data/train.csv --clip ViT-B/32 --output emb/train.npz --runner DataflowRunner ..."],
    "0 every image embedded, 1 some images could not be read (listed, left out), 2 usage error,\n"
    "  3 the CLIP could not be loaded, 130 interrupted (run again to resume from the cache)")
TRAIN_EPILOG = epilog(
    ["python main.py train emb/train.npz --val emb/val.npz --tokenizer gpt2 --gpt2 gpt2 --clip ViT-B/32 \\",
     "    --output runs/coco                     # the official recipe (--hparams FILE or flags change it)",
     "python main.py train emb/train.npz --tokenizer gpt2 --gpt2 gpt2 --output runs/coco --prefix-only",
     "python main.py caption demo/ --model runs/coco/model        # then caption with the trained model"],
    "0 trained (or stopped at --stop-after-steps), 2 usage error, 3 the model could not be built,\n"
    "  130 interrupted (the same command resumes from the last checkpoint)")
EVALUATE_EPILOG = epilog(
    ["python main.py evaluate data/coco/annotations/captions_val2014.json --images data/coco/val2014 \\",
     "    --model coco --output runs/eval --metrics BLEU CIDEr",
     "python main.py evaluate data/dataset_coco.json --format karpathy --split test --model runs/coco/model \\",
     "    --output runs/coco/eval --method beam"],
    "0 evaluated, 1 some images could not be captioned (left out of the scores), 2 usage error,\n"
    "  3 the model could not be loaded, 130 interrupted")


def register(subparsers):
    """Add ``extract``, ``train`` and ``evaluate`` to ``main.py``'s subparsers."""
    from custom_train_objects.evaluation import ALL_METRICS

    p = subparsers.add_parser(
        "extract", formatter_class=_Formatter, epilog=EXTRACT_EPILOG,
        help="compute the CLIP embeddings of a dataset's images (cached)",
        description="Embed every image of a captions dataset once with CLIP (batched, cached on disk, resumable: "
                    "run again after an interruption) and write images, captions and embeddings to one .npz "
                    "that `train` reads. Unreadable images are listed and left out (exit code 1).")
    _add_data_arguments(p)
    p.add_argument("--clip", required=True, help="a CLIP name (ViT-B/32, RN50x4, ...: downloaded once), an "
                                                  "OpenAI CLIP .pt file or a saved CLIP directory")
    p.add_argument("--output", required=True, help="the .npz to write (new, or an earlier output of extract, "
                                                    "which is replaced; any other file is refused)")
    p.add_argument("--cache-dir", default="cache/embeddings", help="the embedding cache (per CLIP model)")
    p.add_argument("--batch-size", type=int, default=64, help="images per CLIP encoding batch")
    p.add_argument("--key-mode", choices=("stat", "content"), default="stat",
                   help="identify an image by path + size + mtime, or by a hash of its bytes")
    p.add_argument("--no-exif-transpose", action="store_true", help="read pixels as stored (as the official code)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--runner", help="embed on Apache Beam with this runner (DirectRunner, PrismRunner, "
                                    "DataflowRunner, FlinkRunner, SparkRunner); options this command does not know "
                                    "are then Beam pipeline options (--name=value). No cache: every image once")
    p.add_argument("--shards", help="with --runner: the prefix of the job's files, readable here afterwards "
                                    "(default OUTPUT.shards/part; gs://... on Dataflow)")
    p.set_defaults(func=cmd_extract, split="train", pipeline_args=[])

    p = subparsers.add_parser(
        "train", formatter_class=_Formatter, epilog=TRAIN_EPILOG,
        help="train a ClipCap on extracted embeddings",
        description="Train a ClipCap (mapper, and GPT-2 unless --prefix-only) on embeddings written by `extract`. "
                    "Checkpoints every epoch in OUTPUT/checkpoints (the same command resumes exactly), logs in "
                    "OUTPUT/logs (CSV) and OUTPUT/tensorboard, the trained model in OUTPUT/model (a ClipCap "
                    "that `caption --model OUTPUT/model` uses).")
    p.add_argument("train", help="the training embeddings (.npz from `extract`)")
    p.add_argument("--val", help="validation embeddings (.npz from `extract`): validation loss every epoch")
    p.add_argument("--output", required=True, help="the run directory")
    p.add_argument("--tokenizer", default="gpt2", help="a GPT-2-family tokenizer directory or hub name")
    p.add_argument("--gpt2", help="a GPT-2-family checkpoint: Hugging Face directory (config.json + weights) or "
                                  "hub name in the HF cache")
    p.add_argument("--gpt2-config", help="instead of --gpt2: a JSON object of GPT2 constructor arguments for a "
                                         "randomly initialised language model (vocab_size: the tokenizer's)")
    p.add_argument("--init-model", help="continue from a saved ClipCap directory instead (its mapper, GPT-2 and "
                                        "tokenizer)")
    p.add_argument("--clip", help="the CLIP the embeddings were extracted with, saved inside the model so that "
                                  "it captions images (checked against the embeddings)")
    p.add_argument("--name", help="the model's name (default: the output directory's name)")
    p.add_argument("--strategy", choices=STRATEGIES, default="default",
                   help="tf.distribute strategy: mirrored = every local GPU, multiworker = hosts from TF_CONFIG")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after this many steps in total")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    TrainingHParams.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", formatter_class=_Formatter, epilog=EVALUATE_EPILOG,
        help="caption a COCO-format split and score the captions",
        description="Caption every image of a split and score the captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr, "
                    "SPICE (pycocoevalcap; METEOR, SPICE and the PTB tokenizer need Java, SPICE also Stanford "
                    "CoreNLP: skipped with a message when missing) and CLIPScore. Writes OUTPUT/results.json "
                    "(COCO results format) and OUTPUT/metrics.json. With --rerank clip the captions are chosen by "
                    "the model's CLIP, which CLIPScore then favours when that same CLIP scores them.")
    _add_data_arguments(p)
    p.add_argument("--model", required=True, help="a saved ClipCap directory or model name")
    p.add_argument("--output", required=True, help="where results.json and metrics.json go")
    # the methods that always give the same captions; the best caption of each image is scored (so neither
    # --num-captions nor --seed)
    add_decoding_arguments(p, methods=deterministic_methods(), skip=("num_captions", "seed"), batch_size=32)
    p.add_argument("--metrics", nargs="+", choices=ALL_METRICS, default=list(ALL_METRICS),
                   help="the metrics to compute (default: all of them)")
    p.add_argument("--clip-score-model", help="a CLIP with its text encoder for CLIPScore (default: the model's "
                                              "CLIP when it has one; the paper uses ViT-B/32)")
    p.add_argument("--cache-dir", default="cache/embeddings", help="the embedding cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_evaluate)
