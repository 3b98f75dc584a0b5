"""Caption millions of images on Apache Beam: a `ModelHandler` for ClipCap used with ``RunInference``.

The same pipeline runs on the local DirectRunner / PrismRunner and on Dataflow, Flink or Spark::

    inputs (patterns, directories, files; or a text / CSV list of paths)
      -> match with Beam's file systems (local, gs://, s3://, hdfs:// with Beam's extras)
      -> fileio.ReadMatches -> read + CLIP preprocess (a DoFn; a bad image becomes an error record)
      -> RunInference(ClipCapModelHandler): BatchElements of exactly ``batch_size`` images (the compiled
         batch shape), CLIP encoding + decoding, the model loaded once per worker process, shared by its threads
      -> one JSON line per input in sharded files ``<output>-records-SSSSS-of-NNNNN.jsonl``;
         error records also in ``<output>-errors-SSSSS-of-NNNNN.jsonl`` (the dead-letter output)

A record is ``{"image", "caption", "candidates": [{"text", "tokens", "score"(, "clip_score")}], "error", "model",
"settings"}`` plus, when captioned, the ``size`` and ``sha256`` of the bytes captioned; ``error`` is None when
captioned, ``settings`` is `prediction.generation_settings` (what map.json stores: the model's identity, its
name for display, the method and its arguments). For the same model, images, settings and batch size the captions and scores are those of
``ClipCap.predict``: the same `ImageEmbedder` stages (reading, preprocessing, ``clip.encode_pixels``)
and ``model.generate`` on batches of the same size (``method="sample"``: each image's draws are keyed by
its path or URL and the seed, `custom_architectures.samplers.draw_id`, as in ``predict``).

Outputs are written by Beam's text sink: temporary files renamed when the job ends (all or nothing per job).
``skip_existing`` lists earlier outputs: an image captioned there (no error) with the same settings (the same
model identity, not just name) from the same bytes is skipped (`models.image_captioning.freshness`, the rule
map.json follows; such an image is read once more to be hashed), so a large job can be split or resumed;
write each run to a new prefix.

Example::

    from models.image_captioning.beam_inference import run_batch
    run_batch(["photos/", "more/*.jpg"], "pretrained_models/coco", "out/captions", method="beam",
              generate_kwargs={"beam_size": 5}, pipeline_args=["--runner=DirectRunner"])
    # -> out/captions-records-00000-of-00001.jsonl, out/captions-errors-00000-of-00001.jsonl
"""

import contextlib
import csv
import io
import logging
import os
import re
import shutil
from pathlib import Path

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from custom_architectures.decoding import as_decoding
from custom_architectures.samplers import draw_id
from models.image_captioning.freshness import answers, content_stamp, file_stamp, stream_stamp
from models.siamese.image_embedding import ImageEmbedder
from utils.file_utils import (
    DEFAULT_MAX_BYTES,
    UnsafePathError,
    check_writable_dir,
    file_lock,
    json_text,
    parse_json,
    read_json,
)
from utils.image_io import IMAGE_EXTENSIONS, ImageReadError, read_image_file

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
ERRORS = "errors"
# Beam's text sink deletes the files matching "<its prefix>-*-of-<N><suffix>" before renaming its own: the two
# file sets need prefixes that do not match each other's glob ("<output>-*" would also match the errors).
RECORDS_NAME, ERRORS_NAME = "records", "errors"
OUTPUT_SUFFIX = ".jsonl"
_GLOB_CHARS = set("*?[")


# ------------------------------------------------------------------------------------------------- records


def make_record(image, settings, candidates=None, error=None, stamp=None):
    """One output line: the image, its best caption, every candidate (text, token ids, score), the error, and
    the ``size`` / ``sha256`` of the bytes captioned (``stamp``, `freshness.content_stamp`)."""
    if candidates is not None:
        candidates = [{"text": c["text"], "tokens": [int(t) for t in c["tokens"]], "score": float(c["score"]),
                       **({"clip_score": float(c["clip_score"])} if "clip_score" in c else {})}
                      for c in candidates]
    return {"image": image, "caption": candidates[0]["text"] if candidates else None, "candidates": candidates,
            "error": error, "model": settings.get("model"), "settings": settings, **(stamp or {})}


