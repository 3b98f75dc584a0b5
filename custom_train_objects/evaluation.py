"""Caption evaluation: the COCO metrics through pycocoevalcap, and the reference-free CLIPScore.

`caption_metrics` scores predictions against references with pycocoevalcap's own scorers: BLEU-1..4,
METEOR, ROUGE-L, CIDEr and SPICE, after its PTB tokenization (lower case, punctuation removed).

Java: the PTB tokenizer, METEOR and SPICE run Java programs. Without ``java`` on the PATH, METEOR and SPICE
are skipped (the result's ``skipped`` says why) and the captions are tokenized by `simple_ptb_tokenize`, a
Python approximation (the result's ``tokenizer`` says so: scores can then differ slightly from the official
ones). SPICE also needs Stanford CoreNLP 3.6.0 (two jars, ~400 MB) that pycocoevalcap downloads from
nlp.stanford.edu on first use; without them SPICE is skipped with a message saying how to install them
(it cannot run offline on a fresh install).

`clip_score` is CLIP-S of Hessel et al. (2021), "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning": ``2.5 * max(cos(image, "A photo depicts " + caption), 0)`` with the Keras CLIP, averaged over
images; with references it adds RefCLIP-S, the harmonic mean of CLIP-S and ``max(max_r cos(caption, r), 0)``.

`evaluate_model` captions every image of a COCO-format split with a `ClipCap` and writes ``results.json``
(COCO results format) and ``metrics.json``.

Example::

    scores = caption_metrics({1: ["a cat on a mat."]}, {1: "a cat on the mat."})
    scores["metrics"]["CIDEr"], scores["skipped"]           # ..., {"SPICE": "..."}
"""

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from custom_architectures.decoding import as_decoding
from custom_architectures.decoding_options import check_integer
from models.siamese.clip_score import (
    CLIP_SCORE_PROMPT,
    CLIP_SCORE_W,
    clip_scores,
    encode_texts,
    has_text_encoder,
    normalize,
)
from utils.file_utils import atomic_write, check_overwritable, json_file_matches

logger = logging.getLogger(__name__)

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# PTBTokenizer's punctuation list (pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS)
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}


def java_available():
    return shutil.which("java") is not None


def spice_missing_jars():
    """The CoreNLP jars SPICE needs that are not installed in pycocoevalcap's ``spice/lib``."""
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    return [str(lib / name) for name in SPICE_JARS if not (lib / name).is_file()]


def simple_ptb_tokenize(caption):
    """A Python approximation of the PTB tokenization pycocoevalcap applies (used only without Java)."""
    text = caption.lower().replace("\n", " ")
    text = re.sub(r"([.,!?;:()\[\]{}\"`])", r" \1 ", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|n't|'m)\b", r"\1 \2", text)
    return " ".join(t for t in text.split() if t not in _PUNCTUATION and t not in "()[]{}\"")


def _tokenize(captions_per_id, use_java):
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions_per_id.items()})
    return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions_per_id.items()}


def _scored_ids(scorer, gts):
    """The image ids in the order ``scorer.compute_score(gts, res)`` returns its per-image scores: pycocoevalcap
    1.2's Bleu, Meteor, Rouge and Cider follow ``gts.keys()``; Spice sorts them (``sorted(gts.keys())``)."""
    from pycocoevalcap.spice.spice import Spice

    return sorted(gts) if isinstance(scorer, Spice) else list(gts)


def _pair(ids, values, name):
    values = list(values)
    if len(values) != len(ids):  # another pycocoevalcap: never attach scores to the wrong images
        raise RuntimeError(f"{name}: {len(values)} per-image scores for {len(ids)} images")
    return zip(ids, values)


