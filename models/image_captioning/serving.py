"""Export a `ClipCap` as a TensorFlow SavedModel that captions encoded image bytes: no repository, no torch.

The graph holds everything: decoding the bytes (JPEG, PNG, GIF first frame, BMP; headers checked first),
the pixels `ClipCap.caption` sees, bit for bit (`serving_pixels`: PIL's JPEG IDCT, EXIF orientation, PIL's
fixed-point resize in the image's PIL mode, centre crop, normalisation), the CLIP image encoder, the mapper (with the model's
``normalize_prefix`` policy) and the XLA-compiled decoding loop (`PrefixDecoder`), then the token ids ->
text table. Signatures (see README "Serving"):

- ``serving_default``: ``images`` (N,) tf.string -> ``captions`` (N,) tf.string, ``scores`` (N,) float32
  (the mean log-probability per generated token, as `ClipCap.generate` reports it). A row whose bytes are
  not a decodable image gets the caption ``""`` and the score NaN; the other rows are captioned as usual.
  Each row's header is read before anything is decoded (`serving_ops.read_header`: JPEG SOF, PNG IHDR, GIF
  screen and first frame, BMP); a row is decoded only when its format is one of those four, its width x
  height is at most ``max_pixels`` (PIL's bound, 89,478,485) and fits in what is left of the request's
  ``max_request_pixels`` (default twice that) after the rows before it, and (a JPEG) it holds at most
  `utils.image_io.MAX_JPEG_SCANS` scans; any other row gets ``""`` and NaN without being decoded, so a small
  file announcing a huge image costs no memory, nor one of thousands of progressive scans minutes of CPU. A GIF is decoded up to
  the end of its first frame only (the frame PIL and OpenAI's preprocessing use).
- ``embeddings``: ``embeddings`` (N, D) float32 CLIP features -> the same outputs; a row with NaN / inf
  values (or all zeros for a normalising mapper) gets ``""`` and NaN.

The decoding settings (method and its options, max length, stop token) are fixed at export, as TF Serving
needs; the methods that can be are those whose sampler says so (``Sampler.servable``: a compiled loop whose
captions depend on the image alone, `custom_architectures.samplers.servable_methods`). They are written to ``assets.extra/clipcap_serving.json`` and returned by the loaded object's
``metadata()`` function (a JSON string). Batches are cut into chunks of at most ``max_batch_size`` images,
each padded to a power of two, exactly as `ClipCap` pads them (one compiled program per bucket, compiled
at the first request that uses it).

Example::

    export_savedmodel(ClipCap.load("coco"), "exports/coco", method="beam", beam_size=5)
    loaded = tf.saved_model.load("exports/coco")          # anywhere: no repository needed
    out = loaded.signatures["serving_default"](images=tf.constant([open("cat.jpg", "rb").read()]))
    out["captions"].numpy()[0].decode()
"""

import json
import os
import time
from pathlib import Path

import tensorflow as tf

from custom_architectures.decoding import as_decoding
from custom_architectures.generation_utils import column_rows
from custom_architectures.samplers import methods_options, servable_methods
from models.image_captioning import serving_ops as ops
from models.image_captioning import serving_pixels

METADATA_FILE = os.path.join("assets.extra", "clipcap_serving.json")
FORMAT = "clipcap-serving-savedmodel"


def is_exported_savedmodel(directory) -> bool:
    """Whether ``directory`` is a SavedModel written by `export_savedmodel` (so it may be replaced)."""
    from utils.file_utils import json_file_matches

    directory = Path(directory)
    return (directory / "saved_model.pb").is_file() and json_file_matches(
        directory / METADATA_FILE, lambda d: isinstance(d, dict) and d.get("format") == FORMAT)


def check_servable(request):
    """ValueError unless the checked decoding ``request`` (`custom_architectures.decoding.Decoding`) can be
    baked into a SavedModel: a servable method (`Sampler.servable`), one caption per image, no re-ranking."""
    if not request.sampler.servable:
        raise ValueError(f"a SavedModel decodes with fixed settings in one compiled loop: method must be one of "
                         f"{servable_methods()}, got {request.method!r}")
    if request.num_captions != 1 or request.rerank is not None:
        raise ValueError("a SavedModel gives one caption per image, the decoder's best: num_captions and rerank "
                         "do not apply")