def is_local(path):
    return FileSystems.get_scheme(path) in (None, "file")


def local_path(path):
    return path[len("file://"):] if path.startswith("file://") else path


def record_key(image):
    """What identifies an image across runs: the absolute path for local files, the URL otherwise."""
    return os.path.abspath(local_path(image)) if is_local(image) else image


# -------------------------------------------------------------------------------------------------- inputs


def _has_image_extension(path):
    return os.path.splitext(path.rstrip("/"))[1].lower() in IMAGE_EXTENSIONS


def _match(pattern):
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def match_images(pattern):
    """Beam file-system counterpart of `utils.image_io.list_images` for one input (sorted paths).

    A file is kept whatever its extension; a directory (or an object-store prefix) is searched recursively
    and a glob pattern expanded (Beam's syntax: ``*`` within a path segment, ``**`` across segments), both
    keeping the files with an image extension.

    Raises:
        ImageReadError: nothing there, a directory without images, a pattern matching no image.
    """
    if not _GLOB_CHARS & set(pattern):
        local = local_path(pattern)
        if is_local(pattern):
            if os.path.isfile(local):
                return [pattern]
            if not os.path.isdir(local):
                raise ImageReadError(f"no such file or directory: {pattern}")
        elif not pattern.endswith("/") and FileSystems.exists(pattern):
            return [pattern]
        found = _match(pattern.rstrip("/") + "/**")
        if not found and not is_local(pattern):
            raise ImageReadError(f"no such file or directory: {pattern}")
        images = sorted(p for p in found if _has_image_extension(p))
        if not images:
            raise ImageReadError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in directory {pattern}")
        return images
    images = sorted(p for p in _match(pattern) if _has_image_extension(p))
    if not images:
        raise ImageReadError(f"no image file matches the pattern {pattern!r}")
    return images


class _MatchInputs(beam.DoFn):
    """An input pattern -> its image paths; an input that matches nothing -> an error record (tagged)."""

    def __init__(self, settings):
        self._settings = settings

    def process(self, pattern):
        try:
            yield from match_images(pattern)
        except (ImageReadError, OSError) as e:  # BeamIOError is an IOError
            yield beam.pvalue.TaggedOutput(ERRORS, make_record(pattern, self._settings, error=str(e)))


def parse_input_list(line, path_column=None):
    """One line of a list file -> the path it names (None for a blank line).

    A plain line is a path; with ``path_column`` (a CSV's column index) the line is read as CSV.
    """
    if path_column is None:
        line = line.strip()
        return line or None
    row = next(csv.reader(io.StringIO(line)), [])
    value = row[path_column].strip() if path_column < len(row) else ""
    return value or None


#: the longest CSV header line of an input list (`list_file_column`)
_MAX_HEADER_BYTES = 1 << 20