def caption_metrics(references, predictions, metrics=ALL_METRICS, tokenize=True):
    """Score ``predictions`` {id: caption} against ``references`` {id: [caption, ...]} with pycocoevalcap.

    Args:
        references: ground-truth captions per image id (every predicted id must be there).
        predictions: one caption per image id; scored over exactly these ids.
        metrics: a subset of ``("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")``.
        tokenize: apply the PTB tokenization first (as COCOEvalCap does); False if already tokenized.

    Returns:
        ``{"metrics": {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE": float},
        "per_image": {id: {metric: float}}, "skipped": {metric: reason}, "tokenizer": str, "num_images": int}``
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {ALL_METRICS}")
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references or not references[k]]
    if missing:
        raise ValueError(f"{len(missing)} predicted image ids have no reference captions, e.g. {missing[:5]}")
    ids = list(predictions)
    gts = {k: list(references[k]) for k in ids}
    res = {k: [predictions[k]] for k in ids}
    java = java_available()
    skipped = {}
    if tokenize:
        if java:
            tokenizer = "PTBTokenizer (Stanford CoreNLP 3.4.1, as COCOEvalCap)"
        else:
            tokenizer = "simple_ptb_tokenize (java not found: an approximation of PTBTokenizer)"
            logger.warning("java not found: captions are tokenized by a Python approximation of the PTB "
                           "tokenizer; scores may differ slightly from the official ones")
        gts, res = _tokenize(gts, java), _tokenize(res, java)
    else:
        tokenizer = "none (captions given tokenized)"

    scorers = []
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        scorers.append((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]))
    if "METEOR" in metrics:
        if java:
            from pycocoevalcap.meteor.meteor import Meteor

            scorers.append((Meteor, "METEOR"))
        else:
            skipped["METEOR"] = "METEOR runs a Java program (meteor-1.5.jar) and java was not found on the PATH"
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scorers.append((Rouge(), "ROUGE_L"))
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scorers.append((Cider(), "CIDEr"))
    if "SPICE" in metrics:
        jars = spice_missing_jars()
        if not java:
            skipped["SPICE"] = "SPICE runs a Java program (spice-1.0.jar) and java was not found on the PATH"
        elif jars:
            skipped["SPICE"] = (
                "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads from nlp.stanford.edu on "
                f"first use (not possible offline); missing: {', '.join(jars)}. Install once while online: "
                "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
                "get_stanford_models()'")
        else:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice, "SPICE"))
    for metric, reason in skipped.items():
        logger.warning("%s skipped: %s", metric, reason)

    results, per_image = {}, {k: {} for k in ids}
    for scorer, names in scorers:
        if isinstance(scorer, type):  # Java scorers start their process only when needed
            scorer = scorer()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
            score, scores = scorer.compute_score(gts, res)
        order = _scored_ids(scorer, gts)  # the ids in the order of this scorer's per-image scores
        if isinstance(names, list):
            for name, value, values in zip(names, score, scores):
                results[name] = float(value)
                for k, v in _pair(order, values, name):
                    per_image[k][name] = float(v)
        else:
            results[names] = float(score)
            for k, v in _pair(order, scores, names):
                per_image[k][names] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)
        if hasattr(scorer, "close"):
            scorer.close()
    return {"metrics": results, "per_image": per_image, "skipped": skipped, "tokenizer": tokenizer,
            "num_images": len(ids)}


def clip_score(clip, image_features, captions, references=None, w=CLIP_SCORE_W, prompt=CLIP_SCORE_PROMPT):
    """CLIP-S (and RefCLIP-S with ``references``) of Hessel et al. (2021) with a Keras `CLIP`.

    Args:
        clip: a `models.siamese.clip.CLIP` with its text encoder (the paper uses ViT-B/32).
        image_features: (N, D) raw CLIP image features of the images (``clip.encode_image``).
        captions: N candidate captions.
        references: optional N lists of reference captions (RefCLIP-S).
        w: the rescaling weight (2.5 in the paper); prompt: prepended to candidates ("A photo depicts ").

    Returns:
        ``{"CLIPScore": mean, "per_image": [...], ("RefCLIPScore": mean, "ref_per_image": [...])}``.
    """
    per, texts = clip_scores(clip, image_features, captions, w=w, prompt=prompt)  # models.siamese.clip_score
    out = {"CLIPScore": float(per.mean()) if len(per) else float("nan"), "per_image": per.tolist()}
    if references is not None:
        flat = [r for refs in references for r in refs]
        refs = normalize(encode_texts(clip, flat))
        best, start = [], 0
        for k, group in enumerate(references):
            sims = refs[start : start + len(group)] @ texts[k]
            best.append(max(float(sims.max()), 0.0) if len(group) else 0.0)
            start += len(group)
        best = np.asarray(best)
        ref = np.where(per + best > 0, 2 * per * best / np.maximum(per + best, 1e-12), 0.0)
        out.update({"RefCLIPScore": float(ref.mean()), "ref_per_image": ref.tolist()})
    return out


def generate_captions(model, embeddings, batch_size=32, method="greedy", **generate_kwargs):
    """Captions (the best of each image) for (N, D) CLIP embeddings, batch by batch (``method``: a name with
    its ``generate_kwargs``, or a checked `custom_architectures.decoding.Decoding`)."""
    request = as_decoding(method, generate_kwargs)
    batch_size = check_integer("batch_size", batch_size, minimum=1)  # -1 gave no caption at all, silently
    captions = []
    for start in range(0, len(embeddings), batch_size):
        out = model.generate(np.asarray(embeddings[start : start + batch_size]), method=request)
        captions.extend(candidates[0]["text"].strip() for candidates in out)
    return captions


def _is_results_file(path):
    return json_file_matches(path, lambda d: isinstance(d, list) and all(
        isinstance(r, dict) and set(r) == {"image_id", "caption"} for r in d))


def _is_metrics_file(path):
    return json_file_matches(path, lambda d: isinstance(d, dict) and {"metrics", "per_image", "method"} <= set(d))


def _drop_earlier_metrics(path):
    """Remove an earlier evaluation's metrics.json (checked ours again: `check_overwritable`) before this one's
    results.json replaces the captions it scored: scoring may still fail or be interrupted (SPICE's Java runs
    for minutes), and the new captions must not sit beside the scores of others as if they were theirs."""
    check_overwritable(path, _is_metrics_file, "a metrics file")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class NoImagesError(ValueError):
    """No image of the dataset could be read: nothing to caption or score (``failed``: {image: message})."""

    def __init__(self, message, failed):
        super().__init__(message)
        self.failed = failed


def evaluate_model(model, dataset, output_dir, embeddings=None, method="greedy", batch_size=32,
                   metrics=ALL_METRICS, clip_for_score=None, cache_dir=None, progress=True, **generate_kwargs):
    """Caption every image of ``dataset`` and score the captions; writes results.json and metrics.json.

    Args:
        model: a `ClipCap` (with its CLIP unless ``embeddings`` are given).
        dataset: a `CaptionDataset` (e.g. `datasets.coco.load_coco`): images and their references.
        output_dir: where ``results.json`` ([{"image_id", "caption"}]) and ``metrics.json`` go.
        embeddings: (N_images, D) CLIP embeddings of ``dataset.images`` (default: extracted with
            ``model.clip``, cached in ``cache_dir``; unreadable images are reported and not scored).
        method, batch_size, generate_kwargs: decoding (``model.generate``; ``rerank="clip"`` chooses each
            caption by CLIPScore with ``model.clip``, which the CLIPScore reported here then favours); metrics.json
            records the method's options (defaults included) and the others given.
        metrics: pycocoevalcap metrics to compute.
        clip_for_score: a `CLIP` with a text encoder for CLIPScore (default: ``model.clip`` when it has one;
            otherwise CLIPScore is skipped with a message).

    Returns:
        the metrics dict written to metrics.json.
    """
    from datasets.coco import write_coco_results

    request = as_decoding(method, generate_kwargs)  # checked once, first
    if hasattr(model, "check_generate_args"):  # what needs the model (rerank without a text encoder...) first
        model.check_generate_args(request)
    batch_size = check_integer("batch_size", batch_size, minimum=1)  # before the (long) work, not after it
    output_dir = Path(output_dir)
    # a previous evaluation's files are replaced; anyone else's are refused before the (long) work
    check_overwritable(output_dir / "results.json", _is_results_file, "a captions results file")
    check_overwritable(output_dir / "metrics.json", _is_metrics_file, "a metrics file")
    failed = {}
    if embeddings is None:
        from datasets.embeddings import clip_encoder, extract_embeddings

        if getattr(model, "clip", None) is None:
            raise ValueError("the model has no CLIP: pass the images' embeddings")
        result = extract_embeddings(dataset.images, clip_encoder(model.clip), cache_dir=cache_dir,
                                    batch_size=batch_size, progress=progress)
        failed = {dataset.images[i]: m for i, m in result.failed.items()}
        dataset = dataset.select_images(result.indices)
        embeddings = result.embeddings
    if len(embeddings) != dataset.num_images:
        raise ValueError(f"{len(embeddings)} embeddings for {dataset.num_images} images")
    if not dataset.num_images:  # before anything is written: an empty results.json would look like a result
        raise NoImagesError(f"no image of {dataset.name} could be read: nothing was captioned or written",
                            failed)
    start = time.perf_counter()
    captions = generate_captions(model, embeddings, batch_size=batch_size, method=request)
    seconds = time.perf_counter() - start
    predictions = dict(zip(dataset.image_ids, captions))
    output_dir.mkdir(parents=True, exist_ok=True)
    _drop_earlier_metrics(output_dir / "metrics.json")  # it scored other captions than those written now
    write_coco_results([{"image_id": k, "caption": c} for k, c in predictions.items()],
                       output_dir / "results.json")

    references = dataset.references()
    scored = {k: c for k, c in predictions.items() if references[k]}
    report = caption_metrics(references, scored, metrics=metrics) if scored else {
        "metrics": {}, "per_image": {}, "skipped": {m: "no reference captions" for m in metrics},
        "tokenizer": None, "num_images": 0}
    clip = clip_for_score if clip_for_score is not None else getattr(model, "clip", None)
    image_features = embeddings  # the captioning CLIP's; another scoring CLIP encodes the images itself
    if clip is not None and clip is not getattr(model, "clip", None):
        from datasets.embeddings import clip_encoder, extract_embeddings

        scored_images = extract_embeddings(dataset.images, clip_encoder(clip), cache_dir=cache_dir,
                                           batch_size=batch_size, progress=progress)
        image_features = scored_images.embeddings if not scored_images.failed else None
    if image_features is None:
        report["skipped"]["CLIPScore"] = "the scoring CLIP could not read every captioned image"
    elif has_text_encoder(clip):
        refs = [references[k] for k in dataset.image_ids]
        cs = clip_score(clip, image_features, captions, references=refs if all(refs) else None)
        report["metrics"]["CLIPScore"] = cs["CLIPScore"]
        if "RefCLIPScore" in cs:
            report["metrics"]["RefCLIPScore"] = cs["RefCLIPScore"]
        for k, v in zip(dataset.image_ids, cs["per_image"]):
            report["per_image"].setdefault(k, {})["CLIPScore"] = v
    else:
        report["skipped"]["CLIPScore"] = ("needs a CLIP with its text encoder: the model's CLIP is image-only "
                                          "or absent (pass --clip-score-model)")
    report.update({"model": getattr(model, "name", None), "dataset": dataset.name, "method": request.method,
                   "generate_kwargs": {**request.own_values(), **request.given},  # what ran
                   "failed_images": failed, "captioning_seconds": round(seconds, 3)})
    report["per_image"] = {str(k): v for k, v in report["per_image"].items()}
    atomic_write(output_dir / "metrics.json", json.dumps(report, indent=1, default=str))
    return report