class CaptionModule(tf.Module):
    """The exported object: the weights (as variables), the token table and the two serving functions.
    ``method`` and ``options`` as `ClipCap.generate` takes them (or a checked `Decoding` as ``method``)."""

    def __init__(self, model, method="greedy", max_batch_size=16, max_pixels=ops.DEFAULT_MAX_PIXELS,
                 max_request_pixels=ops.DEFAULT_MAX_REQUEST_PIXELS, **options):
        super().__init__(name="clipcap_serving")
        if model.clip is None:
            raise ValueError("this ClipCap model has no CLIP image encoder: the SavedModel captions images; give "
                             "the model a CLIP (ClipCap.load(..., clip=...))")
        request, stop = model.check_generate_args(method, **options)
        check_servable(request)
        stop_token = model.resolve_stop_token(request.stop_token)  # the model's own by default
        sampler, max_length = request.sampler, request.max_length
        if model.prefix_length + max_length - 1 > model.gpt2.n_positions:
            raise ValueError(f"prefix length {model.prefix_length} + max_length {max_length} - 1 exceeds GPT-2's "
                             f"n_positions={model.gpt2.n_positions}")
        self._sizes = ops.bucket_sizes(int(max_batch_size))
        self._n_px = model.clip.input_resolution
        self._max_pixels = int(max_pixels)
        self._max_request_pixels = int(max_request_pixels)
        self._normalize = bool(model.config.get("normalize_prefix", False))
        self._stop = -1 if stop is None else stop
        self._width = sampler.num_sequences
        self._max_length = max_length
        self._prefix_size = model.prefix_size
        self.model_variables = list(model.clip.visual.variables) + list(model.mapper.variables) + \
            list(model.gpt2.variables)
        pieces = ops.token_pieces(model.tokenizer, model.gpt2.vocab_size)
        if model.hides_stop_token(stop):  # <|endoftext|> ends a caption, out of its text (as `generate`)
            pieces[stop] = b""
        self._pieces = tf.constant(pieces.tolist(), tf.string)
        self.metadata_json = json.dumps({
            "format": FORMAT, "model": model.name, "precision": model.precision, "method": request.method,
            # every servable method's options: the value baked in, None where this method takes none
            **{name: request.values.get(name) for name in methods_options(servable_methods())},
            "max_length": max_length,
            "stop_token": stop_token, "stop_token_id": stop, "normalize_prefix": self._normalize,
            "mapping_type": model.config["mapping_type"], "prefix_length": model.prefix_length,
            "embedding_size": model.prefix_size, "input_resolution": self._n_px,
            "max_batch_size": self._sizes[-1], "max_pixels": self._max_pixels,
            "max_request_pixels": self._max_request_pixels, "formats": list(ops.FORMATS),
            "bad_rows": "caption '' and score NaN (not an image of these formats, unreadable, more than "
                        "max_pixels, a JPEG of more than max_jpeg_scans scans, or beyond max_request_pixels: rows "
                        "are admitted in order while they fit)",
            "max_jpeg_scans": ops.MAX_JPEG_SCANS,
            "gif": "first frame only",
            "score": "mean log-probability per generated token (stop token included)",
            "exif_orientation": "applied (JPEG), as ClipCap.caption",
            "pixels": "ClipCap.caption's (utils.clip_preprocessing.preprocess_image of utils.image_io.read_image)",
        }, indent=1)

        visual, mapper, gpt2, decoder = model.clip.visual, model.mapper, model.gpt2, model.decoder
        clip_jit = bool(model.clip.jit_compile)
        k, c = model.prefix_length, gpt2.n_embd
        self._encoders, self._projectors, self._decoders = [], [], []
        for s in self._sizes:  # one compiled program per bucket and stage, as ClipCap compiles them
            self._encoders.append(tf.function(
                lambda x: (tf.cast(visual(x, training=False), tf.float32),), jit_compile=clip_jit, autograph=False,
                input_signature=[tf.TensorSpec((s, self._n_px, self._n_px, 3), tf.float32)]))
            self._projectors.append(tf.function(
                self._project(mapper), jit_compile=model.uses_xla, autograph=False, input_signature=[tf.TensorSpec((s, self._prefix_size))]))
            self._decoders.append(tf.function(
                self._decode(decoder, sampler, max_length, inplace=not model.uses_xla,
                             columns=model.uses_xla and column_rows(s * sampler.num_sequences, gpt2)),
                jit_compile=model.uses_xla,
                input_signature=[tf.TensorSpec((s, k, c)), tf.TensorSpec((s,), tf.bool), tf.TensorSpec((), tf.int32),
                                 tf.TensorSpec((), tf.int32)]))

        self.serve_images = tf.function(self._serve_images, autograph=False, input_signature=[
            tf.TensorSpec((None,), tf.string, name="images")])
        self.serve_embeddings = tf.function(self._serve_embeddings, autograph=False, input_signature=[
            tf.TensorSpec((None, self._prefix_size), tf.float32, name="embeddings")])
        self.metadata = tf.function(lambda: tf.constant(self.metadata_json), input_signature=[])

    def _project(self, mapper):
        normalize = self._normalize

        def project(embeddings):  # (s, D) -> (s, K, C), the policy of ClipCap.prefix
            if normalize:
                embeddings = embeddings / tf.norm(embeddings, axis=-1, keepdims=True)
            return (tf.cast(mapper(embeddings), tf.float32),)  # float32 also from a bfloat16 model
        return project

    @staticmethod
    def _decode(decoder, sampler, max_length, inplace, columns):
        def decode(prefix, valid, stop_id, seed):  # -> tokens (s*W, T), lengths (s*W,), sums (s*W,)
            # a plain graph's loop (a bfloat16 model's) writes its cache in place; each run makes its own.
            # XLA's steps at a few rows in column form, as `PrefixDecoder` runs them (the same tokens)
            return decoder.decode_loop(prefix, valid, stop_id, seed, sampler=sampler, max_length=max_length,
                                       inplace=inplace, columns=columns)[:3]
        return decode

    # --- the graph ---------------------------------------------------------------------------------------

    def _best(self, tokens, lengths, sums):
        """Per image, the best of its W candidates, as `PrefixDecoder` ranks them (first of equal averages)."""
        w, t = self._width, self._max_length
        tokens = tf.reshape(tokens, (-1, w, t))
        lengths = tf.reshape(tf.cast(lengths, tf.int64), (-1, w))
        average = tf.reshape(tf.cast(sums, tf.float64), (-1, w)) / tf.cast(tf.maximum(lengths, 1), tf.float64)
        best = tf.argmax(average, axis=1, output_type=tf.int32)  # numpy's float64 division, then float32
        return (tf.gather(tokens, best, batch_dims=1), tf.gather(lengths, best, batch_dims=1),
                tf.cast(tf.gather(average, best, batch_dims=1), tf.float32))

    def _decode_bucket(self, i):
        stop, seed = tf.constant(self._stop, tf.int32), tf.constant(0, tf.int32)

        def run(prefix, valid):
            return self._best(*self._decoders[i](prefix, valid, stop, seed))
        return run

    def _caption(self, embeddings, ok):
        """embeddings (N, D) (rows not ``ok`` are replaced) -> captions (N,), scores (N,)."""
        finite = tf.reduce_all(tf.math.is_finite(embeddings), axis=1)
        ok = tf.logical_and(ok, finite)
        if self._normalize:  # a zero vector has no direction
            ok = tf.logical_and(ok, tf.reduce_any(tf.not_equal(embeddings, 0.0), axis=1))
        embeddings = tf.where(ok[:, None], embeddings, 1.0)
        (prefix,) = ops.run_bucketed(self._projectors, [embeddings], [1.0],
                                     [(tf.float32, self._decoders[0].input_signature[0].shape[1:])])
        ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(prefix), axis=(1, 2)))
        prefix = tf.where(ok[:, None, None], prefix, 0.0)
        # padding rows of a bucket are zeros and start finished, as in PrefixDecoder
        run = [self._decode_bucket(i) for i in range(len(self._sizes))]
        tokens, lengths, scores = ops.run_bucketed(
            [lambda p, v, f=f: f(p, v) for f in run], [prefix, ok], [0.0, False],
            [(tf.int32, (self._max_length,)), (tf.int64, ()), (tf.float32, ())])
        captions = ops.tokens_to_text(self._pieces, tokens, lengths)
        return {"captions": tf.where(ok, captions, ""),
                "scores": tf.where(ok, scores, tf.constant(float("nan"), tf.float32))}

    def _serve_embeddings(self, embeddings):
        return self._caption(embeddings, tf.ones((tf.shape(embeddings)[0],), tf.bool))

    def _serve_images(self, images):
        n = tf.shape(images)[0]
        rows, pixels = serving_pixels.decode_images(images, self._n_px, self._max_pixels, self._max_request_pixels)
        (features,) = ops.run_bucketed(self._encoders, [pixels], [0.0], [(tf.float32, (self._prefix_size,))])
        embeddings = tf.scatter_nd(rows[:, None], features, tf.stack([n, self._prefix_size]))
        ok = tf.scatter_nd(rows[:, None], tf.ones_like(rows, tf.bool), tf.reshape(n, (1,)))
        return self._caption(embeddings, ok)


