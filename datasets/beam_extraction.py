"""CLIP embeddings of a whole dataset on Apache Beam: the costly pass of training on a large dataset.

``main.py extract ... --runner DirectRunner|DataflowRunner|...`` runs this instead of the local pipeline of
`datasets.embeddings`::

    unique image paths -> fileio.ReadMatches -> read + CLIP preprocess (a DoFn; unreadable -> error record)
      -> RunInference(ClipEmbeddingHandler): batches of ``batch_size``, ``clip.encode_pixels``, CLIP loaded
         once per worker process
      -> ``<shards>-embeddings-SSSSS-of-NNNNN.tfrecord`` (one record per image: path + float32 vector)
         and ``<shards>-errors-SSSSS-of-NNNNN.jsonl``

then, on the machine that started the job, the shards are gathered into the same ``.npz`` that the local
``extract`` writes (`save_embedded_dataset`: images in dataset order, captions, embeddings, the CLIP's
``model_id``, unreadable images listed under ``failed`` and left out), which ``train`` reads. The pixels and
embeddings are those of the local extraction (same `read_image`, preprocessing and ``encode_pixels``). The
local embedding cache is not used: the job embeds every unique image once.

Example::

    from datasets.beam_extraction import extract_on_beam
    extract_on_beam(dataset, "clip_vit_b32/", "emb/train.npz", pipeline_args=["--runner=DirectRunner"])
"""

import json
import logging
import os
import struct

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from datasets.embeddings import ExtractionResult, save_embedded_dataset
from models.image_captioning.beam_inference import ERRORS, ReadAndPreprocess

logger = logging.getLogger(__name__)

EMBEDDINGS_NAME, ERRORS_NAME = "embeddings", "errors"


def encode_record(path, vector):
    """One TFRecord payload: the UTF-8 path's length (4 bytes, little-endian), the path, float32 values."""
    name = path.encode("utf-8")
    return struct.pack("<I", len(name)) + name + np.asarray(vector, "<f4").tobytes()


def decode_record(data):
    (length,) = struct.unpack_from("<I", data)
    return data[4 : 4 + length].decode("utf-8"), np.frombuffer(data[4 + length :], "<f4").astype(np.float32)


class ClipEmbeddingHandler(ModelHandler):
    """RunInference's handler for a CLIP image encoder: (key, pixels) batches, ``key`` the ``(path, size,
    sha256)`` of `ReadAndPreprocess` -> PredictionResult(path, raw (unnormalised) embedding), batches of
    exactly ``batch_size`` (the compiled shape)."""

    def __init__(self, clip_path, batch_size=64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.clip_path = str(clip_path)

    def load_model(self):
        from models.siamese.clip import CLIP

        return CLIP.from_pretrained(self.clip_path, visual_only=True)

    def run_inference(self, batch, model, inference_args=None):
        vectors = np.asarray(model.image_embedder().encode_batch([pixels for _, pixels in batch]), np.float32)
        return [PredictionResult(key[0], vector) for (key, _), vector in zip(batch, vectors)]

    def get_num_bytes(self, batch):
        return sum(pixels.nbytes for _, pixels in batch)

    def get_metrics_namespace(self):
        return "CLIP"


def extraction_pipeline(pipeline, paths, clip_path, n_px, shards, batch_size=64, exif_transpose=True):
    """Add the extraction transforms to ``pipeline`` (``paths``: unique image paths)."""
    read = (pipeline | "Paths" >> beam.Create(list(paths))
            | "ReadMatches" >> fileio.ReadMatches()
            | "Preprocess" >> beam.ParDo(ReadAndPreprocess(n_px, exif_transpose)).with_outputs(ERRORS, main="pixels"))
    (read.pixels
     | "RunInference" >> RunInference(ClipEmbeddingHandler(clip_path, batch_size))
     | "Encode" >> beam.Map(lambda r: encode_record(r.example, r.inference))
     | "WriteEmbeddings" >> beam.io.WriteToTFRecord(f"{shards}-{EMBEDDINGS_NAME}", file_name_suffix=".tfrecord"))
    (read[ERRORS]
     | "ErrorsToJson" >> beam.MapTuple(lambda path, message: json.dumps({"image": path, "error": message}))
     | "WriteErrors" >> beam.io.WriteToText(f"{shards}-{ERRORS_NAME}", file_name_suffix=".jsonl"))


def _shard_files(shards, name, suffix):
    return sorted(m.path for m in FileSystems.match([f"{shards}-{name}-*-of-*{suffix}"])[0].metadata_list)


def gather(shards):
    """({path: embedding}, {path: error message}) from a finished job's shards."""
    import tensorflow as tf

    vectors, errors = {}, {}
    files = _shard_files(shards, EMBEDDINGS_NAME, ".tfrecord")
    if files:
        for data in tf.data.TFRecordDataset(files).as_numpy_iterator():
            path, vector = decode_record(data)
            vectors[path] = vector
    for path in _shard_files(shards, ERRORS_NAME, ".jsonl"):
        with FileSystems.open(path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    errors[record["image"]] = record["error"]
    return vectors, errors


def extract_on_beam(dataset, clip_path, output, clip=None, shards=None, batch_size=64, exif_transpose=True,
                    pipeline_args=()):
    """Embed every unique image of ``dataset`` on Beam and write the ``.npz`` that ``train`` reads.

    Args:
        dataset: a `CaptionDataset`.
        clip_path: the CLIP every worker loads (``CLIP.from_pretrained``: a saved CLIP directory or an OpenAI
            ``.pt``; a CLIP name is resolved to its downloaded file here).
        output: the ``.npz`` to write (on this machine).
        clip: the same CLIP already loaded here (for its input size and ``model_id``); None: loaded here.
        shards: the prefix of the job's files (default ``<output>.shards/part``; a gs:// prefix on Dataflow).
        pipeline_args: Beam options (``--runner=...``).

    Returns:
        (path of the .npz, `ExtractionResult`).
    """
    from datasets.embeddings import clip_model_id
    from models.siamese.clip import CLIP

    clip_path = str(CLIP._resolve(clip_path))  # a CLIP name -> its downloaded file, for the workers
    if clip is None:
        clip = CLIP.from_pretrained(clip_path, visual_only=True)
    shards = shards or os.path.join(f"{output}.shards", "part")
    paths = [os.fspath(p) for p in dataset.images]
    unique = list(dict.fromkeys(paths))
    from models.image_captioning.beam_inference import _export_pythonpath, clear_output_prefix

    # this job's own shards only: an earlier job's (another shard count, another CLIP) would be gathered too
    clear_output_prefix([f"{shards}-{EMBEDDINGS_NAME}-*-of-*.tfrecord", f"{shards}-{ERRORS_NAME}-*-of-*.jsonl"],
                        shards, overwrite=True)
    _export_pythonpath()
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
        extraction_pipeline(pipeline, unique, clip_path, clip.input_resolution, shards, batch_size, exif_transpose)
    vectors, errors = gather(shards)
    failed, ok = {}, []
    for i, path in enumerate(paths):
        if path in vectors:
            ok.append(i)
        else:
            failed[i] = errors.get(path, f"{path}: no embedding came back from the job")
    for i, message in sorted(failed.items()):
        logger.warning("skipped unreadable image %s: %s", paths[i], message)
    dim = clip.embed_dim
    embeddings = np.stack([vectors[paths[i]] for i in ok]) if ok else np.zeros((0, dim), np.float32)
    result = ExtractionResult(embeddings, np.asarray(ok, np.int64), failed, 0, len(vectors))
    path = save_embedded_dataset(output, dataset, result, clip_model_id(clip, exif_transpose))
    return path, result