def list_file_column(list_file):
    """For a .csv list: the index of its path column (``image``, ``path``, ``file_name``, ``filename`` or
    ``file``, else the first) and True (a header line to skip); for any other file: (None, False). A list
    that cannot be opened, or whose header is not a line of UTF-8 text (read bounded: at most
    `_MAX_HEADER_BYTES`), is a ValueError naming it, before the job (a missing one was an OSError traceback
    from Beam's reader)."""
    try:
        found = _match(list_file)
    except OSError as e:
        raise ValueError(f"--input-list {list_file}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if not found:
        raise ValueError(f"--input-list {list_file}: no such file")
    if not list_file.lower().endswith(".csv"):
        return None, False
    try:
        with FileSystems.open(list_file) as f:
            line = f.readline(_MAX_HEADER_BYTES + 1)
        if len(line) > _MAX_HEADER_BYTES:
            raise ValueError(f"its header line is longer than {_MAX_HEADER_BYTES} bytes")
        header = next(csv.reader(io.StringIO(line.decode("utf-8"))), [])
    except (OSError, ValueError, csv.Error) as e:  # BeamIOError is an IOError; UnicodeDecodeError a ValueError
        raise ValueError(f"--input-list {list_file}: cannot read its CSV header ({type(e).__name__}: "
                         f"{str(e)[:200]})") from e
    names = [h.strip().lower() for h in header]
    for name in ("image", "path", "file_name", "filename", "file"):
        if name in names:
            return names.index(name), True
    return 0, True


# ----------------------------------------------------------------------------------- reading + preprocessing


def load_pixels(readable, embedder):
    """A Beam ``ReadableFile`` -> preprocessed (n_px, n_px, 3) pixels, by ``embedder`` (an `ImageEmbedder`)."""
    return load_pixels_and_stamp(readable, embedder)[0]


def load_pixels_and_stamp(readable, embedder):
    """A Beam ``ReadableFile`` -> (preprocessed (n_px, n_px, 3) pixels, `freshness.content_stamp` of the bytes).

    Local files are read as `predict` reads them (`utils.image_io.read_image_file`: regular files only, size
    cap); other file systems are read through Beam, at most ``embedder.max_bytes``; both are decoded by
    ``embedder.read_bytes``. Raises `ImageReadError` (or any preprocessing error) for a bad image.
    """
    path = readable.metadata.path
    max_bytes = embedder.max_bytes
    if is_local(path):
        data = read_image_file(local_path(path), max_bytes)
        return embedder.preprocess(embedder.read_bytes(data, local_path(path))), content_stamp(data)
    size = getattr(readable.metadata, "size_in_bytes", None)
    if max_bytes is not None and size is not None and size > max_bytes:
        raise ImageReadError(f"{path}: {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with readable.open() as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read: {e}") from e
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageReadError(f"{path}: more than {max_bytes} bytes (the limit)")
    return embedder.preprocess(embedder.read_bytes(data, path)), content_stamp(data)


class NoImageEncoderError(ValueError):
    """A saved ClipCap without a CLIP image encoder: it loads, but cannot caption images (a usage error)."""


def clip_input_resolution(model_dir):
    """The CLIP input side n_px of a saved ClipCap (from its clip/config.json, without loading weights).
    Raises `NoImageEncoderError` for a model without CLIP, OSError / ValueError / KeyError for a folder that
    is no saved model or a damaged one."""
    from utils.preset_utils import MAX_CONFIG_BYTES

    config = read_json(Path(model_dir) / "config.json", MAX_CONFIG_BYTES)
    clip_dir = config.get("clip") if isinstance(config, dict) else None
    if clip_dir is None:
        raise NoImageEncoderError(f"{model_dir} has no CLIP image encoder: batch captioning needs one")
    from models.siamese.clip_saving import saved_clip_config

    return int(saved_clip_config(Path(model_dir) / clip_dir)["image_resolution"])


class ReadAndPreprocess(beam.DoFn):
    """A ReadableFile -> ((path, size, sha256), (n_px, n_px, 3) float32 pixels), OpenAI's CLIP preprocessing,
    as `predict`; size and SHA-256 are those of the bytes decoded (a record's stamp). A bad image -> (path,
    message) on the ``ERRORS`` output (logged). The one reading stage of Beam captioning and of
    `datasets.beam_extraction`.

    Local files go through ``ImageEmbedder.read(path)`` (exactly what `predict` does); other file systems are
    read through Beam (``ReadableFile.read``) and decoded by the same code.
    """

    def __init__(self, n_px, exif_transpose=True):
        self._embedder = ImageEmbedder(None, n_px, exif_transpose=exif_transpose)  # reads, no model

    def process(self, readable):
        path = readable.metadata.path
        try:
            pixels, stamp = load_pixels_and_stamp(readable, self._embedder)
        except Exception as e:  # any failure of one image is that image's error
            message = str(e) if isinstance(e, ImageReadError) else f"{type(e).__name__} in preprocess: {e}"
            logger.warning("cannot read %s: %s", path, message)
            yield beam.pvalue.TaggedOutput(ERRORS, (path, message))
            return
        yield (path, stamp["size"], stamp["sha256"]), pixels


# ------------------------------------------------------------------------------------------- model handler


class ClipCapModelHandler(ModelHandler):
    """RunInference's handler for a saved ClipCap: (path, pixels) batches -> PredictionResult(path, candidates)
    (``path``: any key, passed through).

    The decoding settings are the handler's arguments (``method`` and ``model.generate``'s keyword
    arguments, or a checked `custom_architectures.decoding.Decoding` as ``method``), checked here, at
    pipeline construction, and carried to every worker. Batches hold exactly ``batch_size`` elements (``BatchElements(min = max = batch_size)``; the
    last of a bundle may be smaller and is padded to the next power of two by the model), so that the
    XLA-compiled shapes are the few power-of-two buckets. The model is loaded once per worker process by
    RunInference and shared by that process's threads.

    Example::

        handler = ClipCapModelHandler("pretrained_models/coco", method="beam", beam_size=5)
        results = pixels_by_path | RunInference(handler)       # PredictionResult(path, [candidates])
    """

    def __init__(self, model_dir, method="greedy", batch_size=16, precision=None, **generate_kwargs):
        from models.precision import resolve_precision

        request = as_decoding(method, generate_kwargs)  # bad settings fail here, not on every worker
        resolve_precision(precision)  # an unknown name fails here, not on the workers
        self.precision = precision  # None: as saved
        if batch_size < 1 or batch_size & (batch_size - 1):
            raise ValueError(f"batch_size must be a power of two (the compiled batch shapes), got {batch_size}")
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.model_dir = str(model_dir)
        self.request = request
        self.batch_size = batch_size

    def load_model(self):
        from models.image_captioning.clip_cap import ClipCap

        model = ClipCap.load(self.model_dir, precision=self.precision)
        if model.clip is None:
            raise ValueError(f"{self.model_dir} has no CLIP image encoder: batch captioning needs one")
        model.check_generate_args(self.request)  # what needs the model: the stop token, CLIP's text encoder
        return model

    def run_inference(self, batch, model, inference_args=None):
        paths = [path for path, _ in batch]
        embeddings = model.clip.image_embedder().encode_batch([pixels for _, pixels in batch])
        names = [key[0] if isinstance(key, tuple) else key for key in paths]  # (path, size, sha256) or a path
        generated = model.generate(embeddings, method=self.request,  # draws keyed by each image's name, as in predict
                                   image_ids=[draw_id(record_key(name)) for name in names])
        return [PredictionResult(path, candidates, model.name) for path, candidates in zip(paths, generated)]

    def get_num_bytes(self, batch):
        return sum(pixels.nbytes for _, pixels in batch)

    def get_metrics_namespace(self):
        return "ClipCap"


# ------------------------------------------------------------------------------------------------ pipeline


def path_stamp(path, max_bytes=DEFAULT_MAX_BYTES):
    """`freshness.content_stamp` of the file at ``path`` (any Beam file system) as it is now; None when it
    cannot be read."""
    if is_local(path):
        return file_stamp(local_path(path), max_bytes)
    try:
        with FileSystems.open(path) as f:
            return stream_stamp(f, max_bytes)
    except OSError:
        return None


class _SkipDone(beam.DoFn):
    """(key, {"todo": [paths], "done": [records]}) -> the paths that no earlier record answers for
    (`freshness.answers`: same settings, same bytes; a path with earlier records is read to be hashed)."""

    def __init__(self, settings):
        self._settings = settings

    def process(self, element):
        _, groups = element
        done = list(groups["done"])
        for path in groups["todo"]:
            stamp = path_stamp(path) if done else None
            if not any(answers(record, self._settings, stamp) for record in done):
                yield path


def _done_keys(line, settings):
    """An earlier output line -> (image key, the record's settings and stamp) when it holds a caption made
    with ``settings`` (whether its bytes are those of the file now is `_SkipDone`'s question)."""
    record = parse_json(line.encode("utf-8") if isinstance(line, str) else line, "an earlier output record")
    if not isinstance(record, dict):
        return
    if record.get("error") is None and record.get("caption") is not None and record.get("settings") == settings:
        yield record_key(record["image"]), {k: record.get(k) for k in ("settings", "size", "sha256")}


def previous_outputs(prefix):
    """The glob of the record files written under ``prefix`` (ValueError when there are none)."""
    pattern = f"{prefix}-{RECORDS_NAME}-*-of-*{OUTPUT_SUFFIX}"
    if not _match(pattern):
        raise ValueError(f"--skip-existing {prefix}: no output files {pattern}")
    return pattern


def caption_pipeline(pipeline, inputs, model_dir, output, method="greedy", batch_size=16, generate_kwargs=None,
                     exif_transpose=True, input_lists=(), skip_existing=(), num_shards=0, settings=None,
                     precision=None):
    """Add the captioning transforms to ``pipeline``; returns the (records, errors) PCollections.

    `run_batch` holds an inter-process lock on a local ``output`` prefix for the whole job and removes the
    ``beam-temp-*`` folders killed jobs left there; a pipeline built here directly does not take that lock, so
    do not run it beside a ``batch`` job on the same local prefix (that job would remove this one's temporaries).

    Args:
        inputs: file paths, directories or glob patterns (any Beam file system).
        model_dir: a saved ClipCap directory readable by every worker.
        output: the output prefix; records go to ``<output>-records-SSSSS-of-NNNNN.jsonl``, errors also to
            ``<output>-errors-SSSSS-of-NNNNN.jsonl``.
        input_lists: text files of paths (one a line) or CSV files (a header; the path column is ``image``,
            ``path``, ``file_name``, ``filename``, ``file`` or the first).
        skip_existing: earlier output prefixes: images captioned there with the same settings are skipped.
        num_shards: output shards (0: the runner decides).
        settings: the records' settings (default: `prediction.generation_settings` of the saved model).
        precision: the workers load the model in it (`models.precision`; "bfloat16": records keyed by the
            bfloat16 model's identity).
    """
    request = as_decoding(method, dict(generate_kwargs or {}))  # checked once, carried to the workers
    if settings is None:
        settings = batch_settings(model_dir, request.method, request.given, exif_transpose, precision)
    handler = ClipCapModelHandler(model_dir, request, batch_size=batch_size, precision=precision)
    n_px = clip_input_resolution(model_dir)

    matched = (pipeline | "Inputs" >> beam.Create(list(inputs))
               | "Match" >> beam.ParDo(_MatchInputs(settings)).with_outputs(ERRORS, main="paths"))
    paths = [matched.paths]
    for i, list_file in enumerate(input_lists):
        column, header = list_file_column(list_file)
        paths.append(pipeline
                     | f"ReadList{i}" >> beam.io.ReadFromText(list_file, skip_header_lines=int(header))
                     | f"ParseList{i}" >> beam.Map(parse_input_list, column)
                     | f"NonEmpty{i}" >> beam.Filter(lambda p: p is not None))
    paths = paths[0] if len(paths) == 1 else tuple(paths) | "AllPaths" >> beam.Flatten()
    if skip_existing:
        done = (tuple(pipeline | f"ReadPrevious{i}" >> beam.io.ReadFromText(previous_outputs(prefix))
                      for i, prefix in enumerate(skip_existing))
                | "FlattenPrevious" >> beam.Flatten()
                | "DoneKeys" >> beam.FlatMap(_done_keys, settings))
        todo = paths | "KeyPaths" >> beam.Map(lambda p: (record_key(p), p))
        paths = ({"todo": todo, "done": done} | "JoinPrevious" >> beam.CoGroupByKey()
                 | "SkipDone" >> beam.ParDo(_SkipDone(settings)))
    preprocessed = (paths
                    | "ReadMatches" >> fileio.ReadMatches()
                    | "Preprocess" >> beam.ParDo(ReadAndPreprocess(n_px, exif_transpose))
                    .with_outputs(ERRORS, main="pixels"))
    unreadable = (preprocessed[ERRORS]
                  | "UnreadableRecords" >> beam.MapTuple(lambda path, message: make_record(path, settings,
                                                                                           error=message)))
    captioned = (preprocessed.pixels
                 | "RunInference" >> RunInference(handler)
                 | "ToRecords" >> beam.Map(lambda r: make_record(r.example[0], settings, candidates=r.inference,
                                                                 stamp={"size": r.example[1], "sha256": r.example[2]})))
    errors = (matched[ERRORS], unreadable) | "FlattenErrors" >> beam.Flatten()
    records = (captioned, errors) | "FlattenRecords" >> beam.Flatten()
    (records | "RecordsToJson" >> beam.Map(json_text, indent=None)  # a non-UTF-8 file name stays valid
     | "WriteRecords" >> beam.io.WriteToText(f"{output}-{RECORDS_NAME}", file_name_suffix=OUTPUT_SUFFIX,
                                             num_shards=num_shards))
    (errors | "ErrorsToJson" >> beam.Map(json_text, indent=None)
     | "WriteErrors" >> beam.io.WriteToText(f"{output}-{ERRORS_NAME}", file_name_suffix=OUTPUT_SUFFIX,
                                            num_shards=num_shards))
    return records, errors


def batch_settings(model_dir, method, generate_kwargs, exif_transpose=True, precision=None):
    """`prediction.generation_settings` for a saved model: its name (config.json) and identity (metadata.json,
    as the model has it once loaded in ``precision``: `cached_answers.saved_identity_in`), no weights loaded; a
    folder that records no identity (saved by an earlier version) is loaded once here to compute it. A
    ValueError for a precision the folder cannot be loaded in (an int8 folder's float32 weights are not
    there), before any worker tries."""
    from models.image_captioning.cached_answers import saved_identity_in, saved_model_name
    from models.image_captioning.identity import recorded_identity
    from models.image_captioning.prediction import generation_settings_for

    identity = recorded_identity(model_dir)
    if identity is None:
        from models.image_captioning.clip_cap import ClipCap

        identity = ClipCap.load(str(model_dir)).identity
    identity = saved_identity_in(model_dir, identity, precision)
    if identity is None:
        raise ValueError(f"{model_dir} holds int8 weights (saved so): it loads as int8 only, not in precision "
                         f"{precision!r} (its float32 weights are not there)")
    # the name as ClipCap.load gives it
    return generation_settings_for(saved_model_name(model_dir), identity, method, generate_kwargs, exif_transpose)


def check_output_prefix(output):
    """Raise `UnsafePathError` (a ValueError, naming ``output``) when the folder of a local output prefix
    cannot be written (`utils.file_utils.check_writable_dir`: a regular file on the way, a read-only or
    special file system, no space left): found before any input is read or the job starts, not when the sink
    writes. Remote prefixes (gs://, s3://, ...) are left to their file system."""
    if not is_local(output):
        return
    try:
        check_writable_dir(os.path.dirname(local_path(str(output))) or ".")
    except OSError as e:
        raise UnsafePathError(f"output prefix {output}: {e}") from e


def run_batch(inputs, model_dir, output, method="greedy", batch_size=16, generate_kwargs=None, exif_transpose=True,
              input_lists=(), skip_existing=(), num_shards=0, pipeline_args=(), overwrite=False, precision=None,
              settings=None):
    """Build and run the captioning pipeline (Beam options from ``pipeline_args``); returns the output files.

    A local output prefix whose folder cannot be written is refused first (`check_output_prefix`). An output
    prefix that already holds shards (``<output>-records-*`` / ``<output>-errors-*``, an earlier run's) is
    refused unless ``overwrite``, which deletes those shards first (Beam's sink would replace only the ones
    with the same shard count, leaving a mix of two runs). ``settings``: the records' settings when the
    caller has read them already (`batch_settings`; default: read here).

    Example::

        run_batch(["photos/"], "pretrained_models/coco", "out/captions",
                  pipeline_args=["--runner=DirectRunner", "--direct_num_workers=2",
                                 "--direct_running_mode=multi_processing"])
    """
    if not inputs and not input_lists:
        raise ValueError("no inputs: give file patterns or an input list")
    if any(record_key(str(prefix).rstrip("/")) == record_key(str(output).rstrip("/")) for prefix in skip_existing):
        raise ValueError(f"--skip-existing {output} is the output prefix itself: write the new run to another "
                         "prefix (the earlier files would be overwritten)")
    check_output_prefix(output)
    with _output_lock(output):
        clear_output_prefix([f"{output}-{name}-*-of-*{OUTPUT_SUFFIX}" for name in (RECORDS_NAME, ERRORS_NAME)],
                            output, overwrite)
        _export_pythonpath()
        options = PipelineOptions(list(pipeline_args))
        with beam.Pipeline(options=options) as pipeline:
            caption_pipeline(pipeline, inputs, model_dir, output, method=method, batch_size=batch_size,
                             generate_kwargs=generate_kwargs, exif_transpose=exif_transpose, precision=precision,
                             input_lists=input_lists, skip_existing=skip_existing, num_shards=num_shards,
                             settings=settings)
    return sorted(output_files(output) + output_files(output, ERRORS_NAME))


@contextlib.contextmanager
def _output_lock(output):
    """For a local output prefix (a path or a ``file://`` URL): an exclusive lock on ``<output>.lock`` for the
    whole job (a second job on the same prefix is refused: the two would mix their shards), under which the
    sink folders of killed jobs are removed (`remove_stale_sink_folders`). Remote prefixes are left to their
    file system."""
    if not is_local(str(output)):
        yield
        return
    output = local_path(str(output))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(output, timeout=0))
        except TimeoutError as e:
            raise UnsafePathError(f"another batch job is writing to {output} (it holds {output}.lock): wait for "
                                  "it or choose another output prefix") from e
        except OSError as e:  # the folder or the lock file cannot be made (changed since `check_output_prefix`)
            raise UnsafePathError(f"output prefix {output}: cannot create its lock file {output}.lock: "
                                  f"{e.strerror or e}") from e
        remove_stale_sink_folders(output)
        yield