def export_savedmodel(model, directory, method="greedy", max_batch_size=16, max_pixels=ops.DEFAULT_MAX_PIXELS,
                      max_request_pixels=ops.DEFAULT_MAX_REQUEST_PIXELS, overwrite=False, **options):
    """Write ``model`` as a serving SavedModel to ``directory`` (atomically: built beside it, then renamed),
    decoding with ``method`` and ``options`` (`ClipCap.generate`'s: ``beam_size``, ``max_length``,
    ``stop_token`` ...; or a checked `Decoding` as ``method``).

    An existing ``directory`` is replaced only when it is empty, or a SavedModel written here and
    ``overwrite``; anything else raises `utils.file_utils.UnsafePathError` before any work. Returns
    (directory, metadata dict, seconds spent).
    """
    from utils.file_utils import check_replaceable, replace_dir

    request = as_decoding(method, options)  # checked once, before any work
    check_servable(request)
    check_replaceable(directory, is_exported_savedmodel, overwrite)
    start = time.perf_counter()
    module = CaptionModule(model, request, max_batch_size=max_batch_size, max_pixels=max_pixels,
                           max_request_pixels=max_request_pixels)
    signatures = {"serving_default": module.serve_images.get_concrete_function(),
                  "embeddings": module.serve_embeddings.get_concrete_function()}

    def write(staging):
        tf.saved_model.save(module, str(staging), signatures=signatures)
        (staging / "assets.extra").mkdir(exist_ok=True)
        (staging / METADATA_FILE).write_text(module.metadata_json + "\n", encoding="utf-8")

    replace_dir(directory, write, is_ours=is_exported_savedmodel, overwrite=overwrite)
    return str(directory), json.loads(module.metadata_json), time.perf_counter() - start