def remove_stale_sink_folders(output):
    """Delete the temporary folders that Beam's text sink left beside a local output prefix when its job was
    killed: ``<dir>/beam-temp-<prefix name>-<uuid hex>`` holding only regular files (the sink's temporary
    shards). Called while holding the prefix's lock (`_output_lock`), so no live job of ours writes there;
    anything else (another prefix's, or another shape) is left alone. Returns the folders removed."""
    output = Path(output)
    pattern = re.compile(rf"beam-temp-{re.escape(output.name)}-[0-9a-f]{{32}}")
    removed = []
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if all(e.is_file(follow_symlinks=False) for e in os.scandir(entry.path)):
            shutil.rmtree(entry.path)
            removed.append(entry.path)
    if removed:
        logger.info("removed the temporary folders of killed jobs: %s", ", ".join(removed))
    return removed


def _export_pythonpath():
    """Worker subprocesses (the DirectRunner's multi_processing mode) import this repository's modules."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in paths if p]])


def clear_output_prefix(patterns, output, overwrite=False):
    """Refuse (`UnsafePathError`) an output prefix whose shard patterns already match files of an earlier run,
    unless ``overwrite``, which deletes exactly those shards (a new job's sink would replace only the shards
    of the same count and leave a mix of two runs)."""
    existing = sorted(path for pattern in patterns for path in _match(pattern))
    if existing and not overwrite:
        raise UnsafePathError(f"{output} already holds the output of an earlier run ({existing[0]}, ...): give "
                              "another output prefix (resume with --skip-existing), or overwrite")
    if existing:
        FileSystems.delete(existing)


def output_files(output, name=RECORDS_NAME):
    """The shards of an output prefix: its records (``name="records"``) or its errors (``"errors"``)."""
    return sorted(_match(f"{output}-{name}-*-of-*{OUTPUT_SUFFIX}"))


def read_records(output, name=RECORDS_NAME):
    """Every record of an output prefix (every shard of its records, or of its errors), as dicts."""
    records = []
    for path in output_files(output, name):
        with FileSystems.open(path) as f:
            records.extend(parse_json(line, path) for line in f.read().splitlines() if line.strip())
    return records
